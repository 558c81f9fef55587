"""Post-training quantization of a denoiser: plan -> observe -> convert.

The three steps, each usable alone:

1. :func:`~quantdiff.plan.resolve_plan` turns a recipe into a per-layer plan;
2. :func:`observe_inputs` replays calibration data through the *floating-point* denoiser with forward
   pre-hooks on the planned layers, feeding each layer's input to its observer, and returns static
   input scales (skipped for weight-only recipes);
3. :func:`convert` swaps each planned layer for a :mod:`quantdiff.nn.quantized` module holding integer
   weights and the input scale.

:func:`quantize_denoiser` runs all three and attaches a :class:`QuantizationInfo` to the denoiser, which
``save_quantized`` stores next to the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from quantdiff.calibration.dataset import CalibrationSet
from quantdiff.errors import CalibrationError
from quantdiff.nn.quantized import QUANTIZED_CLASSES, QuantizedLayer
from quantdiff.observers import Observer, make_observer
from quantdiff.pipelines.architectures import Architecture, architecture_of
from quantdiff.plan import QuantPlan, resolve_plan
from quantdiff.recipe import Recipe, load_recipe

INFO_ATTRIBUTE = "quantdiff_info"


@dataclass(frozen=True)
class QuantizationInfo:
    """What was done to a quantized denoiser; saved with it and shown by ``inspect``.

    Attributes:
        architecture: the denoiser family.
        recipe: the recipe the plan was resolved from.
        plan: the resolved per-layer plan.
        calibration: settings of the calibration data used (``None`` for weight-only recipes).
    """

    architecture: Architecture
    recipe: Recipe
    plan: QuantPlan
    calibration: Mapping[str, Any] | None


def observe_inputs(
    denoiser: nn.Module, plan: QuantPlan, calibration: CalibrationSet, *, progress: bool = True
) -> dict[str, tuple[Tensor, Tensor]]:
    """Static input ``(scale, zero_point)`` of every planned layer that quantizes its input.

    The denoiser must still be in floating point: ranges are observed on the inputs the FP model
    produces, as in standard PTQ.
    """
    observers: dict[str, Observer] = {}
    handles = []
    for layer in plan.quantized:
        if layer.activations is None:
            continue
        spec = layer.activations
        observer = make_observer(spec.observer, spec.bits, spec.symmetric, **dict(spec.observer_options))
        observers[layer.name] = observer
        handles.append(denoiser.get_submodule(layer.name).register_forward_pre_hook(_feeder(observer)))
    try:
        for _ in calibration.replay(denoiser, progress=progress, desc="observe activations"):
            pass
    finally:
        for handle in handles:
            handle.remove()
    qparams = {}
    for name, observer in observers.items():
        try:
            qparams[name] = observer.qparams()
        except RuntimeError:
            raise CalibrationError(
                f"layer {name!r} never ran during calibration, so its input range is unknown: "
                f"add it to the recipe's 'ignore' list"
            ) from None
    return qparams


def _feeder(observer: Observer):
    def hook(module: nn.Module, args: tuple) -> None:
        observer.update(args[0].detach().float().reshape(1, -1))  # (1, numel): one per-tensor range

    return hook


def convert(
    denoiser: nn.Module,
    plan: QuantPlan,
    input_qparams: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    *,
    progress: bool = True,
) -> None:
    """Swap every quantized layer of ``plan`` for its integer module, in place.

    Args:
        denoiser: the floating-point denoiser.
        plan: its resolved plan.
        input_qparams: per-layer static input ``(scale, zero_point)`` from :func:`observe_inputs`;
            required for every layer whose plan quantizes activations.
        progress: show a progress bar.
    """
    input_qparams = input_qparams or {}
    for layer in tqdm(plan.quantized, desc="quantize weights", disable=not progress, leave=False):
        original = denoiser.get_submodule(layer.name)
        quantized = QUANTIZED_CLASSES[layer.layer_type].like(original, layer)
        quantized.set_weight(original.weight)
        if original.bias is not None:
            quantized.bias.data.copy_(original.bias.detach().float())
        if layer.activations is not None:
            if layer.name not in input_qparams:
                raise CalibrationError(f"no input scale for layer {layer.name!r}: calibrate before converting")
            quantized.set_input_qparams(*input_qparams[layer.name])
        denoiser.set_submodule(layer.name, quantized)


def build_skeleton(denoiser: nn.Module, plan: QuantPlan) -> None:
    """Swap planned layers for *empty* quantized modules (on the layers' device), to load stored tensors."""
    for layer in plan.quantized:
        original = denoiser.get_submodule(layer.name)
        denoiser.set_submodule(layer.name, QUANTIZED_CLASSES[layer.layer_type].like(original, layer))


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
        calibration: recorded inputs of this denoiser; required when the recipe quantizes activations.
        progress: show progress bars.
    """
    recipe = load_recipe(recipe)
    if any(isinstance(module, QuantizedLayer) for module in denoiser.modules()):
        raise CalibrationError("this denoiser is already quantized: load the floating-point model again")
    architecture = architecture_of(denoiser)
    plan = resolve_plan(denoiser, recipe, architecture)
    input_qparams: dict[str, tuple[Tensor, Tensor]] = {}
    if plan.needs_calibration:
        if calibration is None or len(calibration) == 0:
            raise CalibrationError(
                f"recipe {recipe.name!r} ({recipe.label}) quantizes activations, which needs calibration data: "
                "pass --calib DIR (from `quantdiff calibrate`) or --prompts FILE"
            )
        calibration.check_matches(denoiser)
        input_qparams = observe_inputs(denoiser, plan, calibration, progress=progress)
    convert(denoiser, plan, input_qparams, progress=progress)
    used_calibration = calibration.info if plan.needs_calibration and calibration is not None else None
    info = QuantizationInfo(architecture, recipe, plan, used_calibration)
    setattr(denoiser, INFO_ATTRIBUTE, info)
    return info


def quantization_info(denoiser: nn.Module) -> QuantizationInfo | None:
    """The :class:`QuantizationInfo` of a quantized denoiser, ``None`` for a floating-point one."""
    return getattr(denoiser, INFO_ATTRIBUTE, None)
