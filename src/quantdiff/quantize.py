"""Post-training quantization of a denoiser: plan -> prepare -> algorithms -> observe -> convert.

The steps, each usable alone:

1. :func:`~quantdiff.plan.resolve_plan` turns a recipe into a per-layer plan;
2. :func:`prepare` swaps each planned layer for a :mod:`quantdiff.nn.quantized` module that still holds the
   floating-point weight and computes in floating point (what algorithms work on);
3. :func:`run_algorithms` runs the recipe's algorithms of one :class:`~quantdiff.algorithms.base.Stage`;
4. :func:`observe_inputs` replays calibration data and feeds each layer's input, at the point where it is
   quantized, to its observer; it returns static input scales (skipped for weight-only recipes);
5. :func:`convert` stores integer weights (rounded to nearest, or as a weight-rounding algorithm chose) and
   the input scales, and drops the floating-point weights.

:func:`quantize_denoiser` runs them in this order::

    resolve_plan, prepare, [float-model algorithms], observe_inputs, [calibration algorithms],
    [weight-rounding algorithms], convert, [converted algorithms]

and attaches a :class:`QuantizationInfo` to the denoiser, which ``save_quantized`` stores next to the weights.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage
from quantdiff.calibration.dataset import CalibrationSet
from quantdiff.calibration.taps import Taps
from quantdiff.calibration.timestep import attach_step_clock, step_clock
from quantdiff.errors import CalibrationError
from quantdiff.nn.quantized import QUANTIZED_CLASSES, InputQParams, QuantizedLayer
from quantdiff.nn.weights import QuantizedWeight
from quantdiff.observers import Observer, make_observer
from quantdiff.pipelines.architectures import Architecture, architecture_of
from quantdiff.plan import QuantPlan, resolve_plan
from quantdiff.progress import Progress
from quantdiff.recipe import Recipe, load_recipe

INFO_ATTRIBUTE = "quantdiff_info"


@dataclass(frozen=True)
class QuantizationInfo:
    """What was done to a quantized denoiser; saved with it and shown by ``inspect``.

    Attributes:
        architecture: the denoiser family.
        recipe: the recipe the plan was resolved from (its algorithms included).
        plan: the per-layer plan as the model stores it (algorithms' extras included).
        calibration: settings of the calibration data used (``None`` when none was needed).
    """

    architecture: Architecture
    recipe: Recipe
    plan: QuantPlan
    calibration: Mapping[str, Any] | None


def prepare(denoiser: nn.Module, plan: QuantPlan) -> None:
    """Swap every quantized layer of ``plan`` for its prepared module (floating-point weight kept), in place.

    The model computes exactly what it computed before; layers already prepared are left as they are.
    """
    for layer in plan.quantized:
        module = denoiser.get_submodule(layer.name)
        if isinstance(module, QuantizedLayer):
            continue
        denoiser.set_submodule(layer.name, QUANTIZED_CLASSES[layer.layer_type].prepared(module, layer))


def observe_inputs(
    denoiser: nn.Module, plan: QuantPlan, calibration: CalibrationSet, *, progress: bool = True
) -> dict[str, InputQParams]:
    """Calibrated input quantization of every planned layer with static input scales.

    Ranges are observed on the inputs the model produces in floating point (standard PTQ): on a prepared
    model at the point where each layer quantizes (after its input pre-scale), on a plain floating-point
    model at each layer's input. A layer with the ``timestep_groups`` extra gets one observer per group,
    fed by the calls whose timestep falls in it, and a scale per group. Dynamic inputs need no calibration.
    """
    observers: dict[str, list[Observer]] = {}
    with Taps(denoiser) as taps, step_clock(denoiser) as clock:
        for layer in plan.quantized:
            if not layer.static_input:
                continue
            spec = layer.activations
            groups = layer.extras.get("timestep_groups", {}).get("groups", 1)
            parts = 2 if "input_split" in layer.extras else 1
            observers[layer.name] = [
                make_observer(spec.observer, spec.bits, spec.symmetric, **dict(spec.observer_options))
                for _ in range(groups * parts)
            ]
            edges = denoiser.get_submodule(layer.name).timestep_edges.tolist() if groups > 1 else []
            split = layer.extras["input_split"]["at"] if parts == 2 else None
            channel = -1 if layer.layer_type == "Linear" else -3
            taps.on_layer_input(layer.name, _feeder(observers[layer.name], edges, clock, split, channel))
        for _ in calibration.replay(denoiser, progress=progress, desc="observe activations"):
            pass
    qparams = {}
    for name, layer_observers in observers.items():
        try:
            pairs = [observer.qparams() for observer in layer_observers]
        except RuntimeError:
            raise CalibrationError(
                f"layer {name!r} never ran during calibration (in some timestep group), so its input range is "
                "unknown: add it to the recipe's 'ignore' list, or calibrate with more timesteps"
            ) from None
        scales, zero_points = zip(*pairs, strict=True)
        qparams[name] = InputQParams(torch.cat(scales), torch.cat(zero_points))  # (G,) or (2,): one range each
    return qparams


def _feeder(observers: list[Observer], edges: list[float], clock, split: int | None, channel: int):
    def feed(x) -> None:
        x = x.detach().float()
        group = bisect.bisect_right(edges, clock.timestep) if edges else 0
        if split is None:
            observers[group].update(x.reshape(1, -1))  # (1, numel): one per-tensor range
            return
        first, second = x.split([split, x.shape[channel] - split], dim=channel)  # cat([a, b]): one range each
        observers[0].update(first.reshape(1, -1))
        observers[1].update(second.reshape(1, -1))

    return feed


def convert(
    denoiser: nn.Module,
    plan: QuantPlan,
    input_qparams: Mapping[str, tuple] | None = None,
    rounded_weights: Mapping[str, QuantizedWeight] | None = None,
    *,
    progress: bool = True,
) -> None:
    """Give every quantized layer of ``plan`` its integer weight and input scale, in place.

    Args:
        denoiser: the denoiser, prepared (:func:`prepare`) or still plain floating point (then each
            planned layer is swapped here).
        plan: its plan.
        input_qparams: per-layer input ``(scale, zero_point)`` from :func:`observe_inputs`; required for
            every layer whose plan quantizes activations.
        rounded_weights: integer weights chosen by an algorithm; other layers are rounded to nearest.
        progress: show a progress bar.
    """
    input_qparams = input_qparams or {}
    rounded_weights = rounded_weights or {}
    prepare(denoiser, plan)
    for layer in Progress(plan.quantized, desc="quantize weights", unit="layer", enabled=progress, leave=False):
        module = denoiser.get_submodule(layer.name)
        qparams = input_qparams.get(layer.name)
        module.convert(rounded_weights.get(layer.name), None if qparams is None else InputQParams(*qparams))
    if plan.needs_timestep:
        attach_step_clock(denoiser)


def build_skeleton(denoiser: nn.Module, plan: QuantPlan) -> None:
    """Swap planned layers for *empty* converted modules (on the layers' device), every tensor the plan
    declares included, to load stored tensors into."""
    for layer in plan.quantized:
        original = denoiser.get_submodule(layer.name)
        denoiser.set_submodule(layer.name, QUANTIZED_CLASSES[layer.layer_type].like(original, layer))
    if plan.needs_timestep:
        attach_step_clock(denoiser)


def run_algorithms(context: QuantizationContext, algorithms: Sequence[AlgorithmConfig], stage: Stage) -> None:
    """Run the ``algorithms`` of ``stage``, in their order, on ``context``."""
    context.stage = stage
    try:
        for algorithm in algorithms:
            if algorithm.STAGE is stage:
                algorithm.apply(context)
    finally:
        context.stage = None


def quantize_denoiser(
    denoiser: nn.Module,
    recipe: Recipe | str,
    calibration: CalibrationSet | None = None,
    *,
    progress: bool = True,
) -> QuantizationInfo:
    """Quantize ``denoiser`` in place with ``recipe``; returns (and attaches) its :class:`QuantizationInfo`.

    Args:
        denoiser: a floating-point ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or
            ``PixArtTransformer2DModel``.
        recipe: a :class:`Recipe`, a preset name or a recipe file path.
        calibration: recorded inputs of this denoiser; required when the recipe quantizes activations
            or runs an algorithm that replays them.
        progress: show progress bars.

    On an error the denoiser may be left half-way (prepared layers): load the floating-point model again.
    """
    recipe = load_recipe(recipe)
    if any(isinstance(module, QuantizedLayer) for module in denoiser.modules()):
        raise CalibrationError("this denoiser is already quantized: load the floating-point model again")
    if recipe.needs_calibration:
        if calibration is None or len(calibration) == 0:
            static = recipe.activations is not None and not recipe.activations.dynamic
            why = "quantizes activations with calibrated scales" if static else "runs algorithms that replay it"
            raise CalibrationError(
                f"recipe {recipe.name!r} ({recipe.label}) {why}, which needs calibration data: "
                "pass --calib DIR (from `quantdiff calibrate`) or --prompts FILE"
            )
        calibration.check_matches(denoiser)
    architecture = architecture_of(denoiser)
    plan = resolve_plan(denoiser, recipe, architecture)
    prepare(denoiser, plan)
    context = QuantizationContext(denoiser, plan, architecture, calibration, progress)
    run_algorithms(context, recipe.algorithms, Stage.FLOAT_MODEL)
    if context.plan.needs_calibration:
        context.input_qparams = observe_inputs(denoiser, context.plan, calibration, progress=progress)
    run_algorithms(context, recipe.algorithms, Stage.CALIBRATION)
    run_algorithms(context, recipe.algorithms, Stage.WEIGHT_ROUNDING)
    convert(denoiser, context.plan, context.input_qparams, context.rounded_weights, progress=progress)
    run_algorithms(context, recipe.algorithms, Stage.CONVERTED)
    used_calibration = calibration.info if recipe.needs_calibration and calibration is not None else None
    info = QuantizationInfo(architecture, recipe, context.plan, used_calibration)
    setattr(denoiser, INFO_ATTRIBUTE, info)
    return info


def quantization_info(denoiser: nn.Module) -> QuantizationInfo | None:
    """The :class:`QuantizationInfo` of a quantized denoiser, ``None`` for a floating-point one."""
    return getattr(denoiser, INFO_ATTRIBUTE, None)
