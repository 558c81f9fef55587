"""The algorithm slot: what a quantization method is to quantdiff, when it runs, and what it may touch.

An algorithm is a frozen config (a dataclass subclass of :class:`AlgorithmConfig`, validated when built,
serialized in recipes as ``{"_type": ..., "_version": ..., <fields>}``) with a thin :meth:`~AlgorithmConfig.apply`
to a model; its tensor math lives in pure functions of the same file that a unit test can check without a
model. One method per file under ``quantdiff/algorithms/``; :func:`register_algorithm` maps ``_type`` to it.

:func:`quantdiff.quantize.quantize_denoiser` runs a recipe's algorithms by :class:`Stage`::

    resolve_plan -> prepare -> [FLOAT_MODEL] -> observe_inputs -> [CALIBRATION] -> [WEIGHT_ROUNDING]
                 -> convert -> [CONVERTED]

Each algorithm gets the same :class:`QuantizationContext`: the denoiser (planned layers are
:class:`~quantdiff.nn.quantized.QuantizedLayer` modules; until ``convert`` they hold the floating-point
``weight`` and compute in floating point), the plan, the calibration data, the observed input ranges and the
weights rounded so far. What each stage may do:

* ``FLOAT_MODEL``: change floating-point weights, the plan (per-layer specs) and add layer extras (stored
  tensors such as an input pre-scale or a low-rank branch, :meth:`QuantizationContext.add_extra`).
  Activation ranges are observed afterwards, on the inputs the transformed model produces.
* ``CALIBRATION``: runs after observation; may replay calibration data with taps
  (:mod:`quantdiff.calibration.taps`) and change the observed ranges (``context.input_qparams``).
* ``WEIGHT_ROUNDING``: produces integer weights for layers (:meth:`QuantizationContext.round_weight`);
  the others are rounded to nearest by ``convert``.
* ``CONVERTED``: on the integer model, e.g. extras computed from the quantized layers.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from quantdiff.errors import CalibrationError, RecipeError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from quantdiff.calibration.dataset import CalibrationSet
    from quantdiff.nn.quantized import InputQParams, QuantizedLayer
    from quantdiff.nn.weights import QuantizedWeight
    from quantdiff.pipelines.architectures import Architecture
    from quantdiff.plan import LayerPlan, QuantPlan

# Modules of the built-in algorithms, imported (and so registered) the first time a `_type` is looked up.
BUILTIN_ALGORITHMS: tuple[str, ...] = (
    "quantdiff.algorithms.adaround",
    "quantdiff.algorithms.bos_aware",
    "quantdiff.algorithms.clip_search",
    "quantdiff.algorithms.gptq",
    "quantdiff.algorithms.lowrank",
    "quantdiff.algorithms.rotation",
    "quantdiff.algorithms.shortcut_split",
    "quantdiff.algorithms.smoothquant",
    "quantdiff.algorithms.timestep_groups",
)


class Stage(enum.Enum):
    """When an algorithm runs (see the module docstring for what each stage may change)."""

    FLOAT_MODEL = "float-model"
    CALIBRATION = "calibration"
    WEIGHT_ROUNDING = "weight-rounding"
    CONVERTED = "converted"

    @property
    def order(self) -> int:
        return list(Stage).index(self)


@dataclass(frozen=True)
class AlgorithmConfig:
    """Base of every algorithm's config: subclass it as a frozen dataclass and register it.

    Class attributes a subclass sets:
        TYPE: the ``_type`` name in recipes, e.g. ``"smoothquant"``.
        VERSION: the config's own format version; bump it when a field is added, and read older dicts.
        STAGE: the :class:`Stage` it runs in.
        NEEDS_CALIBRATION: whether :meth:`apply` replays calibration data.

    Fields are the algorithm's options, with defaults that work on the bundled models; ``__post_init__``
    validates them and raises :class:`~quantdiff.errors.RecipeError` naming the field and what to change.
    """

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    STAGE: ClassVar[Stage]
    NEEDS_CALIBRATION: ClassVar[bool] = True

    def apply(self, context: QuantizationContext) -> None:
        """Run on the model in ``context`` (see :class:`Stage` for what this stage may change)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement apply()")

    def describe(self) -> str:
        """One line, e.g. ``smoothquant(alpha=0.5)``."""
        options = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.TYPE}({options})"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"_type": self.TYPE, "_version": self.VERSION}
        data.update({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "algorithm") -> AlgorithmConfig:
        """Build from :meth:`to_dict` output (``_type`` already checked by :func:`algorithm_from_dict`)."""
        data = dict(data)
        data.pop("_type", None)
        version = data.pop("_version", cls.VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecipeError(f"{where} ({cls.TYPE}): invalid _version {version!r}")
        if version > cls.VERSION:
            raise RecipeError(
                f"{where}: algorithm {cls.TYPE!r} config version {version} is newer than this quantdiff reads "
                f"({cls.VERSION}): upgrade quantdiff"
            )
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise RecipeError(f"{where} ({cls.TYPE}): unknown key(s) {unknown}; allowed keys are {allowed}")
        try:
            return cls(**{name: _frozen(value) for name, value in data.items()})
        except TypeError as error:
            raise RecipeError(f"{where} ({cls.TYPE}): {error}") from None


_REGISTRY: dict[str, type[AlgorithmConfig]] = {}


def register_algorithm(cls: type[AlgorithmConfig]) -> type[AlgorithmConfig]:
    """Class decorator: make ``cls`` loadable from recipes by its ``TYPE``."""
    if not (isinstance(cls, type) and issubclass(cls, AlgorithmConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass subclass of AlgorithmConfig")
    if not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass: configs are immutable once validated")
    if not cls.TYPE or not isinstance(getattr(cls, "STAGE", None), Stage):
        raise TypeError(f"{cls.__name__} must set TYPE (its _type name) and STAGE (a Stage)")
    registered = _REGISTRY.get(cls.TYPE)
    if registered is not None and registered.__qualname__ != cls.__qualname__:
        raise TypeError(f"algorithm type {cls.TYPE!r} is already registered by {registered.__qualname__}")
    _REGISTRY[cls.TYPE] = cls
    return cls


def algorithm_types() -> Mapping[str, type[AlgorithmConfig]]:
    """Every registered algorithm by ``_type`` (the built-in ones are imported on first use)."""
    for module in BUILTIN_ALGORITHMS:
        importlib.import_module(module)
    return dict(_REGISTRY)


def algorithm_from_dict(data: Any, where: str = "algorithm") -> AlgorithmConfig:
    """An algorithm config from its recipe form ``{"_type": ..., "_version": ..., <fields>}``."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping with a '_type', got {type(data).__name__}")
    kind = data.get("_type")
    types = algorithm_types()
    if kind not in types:
        known = ", ".join(sorted(types)) or "none are registered"
        raise RecipeError(f"{where}: unknown algorithm _type {kind!r}; known algorithms: {known}")
    return types[kind].from_dict(data, where)


def check_algorithm_order(algorithms: Sequence[AlgorithmConfig]) -> None:
    """Raise :class:`RecipeError` unless the algorithms are listed in the order their stages run."""
    for earlier, later in zip(algorithms, algorithms[1:], strict=False):  # neighbours
        if later.STAGE.order < earlier.STAGE.order:
            raise RecipeError(
                f"algorithm {later.TYPE!r} runs in the {later.STAGE.value} stage, before {earlier.TYPE!r} "
                f"({earlier.STAGE.value} stage): list the algorithms in the order their stages run "
                f"({', '.join(stage.value for stage in Stage)})"
            )


def check_number(
    name: str, value: Any, low: float, high: float | None = None, *, integer: bool = False, low_open: bool = False
) -> None:
    """Validate one numeric config field; the error names it and the range it must be in."""
    kinds = (int,) if integer else (int, float)
    bad_type = isinstance(value, bool) or not isinstance(value, kinds)
    too_low = not bad_type and (value <= low if low_open else value < low)
    too_high = not bad_type and high is not None and value > high
    if bad_type or too_low or too_high:
        what = "an integer" if integer else "a number"
        bounds = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise RecipeError(f"{name}={value!r} is invalid: use {what} {bounds}")


@dataclass
class QuantizationContext:
    """What an algorithm's :meth:`~AlgorithmConfig.apply` gets: the model being quantized and its state.

    Attributes:
        denoiser: the denoiser; planned layers are ``QuantizedLayer`` modules (holding the floating-point
            ``weight`` until ``convert``).
        plan: the current plan; algorithms replace it through :meth:`add_extra` or
            :meth:`replace_layer`, which keep the modules in step.
        architecture: the denoiser family (its layer groups, norm -> linear maps, ...).
        calibration: recorded denoiser inputs, or None (see :meth:`calibration_for`).
        progress: show progress bars.
        input_qparams: observed static input quantization per layer name (after observation).
        rounded_weights: integer weights chosen by weight-rounding algorithms, per layer name.
        stage: the stage running now.
    """

    denoiser: nn.Module
    plan: QuantPlan
    architecture: Architecture
    calibration: CalibrationSet | None = None
    progress: bool = True
    input_qparams: dict[str, InputQParams] = field(default_factory=dict)
    rounded_weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    stage: Stage | None = None

    def layers(self) -> list[tuple[LayerPlan, QuantizedLayer]]:
        """The quantized layers of the plan with their modules, in module order."""
        return [(layer, self.module(layer.name)) for layer in self.plan.quantized]

    def module(self, name: str) -> QuantizedLayer:
        """The quantized module of the planned layer ``name``."""
        from quantdiff.nn.quantized import QuantizedLayer

        module = self.denoiser.get_submodule(name)
        if not isinstance(module, QuantizedLayer):
            raise RuntimeError(f"layer {name!r} is not prepared for quantization: call quantize.prepare first")
        return module

    def calibration_for(self, algorithm: AlgorithmConfig) -> CalibrationSet:
        """The calibration data, or a :class:`CalibrationError` that names the algorithm needing it."""
        if self.calibration is None or len(self.calibration) == 0:
            raise CalibrationError(
                f"algorithm {algorithm.TYPE!r} replays calibration data: pass --calib DIR (from `quantdiff "
                "calibrate`) or --prompts FILE"
            )
        return self.calibration

    def replace_layer(self, layer: LayerPlan) -> None:
        """Replace one layer's plan (e.g. new specs); its module follows."""
        self.plan = self.plan.with_layer(layer)
        self.module(layer.name).set_layer_plan(layer)

    def add_extra(self, name: str, extra: str, tensors: Mapping[str, Tensor], **params: Any) -> None:
        """Give layer ``name`` the extra ``extra`` (:data:`quantdiff.plan.LAYER_EXTRAS`) with ``params``, and
        store its ``tensors`` on the module; the plan then declares them, so they are saved and loaded."""
        layer = self.plan[name].with_extra(extra, **params)
        self.plan = self.plan.with_layer(layer)
        self.module(name).set_layer_plan(layer, tensors)

    @staticmethod
    def replace_tensor(module: nn.Module, name: str, value: Tensor) -> None:
        """Give ``module`` a new parameter ``name`` holding ``value`` (in the old one's dtype) rather than write
        into the old tensor: the denoiser may share its tensors with another model (the weight-sharing copies
        ``quantdiff bench`` quantizes beside its fp32 reference), which must stay as it was. Float-stage
        algorithms that transform weights (smoothing, rotation, a low-rank split) go through here."""
        from torch.nn import Parameter

        old = getattr(module, name)
        setattr(module, name, Parameter(value.detach().to(old.dtype), requires_grad=old.requires_grad))

    def round_weight(self, name: str, weight: QuantizedWeight, by: AlgorithmConfig) -> None:
        """Use ``weight`` as layer ``name``'s integer weight instead of rounding to nearest (weight-rounding
        stage only; one algorithm per layer)."""
        if self.stage is not Stage.WEIGHT_ROUNDING:
            raise RuntimeError(f"{by.TYPE}: integer weights are chosen in the weight-rounding stage")
        if name in self.rounded_weights:
            raise RecipeError(f"layer {name!r} is rounded by two algorithms: keep one weight-rounding algorithm")
        self.rounded_weights[name] = weight


def _plain(value: Any) -> Any:
    """A config value as JSON: tuples as lists, mappings as dicts."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _frozen(value: Any) -> Any:
    """A JSON value as a config field: lists as tuples (configs are immutable)."""
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value
