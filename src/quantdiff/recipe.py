"""Recipes: what to quantize, to how many bits, with which observer.

A :class:`Recipe` is a frozen, validated description of a quantization job. It is resolved against a
concrete denoiser into a per-layer :class:`~quantdiff.plan.QuantPlan` (see ``plan.py``); the recipe is the
rule set, the plan is the result.

Recipes come from three places:

* the presets ``w8a8``, ``w8a8-int``, ``w8a6``, ``w8a4``, ``w4a8``, ``w4a6``, ``w4a4`` (each ``wXaY`` with a naive
  ``wXaY-minmax`` twin), ``w8a16`` and ``w4a16`` (:data:`PRESETS`);
* a JSON or YAML file with the same fields (``quantdiff quantize ... --recipe my_recipe.yaml``);
* Python code, building the dataclasses directly.

Serialized recipes carry ``"_type"`` and ``"_version"`` so that a later quantdiff can read an older file.
Unknown keys and impossible values raise :class:`~quantdiff.errors.RecipeError` with a message that names
the key and says what to change.

Format versions (:data:`RECIPE_FEATURES`): 1 is the original field set; 2 adds the weight option
``pair_safe``; 3 adds ``algorithms`` (the ordered algorithm configs, see :mod:`quantdiff.algorithms`) and
``layers`` (exact per-layer entries); 4 adds activations in per-token groups of input channels
(``granularity: group`` with ``dynamic: true``) and ``clip_ratio`` of dynamic activations. A recipe is written with the *lowest* version that can express it
(:mod:`quantdiff.versioning`: optional fields are only written when they are not their default), so files
that do not use a newer field stay readable by quantdiff releases that only know an older version, and files
that do use one are refused there with "upgrade quantdiff" instead of an unknown key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from quantdiff.algorithms.base import AlgorithmConfig, algorithm_from_dict, check_algorithm_order
from quantdiff.errors import RecipeError
from quantdiff.jsonfile import one_line, parse_json
from quantdiff.observers import OBSERVERS, make_observer
from quantdiff.versioning import Feature, check_version, lowest_version

RECIPE_VERSION = 4  # the newest format this quantdiff reads; see the module docstring
RECIPE_FEATURES = (
    Feature("weights.pair_safe", 2, "pair-safe weights"),
    Feature("overrides.*.weights.pair_safe", 2, "pair-safe weights"),
    Feature("algorithms", 3, "algorithms"),
    Feature("layers", 3, "exact per-layer entries"),
    Feature("activations.dynamic", 3, "dynamic activation scales"),
    Feature("overrides.*.activations.dynamic", 3, "dynamic activation scales"),
    Feature("activations.group_size", 4, "per-token groups of input channels"),
    Feature("overrides.*.activations.group_size", 4, "per-token groups of input channels"),
    Feature("layers.*.activations.group_size", 4, "per-token groups of input channels"),
    Feature("activations.clip_ratio", 4, "clipped dynamic input ranges"),
    Feature("overrides.*.activations.clip_ratio", 4, "clipped dynamic input ranges"),
    Feature("layers.*.activations.clip_ratio", 4, "clipped dynamic input ranges"),
)

GRANULARITIES = ("tensor", "channel", "group", "token")
MAX_RECIPE_BYTES = 16 * 2**20
"""The largest recipe file :func:`load_recipe` reads (a per-layer recipe of a large model is well under 1 MB)."""
SUPPORTED_LAYER_TYPES = ("Linear", "Conv2d")


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor (a layer's weight, or its input activation) is quantized.

    Attributes:
        bits: integer width, 2 to 8.
        symmetric: signed values with zero point 0 (``True``), or unsigned values with a zero point.
        granularity: one scale per ``"tensor"``, per output ``"channel"``, or per ``"group"`` of
            ``group_size`` consecutive input features of each output channel (weights); for activations
            ``"tensor"``, ``"token"`` (dynamic only): one scale per token of a Linear input, per pixel of a
            convolution's input, or ``"group"`` (dynamic only): one scale per token and per run of
            ``group_size`` consecutive input channels (Q-DiT's per-token-group inputs, SVDQuant's W4A4 format);
            a last run shorter than ``group_size`` is its own group.
        group_size: required for ``"group"``, forbidden otherwise.
        observer: how the range is chosen from the observed values: ``"minmax"``, ``"ema_minmax"``,
            ``"percentile"`` or ``"mse"`` (Lp range search, p = 2.4, as in Q-Diffusion).
        observer_options: keyword options of that observer, e.g. ``{"percentile": 99.99}``.
        pair_safe: weights only, 8-bit symmetric per channel: quantize so that x86 int8 kernels without
            VNNI (AVX2, whose ``vpmaddubsw`` adds two u8 x s8 products into a saturating int16) compute the
            layer exactly: every same-sign pair of neighbouring input channels satisfies
            ``|w0 + w1| <= 128``. Each channel's scale may grow by up to 2x (searched for the least weight
            error), costing about 1 dB of layer SQNR; see ``primitives.pair_safe_quantize`` and
            benchmarks/KERNELS.md. Without it the integer path on such a CPU is wrong (14-46 dB per layer)
            and ``quantdiff.nn.use_integer_kernels`` keeps those layers on the reference path.
        dynamic: activations only: the scale (and zero point) is computed from each call's input, by
            min-max, per tensor, per token (ViDiT-Q) or per token and channel group (Q-DiT), instead of calibrated once. Needs no calibration
            data and follows every timestep, prompt and guidance branch, at the cost of a reduction per call.
        clip_ratio: dynamic only: each call's range (per tensor, token or group) is multiplied by this factor
            in (0, 1] before its scale is computed, so the few largest values of a token clip instead of
            costing every other value a level (QuaRot and Atom clip 4-bit inputs at 0.9). 1 = plain min-max.
    """

    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None = None
    observer: str = "minmax"
    observer_options: Mapping[str, Any] = field(default_factory=dict)
    pair_safe: bool = False
    dynamic: bool = False
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "observer_options", _frozen_mapping(self.observer_options))
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise RecipeError(f"bits={self.bits!r} is out of range: use an integer from 2 to 8")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric={self.symmetric!r} must be true or false")
        if self.granularity not in GRANULARITIES:
            raise RecipeError(f"granularity={self.granularity!r} is unknown: use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
                raise RecipeError(
                    f"granularity 'group' needs group_size >= 2 (typically 64 or 128), got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise RecipeError(
                f"group_size={self.group_size} only applies to granularity 'group' "
                f"(this spec has granularity {self.granularity!r}): remove it or set granularity to 'group'"
            )
        if self.observer not in OBSERVERS:
            raise RecipeError(f"observer={self.observer!r} is unknown: use one of {', '.join(OBSERVERS)}")
        try:  # building one checks the options' names and values where they are defined
            make_observer(self.observer, self.bits, self.symmetric, **dict(self.observer_options))
        except (TypeError, ValueError) as error:
            raise RecipeError(f"observer {self.observer!r} rejects its options: {error}") from None
        if not isinstance(self.pair_safe, bool):
            raise RecipeError(f"pair_safe={self.pair_safe!r} must be true or false")
        if self.pair_safe and (self.bits != 8 or not self.symmetric or self.granularity != "channel"):
            raise RecipeError(
                "pair_safe applies to 8-bit symmetric per-channel weights (what int8 kernels take), got "
                f"{self.describe()}: set bits 8, symmetric true and granularity 'channel', or set pair_safe false"
            )
        if not isinstance(self.dynamic, bool):
            raise RecipeError(f"dynamic={self.dynamic!r} must be true or false")
        if self.granularity == "token" and not self.dynamic:
            raise RecipeError("granularity 'token' computes a scale per token at run time: set dynamic true")
        if self.dynamic and self.observer != "minmax":
            raise RecipeError(
                f"dynamic scales are the min-max of each call: remove observer {self.observer!r} (or set dynamic false)"
            )
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)):
            raise RecipeError(f"clip_ratio={self.clip_ratio!r} must be a number in (0, 1]")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise RecipeError(
                f"clip_ratio={self.clip_ratio!r} is out of range: use a number in (0, 1] (1 = no clipping)"
            )
        if self.clip_ratio != 1.0 and not self.dynamic:
            raise RecipeError(
                f"clip_ratio={self.clip_ratio} applies to dynamic scales; static ranges come from the observer "
                "(observer 'mse' or 'percentile' clip): remove clip_ratio or set dynamic true"
            )
        if self.dynamic and self.granularity not in ("tensor", "token", "group"):
            raise RecipeError(
                f"dynamic scales are per tensor, per token or per token and channel group, not per {self.granularity}"
            )

    def __deepcopy__(self, memo) -> TensorSpec:
        # Immutable (frozen, options in a read-only mapping that deepcopy cannot copy): share it, so that
        # modules holding a spec (the quantized layers) can be deep-copied.
        return self

    @property
    def packed(self) -> bool:
        """Whether stored values are packed two per byte (4 bits or fewer)."""
        return self.bits <= 4

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of stored weight integers: int8 when symmetric and unpacked, else uint8."""
        return torch.int8 if self.symmetric and not self.packed else torch.uint8

    def storage_shape(self, c_out: int, k: int) -> tuple[int, int]:
        """Shape of a stored ``(C_out, K)`` weight: ``(C_out, ceil(K / 2))`` when packed."""
        return (c_out, math.ceil(k / 2)) if self.packed else (c_out, k)

    def scale_shape(self, c_out: int, k: int) -> tuple[int, int]:
        """Shape of a ``(C_out, K)`` weight's scales (and zero points): ``(rows of scales, groups per row)``."""
        if self.granularity == "tensor":
            return 1, 1
        if self.granularity == "channel":
            return c_out, 1
        return c_out, math.ceil(k / self.group_size)

    def padded_reduction_size(self, k: int) -> int:
        """``K`` rounded up to whole groups for group-wise specs (the layout scales are computed on)."""
        if self.granularity == "group":
            return math.ceil(k / self.group_size) * self.group_size
        return k

    def describe(self) -> str:
        """Short human form, e.g. ``int8 sym channel minmax`` or ``int4 sym group128 mse``."""
        granularity = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        if self.dynamic and self.granularity == "group":  # activations: per token, in groups of channels
            granularity = f"token-{granularity}"
        mode = "sym" if self.symmetric else "asym"
        observer = "dynamic" if self.dynamic else self.observer
        clip = f" clip{self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""
        return f"int{self.bits} {mode} {granularity} {observer}{clip}" + (" pair-safe" if self.pair_safe else "")

    def to_dict(self) -> dict[str, Any]:
        data = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "group_size": self.group_size,  # null unless grouped: null counts as absent for format versions
            "observer": self.observer,
            "observer_options": dict(self.observer_options),
        }
        if self.pair_safe:  # written only when set: see the module docstring on format versions
            data["pair_safe"] = True
        if self.dynamic:
            data["dynamic"] = True
        if self.clip_ratio != 1.0:  # format version 4
            data["clip_ratio"] = self.clip_ratio
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "tensor spec") -> TensorSpec:
        _check_keys(data, cls, where)
        return cls(**data)


@dataclass(frozen=True)
class LayerOverride:
    """A per-layer exception to the recipe's defaults; the first override whose pattern matches wins.

    Attributes:
        pattern: glob (``fnmatch``) on the layer's qualified name in the denoiser, e.g.
            ``"down_blocks.0.*"`` or ``"*.attn2.to_k"``.
        skip: keep matching layers in floating point.
        weights: fields replaced on the recipe's weight spec, e.g. ``{"bits": 8}``.
        activations: fields replaced on the recipe's activation spec; ``None`` keeps the inputs of
            matching layers in floating point (weight-only for those layers).
    """

    pattern: str
    skip: bool = False
    weights: Mapping[str, Any] = field(default_factory=dict)
    activations: Mapping[str, Any] | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError(f"override pattern must be a non-empty glob string, got {self.pattern!r}")
        object.__setattr__(self, "weights", _frozen_mapping(self.weights))
        if self.activations is not None:
            object.__setattr__(self, "activations", _frozen_mapping(self.activations))
        for name, changes in (("weights", self.weights), ("activations", self.activations or {})):
            unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TensorSpec)})
            if unknown:
                raise RecipeError(
                    f"override {self.pattern!r}: unknown {name} field(s) {unknown}; "
                    f"allowed: {[f.name for f in dataclasses.fields(TensorSpec)]}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "skip": self.skip,
            "weights": dict(self.weights),
            "activations": None if self.activations is None else dict(self.activations),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerOverride:
        _check_keys(data, cls, "override")
        return cls(**data)


@dataclass(frozen=True)
class Recipe:
    """A named quantization job: default weight and activation specs, per-layer rules and algorithms.

    Attributes:
        name: shown in reports and stored with the quantized model.
        weights: spec of every quantized layer's weight.
        activations: spec of every quantized layer's input, static and calibrated; ``None`` means
            weight-only quantization (the ``A16`` in ``W4A16``), which needs no calibration data.
        ignore: globs of layer names kept in floating point, in addition to the architecture's default
            ignore list (see ``quantdiff.pipelines.architectures``).
        use_default_ignore: apply the architecture's documented default ignore list.
        overrides: per-layer exceptions, first match wins; they take precedence over both ignore lists.
        layer_types: module types that are quantized.
        layers: exact per-layer entries, by the layer's full name: what machine-made plans (hundreds of
            layers with individual bits) are written as. Each is a :class:`LayerOverride` whose pattern is
            the exact name; they take precedence over everything else.
        algorithms: algorithm configs (:mod:`quantdiff.algorithms`), run in this order; the order must
            follow the algorithms' stages (float model, calibration, weight rounding, converted).
    """

    name: str
    weights: TensorSpec
    activations: TensorSpec | None
    ignore: tuple[str, ...] = ()
    use_default_ignore: bool = True
    overrides: tuple[LayerOverride, ...] = ()
    layer_types: tuple[str, ...] = SUPPORTED_LAYER_TYPES
    layers: Mapping[str, LayerOverride] = field(default_factory=dict)
    algorithms: tuple[AlgorithmConfig, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError("a recipe needs a non-empty name")
        if not isinstance(self.weights, TensorSpec):
            raise RecipeError("recipe.weights must be a TensorSpec")
        _check_weight_spec(self.weights, "recipe weights")
        if self.activations is not None:
            _check_activation_spec(self.activations, "recipe activations")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        unknown_types = sorted(set(self.layer_types) - set(SUPPORTED_LAYER_TYPES))
        if unknown_types:
            raise RecipeError(
                f"layer_types {unknown_types} are not supported: use a subset of {list(SUPPORTED_LAYER_TYPES)}"
            )
        for override in self.overrides:  # resolve once so a bad override fails here, not mid-quantization
            self.specs_for(override)
        layers = {}
        for name, entry in dict(self.layers).items():
            if not isinstance(entry, LayerOverride) or entry.pattern != name:
                raise RecipeError(f"layers[{name!r}] must be a LayerOverride whose pattern is the layer name itself")
            self.specs_for(entry)
            layers[name] = entry
        object.__setattr__(self, "layers", MappingProxyType(layers))
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        for algorithm in self.algorithms:
            if not isinstance(algorithm, AlgorithmConfig):
                raise RecipeError(f"recipe algorithms must be algorithm configs, got {type(algorithm).__name__}")
        check_algorithm_order(self.algorithms)

    def __deepcopy__(self, memo) -> Recipe:
        return self  # immutable, and its read-only mappings cannot be deep-copied

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this recipe needs calibration data (static input scales, or an algorithm
        that replays recorded inputs)."""
        rules = [*self.overrides, *self.layers.values()]
        specs = [self.activations, *(self.specs_for(rule)[1] for rule in rules)]
        static = any(spec is not None and not spec.dynamic for spec in specs)
        return static or any(a.NEEDS_CALIBRATION for a in self.algorithms)

    @property
    def label(self) -> str:
        """``W8A8``-style label; ``mixed (base W8A8)`` for a recipe with exact per-layer entries (a searched
        allocation), whose bits differ per layer."""
        base = f"W{self.weights.bits}A{self.activations.bits if self.activations else 16}"
        return f"mixed (base {base})" if self.layers else base

    def specs_for(self, override: LayerOverride) -> tuple[TensorSpec | None, TensorSpec | None]:
        """The (weight, activation) specs of layers matched by ``override``; ``(None, None)`` if skipped."""
        if override.skip:
            return None, None
        try:
            try:
                weights = dataclasses.replace(self.weights, **override.weights)
                _check_weight_spec(weights, "weights")
            except RecipeError as error:  # e.g. bits 4 on pair-safe weights: name the override at fault
                raise RecipeError(f"override {override.pattern!r}: {error}") from None
            if override.activations is None:
                activations = None
            elif override.activations and self.activations is None:
                raise RecipeError(
                    f"override {override.pattern!r} changes activation fields but the recipe has no "
                    f"activation spec to change: give the recipe an 'activations' spec, or drop the override's"
                )
            elif self.activations is None:
                activations = None
            else:
                try:
                    activations = dataclasses.replace(self.activations, **override.activations)
                except RecipeError as error:
                    raise RecipeError(f"override {override.pattern!r}: {error}") from None
        except TypeError as error:
            raise RecipeError(f"override {override.pattern!r}: {error}") from None
        if activations is not None:
            _check_activation_spec(activations, f"override {override.pattern!r}")
        return weights, activations

    @property
    def format_version(self) -> int:
        """The lowest recipe format version that can express this recipe (see the module docstring)."""
        return lowest_version(self._fields_dict(), RECIPE_FEATURES)

    def _fields_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "weights": self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "ignore": list(self.ignore),
            "use_default_ignore": self.use_default_ignore,
            "overrides": [override.to_dict() for override in self.overrides],
            "layer_types": list(self.layer_types),
        }
        if self.layers:  # optional fields are written only when used: see the module docstring
            data["layers"] = {name: _entry_dict(entry) for name, entry in self.layers.items()}
        if self.algorithms:
            data["algorithms"] = [algorithm.to_dict() for algorithm in self.algorithms]
        return data

    def to_dict(self) -> dict[str, Any]:
        data = self._fields_dict()
        return {"_type": "Recipe", "_version": lowest_version(data, RECIPE_FEATURES), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build from :meth:`to_dict` output or a hand-written file (``_type``/``_version`` optional)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("_type", "Recipe")
        if kind != "Recipe":
            raise RecipeError(f"expected a Recipe, got _type={kind!r}")
        version = data.pop("_version", RECIPE_VERSION)
        try:
            check_version(data, version, RECIPE_VERSION, RECIPE_FEATURES, "the recipe")
        except ValueError as error:
            raise RecipeError(str(error)) from None
        _check_keys(data, cls, "recipe")
        for required in ("name", "weights"):
            if required not in data:
                raise RecipeError(f"recipe is missing the required field {required!r}")
        if "activations" not in data:
            raise RecipeError(
                "recipe is missing the field 'activations': give a spec, or null for weight-only quantization"
            )
        data["weights"] = TensorSpec.from_dict(data["weights"], "weights")
        if data["activations"] is not None:
            data["activations"] = TensorSpec.from_dict(data["activations"], "activations")
        data["overrides"] = tuple(LayerOverride.from_dict(item) for item in data.get("overrides", ()))
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise RecipeError("recipe 'layers' must map exact layer names to entries (skip / weights / activations)")
        data["layers"] = {name: _entry_from_dict(name, entry) for name, entry in layers.items()}
        algorithms = data.get("algorithms", ())
        if not isinstance(algorithms, (list, tuple)):
            raise RecipeError("recipe 'algorithms' must be a list of algorithm configs, each with a '_type'")
        data["algorithms"] = tuple(
            algorithm_from_dict(item, f"algorithms[{index}]") for index, item in enumerate(algorithms)
        )
        return cls(**data)


def _entry_dict(entry: LayerOverride) -> dict[str, Any]:
    """An exact per-layer entry as written in ``layers``: the override's fields without the pattern (the key)."""
    data = entry.to_dict()
    del data["pattern"]
    return data


def _entry_from_dict(name: str, entry: Any) -> LayerOverride:
    if not isinstance(entry, Mapping) or "pattern" in entry:
        raise RecipeError(
            f"layers[{name!r}] must be a mapping of skip / weights / activations (the key is the layer name)"
        )
    return LayerOverride.from_dict({"pattern": name, **entry})


def _check_activation_spec(spec: TensorSpec, where: str) -> None:
    if spec.pair_safe:
        raise RecipeError(f"{where}: pair_safe is a weight option; remove it from the activation spec")
    if spec.granularity not in ("tensor", "token", "group"):
        raise RecipeError(
            f"{where}: activations are quantized per tensor (static or dynamic), per token or per token and "
            f"channel group (dynamic); granularity {spec.granularity!r} is not supported"
        )
    if spec.granularity == "group" and not spec.dynamic:
        raise RecipeError(
            f"{where}: activation groups are per token, computed at run time: set dynamic true "
            "(static scales are per tensor)"
        )


def _check_weight_spec(spec: TensorSpec, where: str) -> None:
    if spec.dynamic or spec.granularity == "token":
        raise RecipeError(
            f"{where}: weights are quantized once: dynamic and granularity 'token' are activation options"
        )


def _check_keys(data: Mapping[str, Any], cls: type, where: str) -> None:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping of fields, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed keys are {allowed}")


# Weights: symmetric per-output-channel is what int8 GEMM / conv kernels take (zero point 0 keeps the
# epilogue a single multiply). 4-bit weights need finer scales: groups of 128 input features and an Lp
# range search, which clips rare outliers instead of spending the 16 levels on them (Q-Diffusion, Q-DiT).
_W8 = TensorSpec(bits=8, symmetric=True, granularity="channel", observer="minmax")
# The same weights constrained so that x86 int8 kernels without VNNI (AVX2: the CPUs this project is
# measured on) compute them exactly: see TensorSpec.pair_safe. A separate preset rather than a change to
# w8a8, because the constraint costs about 1 dB of layer SQNR that VNNI/AMX CPUs, GPUs and the reference
# path do not need, and because changing w8a8 would silently change every existing w8a8 result.
_W8_PAIR_SAFE = TensorSpec(bits=8, symmetric=True, granularity="channel", observer="minmax", pair_safe=True)
_W4 = TensorSpec(bits=4, symmetric=True, granularity="group", group_size=128, observer="mse")
# Activations: asymmetric per-tensor, because SiLU/GELU outputs are one-sided; the Lp search keeps
# resolution for the bulk of the values where min-max would spend it on a few outliers.
_A8 = TensorSpec(bits=8, symmetric=False, granularity="tensor", observer="mse")
_A8_MINMAX = TensorSpec(bits=8, symmetric=False, granularity="tensor", observer="minmax")

_W4_MINMAX = TensorSpec(bits=4, symmetric=True, granularity="group", group_size=128, observer="minmax")
_W3 = TensorSpec(bits=3, symmetric=True, granularity="group", group_size=64, observer="mse")
_W2 = TensorSpec(bits=2, symmetric=True, granularity="group", group_size=64, observer="mse")


def _token(bits: int) -> TensorSpec:
    """Dynamic asymmetric per-token inputs: with 6 bits one static scale cannot cover the tokens."""
    return TensorSpec(bits=bits, symmetric=False, granularity="token", dynamic=True)


def _token_groups(bits: int) -> TensorSpec:
    """4-bit inputs: a range per token and group of 16 channels, clipped at 0.9 of its min / max. Measured on
    digits-sd (layers of 32-128 channels, so 2-8 groups per token; 300 images): W8A4 86.3% vs 74.7% per token
    with the same clipping and smoothing. On wide layers (SD1.5: 320-1280 channels) a recipe file with
    group_size 64 (SVDQuant's) keeps the overhead of one scale and zero point per group lower."""
    return TensorSpec(bits=bits, symmetric=False, granularity="group", group_size=16, dynamic=True, clip_ratio=0.9)


def _static_minmax(bits: int) -> TensorSpec:
    return TensorSpec(bits=bits, symmetric=False, granularity="tensor", observer="minmax")


def _algorithms(*types: str) -> tuple[AlgorithmConfig, ...]:
    """Default configs of the named algorithms (built through the registry, which imports their modules)."""
    return tuple(algorithm_from_dict({"_type": name}, f"preset algorithm {name!r}") for name in types)


# Below 8-bit activations the presets are the best measured recipes of the ablation in the README (digits-sd,
# 300 images): dynamic per-token inputs (6 bits) or per-token groups (4 bits) after SmoothQuant balancing, and
# GPTQ for 4-bit weights. Each has a `-minmax` twin: the naive recipe of the same format (min-max ranges, one
# static scale per tensor).
PRESETS: Mapping[str, Recipe] = MappingProxyType(
    {
        "w8a8": Recipe(name="w8a8", weights=_W8, activations=_A8),
        "w8a8-minmax": Recipe(name="w8a8-minmax", weights=_W8, activations=_A8_MINMAX),
        "w8a8-int": Recipe(name="w8a8-int", weights=_W8_PAIR_SAFE, activations=_A8),
        "w8a6": Recipe(name="w8a6", weights=_W8, activations=_token(6), algorithms=_algorithms("smoothquant")),
        "w8a6-minmax": Recipe(name="w8a6-minmax", weights=_W8, activations=_static_minmax(6)),
        # clip_search after smoothquant (whose alpha search assumes the 0.9): the clip ratio per layer by its output
        # error. 300 images, against a fixed 0.9: digits-sd 85.7% / 25.2 dB vs 85.3% / 23.8 (seed 1: 84.0 / 25.1
        # vs 82.7 / 24.2), digits-sd3 87.3% / 30.4 dB vs 77.7% / 21.9. Not in w4a4: there it costs digits-sd
        # 10-18 points at equal PSNR (README, "clip_search").
        "w8a4": Recipe(
            name="w8a4",
            weights=_W8,
            activations=_token_groups(4),
            algorithms=_algorithms("smoothquant", "clip_search"),
        ),
        "w8a4-minmax": Recipe(name="w8a4-minmax", weights=_W8, activations=_static_minmax(4)),
        "w4a8": Recipe(name="w4a8", weights=_W4, activations=_A8),
        "w4a8-minmax": Recipe(name="w4a8-minmax", weights=_W4_MINMAX, activations=_A8_MINMAX),
        "w4a6": Recipe(name="w4a6", weights=_W4, activations=_token(6), algorithms=_algorithms("smoothquant", "gptq")),
        "w4a6-minmax": Recipe(name="w4a6-minmax", weights=_W4_MINMAX, activations=_static_minmax(6)),
        "w4a4": Recipe(
            name="w4a4",
            weights=_W4,
            activations=_token_groups(4),
            algorithms=_algorithms("smoothquant", "rotation", "gptq"),
        ),
        "w4a4-minmax": Recipe(name="w4a4-minmax", weights=_W4_MINMAX, activations=_static_minmax(4)),
        # 3- and 2-bit weights in groups of 64: AdaRound + BRECQ block reconstruction, the best measured (digits-sd,
        # 300 images: W3 87.7% vs naive 87.0% and 28.0 vs 22.7 dB; W2 73.7% vs naive 14.7% and GPTQ 32.7%)
        "w3a8": Recipe(name="w3a8", weights=_W3, activations=_A8_MINMAX, algorithms=_algorithms("adaround")),
        "w2a8": Recipe(name="w2a8", weights=_W2, activations=_A8_MINMAX, algorithms=_algorithms("adaround")),
        "w8a16": Recipe(name="w8a16", weights=_W8, activations=None),
        "w4a16": Recipe(name="w4a16", weights=_W4, activations=None),
    }
)


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A preset name, a path to a ``.json`` / ``.yaml`` / ``.yml`` recipe file, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    path = Path(text)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise RecipeError(f"unknown recipe {text!r}: use a preset ({', '.join(PRESETS)}) or a .json/.yaml recipe file")
    if not path.is_file():
        raise RecipeError(f"recipe file {text!r} does not exist")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {text!r} is larger than {MAX_RECIPE_BYTES // 2**20} MiB: that is not a recipe")
    try:
        if path.suffix.lower() == ".json":
            data = parse_json(path.read_bytes())
        else:
            import yaml

            # libyaml's parser where PyYAML has it: the same documents, several times faster on a large file.
            data = yaml.load(path.read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception as error:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting, yaml.YAMLError
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise RecipeError(f"recipe file {text!r} is not valid {kind}: {one_line(error)}") from None
    try:
        return Recipe.from_dict(data)
    except RecipeError as error:
        raise RecipeError(f"recipe file {text!r}: {one_line(error)}") from None
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as error:
        # A well-formed file whose values are of unexpected kinds (YAML dates, lists as keys, ...).
        raise RecipeError(f"recipe file {text!r} is malformed ({type(error).__name__}: {one_line(error)})") from None
