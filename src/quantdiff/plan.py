"""The per-layer quantization plan: a recipe resolved against one denoiser.

Resolution visits every ``nn.Linear`` and ``nn.Conv2d`` of the denoiser, by its ``named_modules()`` name,
and decides in this order (first rule that applies wins):

1. the recipe's exact per-layer entries (``layers``, by full name);
2. the recipe's ``overrides`` (first matching pattern): skip, or changed specs;
3. the recipe's ``ignore`` globs: kept in floating point;
4. the architecture's default ignore list (``pipelines/architectures.py``), unless
   ``use_default_ignore`` is off: kept in floating point, with the documented reason;
5. otherwise the recipe's default weight and activation specs.

The plan is stored *resolved* with the quantized model, so a saved model never depends on how a later
quantdiff would resolve the same recipe, and two plans can be diffed layer by layer.

The plan also declares every tensor a quantized layer stores (:meth:`LayerPlan.stored_tensors`): the v1
integer weight, scales, input scales and bias, plus the tensors of the layer's *extras*
(:data:`LAYER_EXTRAS`), which algorithms add (an input pre-scale, a low-rank branch, a table of input scales
per timestep group). Loading builds each layer from its plan entry and assigns the stored tensors strictly,
so a layer that stores an extra tensor loads exactly as it was saved.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from quantdiff.errors import FormatError, RecipeError
from quantdiff.pipelines.architectures import Architecture
from quantdiff.recipe import Recipe, TensorSpec

_LAYER_CLASSES: Mapping[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


@dataclass(frozen=True)
class TensorDecl:
    """One tensor a quantized layer stores: its shape, dtype, and whether it is a parameter (the bias)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    parameter: bool = False

    def empty(self, device: torch.device | str | None = None) -> torch.Tensor:
        """An uninitialised tensor of this declaration (zeros, so a skeleton never holds garbage)."""
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class LayerExtra:
    """A kind of extra a layer may carry: its parameters in the plan and the tensors it stores.

    Attributes:
        name: key in a layer's ``extras``.
        description: what it is, for ``inspect`` and errors.
        params: the parameters it takes, each with a check that returns an error message or "".
        tensors: the tensors it stores, from the layer's plan and the parameters; a declaration may
            replace one of the v1 tensors (a table of input scales instead of one scale).
        needs_timestep: the layer reads the current denoising step at inference.
        needs_static_input: the layer's input must be quantized with calibrated scales.
    """

    name: str
    description: str
    params: Mapping[str, Callable[[Any], str]]
    tensors: Callable[[LayerPlan, Mapping[str, Any]], dict[str, TensorDecl]]
    needs_timestep: bool = False
    needs_static_input: bool = False


def _positive_int(value: Any) -> str:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return "" if ok else f"must be a positive integer, got {value!r}"


_BRANCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _branch_dtype(value: Any) -> str:
    return "" if value in _BRANCH_DTYPES else f"must be one of {', '.join(_BRANCH_DTYPES)}, got {value!r}"


def _pre_scale_tensors(layer: LayerPlan, params: Mapping[str, Any]) -> dict[str, TensorDecl]:
    return {"input_pre_scale": TensorDecl((params["channels"],), torch.float32)}  # (C_in,)


def _lowrank_tensors(layer: LayerPlan, params: Mapping[str, Any]) -> dict[str, TensorDecl]:
    rank, dtype = params["rank"], _BRANCH_DTYPES[params["dtype"]]
    return {
        "lowrank_down": TensorDecl((rank, *layer.weight_shape[1:]), dtype),  # (r, C_in[, kh, kw])
        "lowrank_up": TensorDecl((layer.out_features, rank), dtype),  # (C_out, r)
    }


def _timestep_group_tensors(layer: LayerPlan, params: Mapping[str, Any]) -> dict[str, TensorDecl]:
    groups = params["groups"]
    return {
        "input_scale": TensorDecl((groups,), torch.float32),  # (G,): one static scale per group
        "input_zero_point": TensorDecl((groups,), torch.int32),
        "timestep_edges": TensorDecl((groups - 1,), torch.float32),  # ascending timestep boundaries
    }


def _split_tensors(layer: LayerPlan, params: Mapping[str, Any]) -> dict[str, TensorDecl]:
    return {
        "input_scale": TensorDecl((2,), torch.float32),  # (2,): channels [:at] and [at:]
        "input_zero_point": TensorDecl((2,), torch.int32),
    }


def _bos_tensors(layer: LayerPlan, params: Mapping[str, Any]) -> dict[str, TensorDecl]:
    return {
        "bos_input": TensorDecl((layer.weight_shape[1],), torch.float32),  # (C_in,): the first token's input
        "bos_output": TensorDecl((layer.out_features,), torch.float32),  # (C_out,): its key / value, in float
    }


LAYER_EXTRAS: Mapping[str, LayerExtra] = MappingProxyType(
    {
        extra.name: extra
        for extra in (
            LayerExtra(
                "input_pre_scale",
                "per-input-channel factor the input is multiplied by before quantization (channel balancing)",
                {"channels": _positive_int},
                _pre_scale_tensors,
            ),
            LayerExtra(
                "lowrank",
                "floating-point low-rank branch up(down(x)) added to the quantized layer's output",
                {"rank": _positive_int, "dtype": _branch_dtype},
                _lowrank_tensors,
            ),
            LayerExtra(
                "input_split",
                "input is cat([a, b]) along channels: one input scale for channels [:at], one for [at:]",
                {"at": _positive_int},
                _split_tensors,
                needs_static_input=True,
            ),
            LayerExtra(
                "timestep_groups",
                "one static input scale per group of denoising timesteps, chosen per call",
                {"groups": _positive_int},
                _timestep_group_tensors,
                needs_timestep=True,
                needs_static_input=True,
            ),
            LayerExtra(
                "input_rotation",
                "input channels rotated by a block-diagonal Hadamard matrix (blocks of `block` channels) before "
                "quantization, the weight by the same matrix (algorithms/rotation.py); nothing stored",
                {"block": _positive_int},
                lambda layer, params: {},
            ),
            LayerExtra(
                "bos_kv",
                "the text's first (BOS) token: its key / value precomputed in floating point, the layer quantized "
                "(and calibrated) for the other tokens; applied by the attention processor (algorithms/bos_aware.py)",
                {},
                _bos_tensors,
            ),
        )
    }
)


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer.

    Attributes:
        name: qualified name in the denoiser (``named_modules()``).
        layer_type: ``Linear`` or ``Conv2d``.
        weight_shape: shape of the floating-point weight, e.g. ``(out, in)`` or ``(out, in, kh, kw)``.
        has_bias: whether the layer has a bias (kept in floating point).
        weights: weight spec, or ``None`` when the layer stays in floating point.
        activations: input spec, or ``None`` when inputs stay in floating point.
        reason: why this decision was taken (rule and pattern), shown by ``quantdiff inspect``.
        extras: what algorithms added to the layer, ``{extra name: {parameter: value}}``
            (:data:`LAYER_EXTRAS`); each declares the tensors it stores.
    """

    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    weights: TensorSpec | None
    activations: TensorSpec | None
    reason: str
    extras: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))
        extras = {}
        stored: dict[str, str] = {}  # tensor name -> the extra that declares it
        for extra, params in dict(self.extras).items():
            _check_extra(self, extra, params)
            extras[extra] = MappingProxyType(dict(params))
            for tensor in LAYER_EXTRAS[extra].tensors(self, params):
                if tensor in stored:
                    raise ValueError(
                        f"layer {self.name!r}: extras {stored[tensor]!r} and {extra!r} both store {tensor!r}: "
                        "they cannot be combined on one layer"
                    )
                stored[tensor] = extra
        object.__setattr__(self, "extras", MappingProxyType(extras))

    def __deepcopy__(self, memo) -> LayerPlan:
        return self  # immutable, and its read-only mappings cannot be deep-copied

    @property
    def quantized(self) -> bool:
        return self.weights is not None

    @property
    def static_input(self) -> bool:
        """Whether the layer's input is quantized with stored (calibrated) scales, not dynamic ones."""
        return self.activations is not None and not self.activations.dynamic

    @property
    def needs_timestep(self) -> bool:
        """Whether the layer reads the current denoising step (an extra with per-timestep tensors)."""
        return any(LAYER_EXTRAS[extra].needs_timestep for extra in self.extras)

    def with_extra(self, extra: str, **params: Any) -> LayerPlan:
        """This plan with ``extra`` added (or its parameters replaced)."""
        return dataclasses.replace(self, extras={**self.extras, extra: params})

    def stored_tensors(self) -> dict[str, TensorDecl]:
        """Every tensor the quantized layer stores, by attribute name (empty for a floating-point layer).

        The v1 tensors: ``weight_q`` (integers, packed two per byte at 4 bits and fewer), ``weight_scale``,
        ``weight_zero_point`` (asymmetric weights), ``input_scale`` / ``input_zero_point`` (quantized
        inputs) and ``bias``; then each extra's tensors, which may replace v1 ones.
        """
        if self.weights is None:
            return {}
        c_out, k = self.out_features, self.reduction_size
        spec = self.weights
        tensors = {
            "weight_q": TensorDecl(spec.storage_shape(c_out, k), spec.storage_dtype),
            "weight_scale": TensorDecl(spec.scale_shape(c_out, k), torch.float32),
        }
        if not spec.symmetric:
            tensors["weight_zero_point"] = TensorDecl(spec.scale_shape(c_out, k), torch.int32)
        if self.static_input:
            tensors["input_scale"] = TensorDecl((), torch.float32)
            tensors["input_zero_point"] = TensorDecl((), torch.int32)
        if self.has_bias:
            tensors["bias"] = TensorDecl((c_out,), torch.float32, parameter=True)
        for extra, params in self.extras.items():
            tensors.update(LAYER_EXTRAS[extra].tensors(self, params))
        return tensors

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def reduction_size(self) -> int:
        """Input features per output channel: ``in`` for Linear, ``in/groups * kh * kw`` for Conv2d."""
        return math.prod(self.weight_shape[1:])

    @property
    def num_weights(self) -> int:
        return math.prod(self.weight_shape)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "layer_type": self.layer_type,
            "weight_shape": list(self.weight_shape),
            "has_bias": self.has_bias,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "reason": self.reason,
        }
        if self.extras:  # written only when used: a plan without extras is format version 1
            data["extras"] = {extra: dict(params) for extra, params in self.extras.items()}
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> LayerPlan:
        if not isinstance(data, Mapping):
            raise FormatError(f"plan entry for layer {name!r} must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)} - {"name"})
        if unknown:
            raise FormatError(f"plan entry for layer {name!r} has unknown key(s) {unknown}: upgrade quantdiff")
        try:
            extras = data.get("extras", {})
            if not isinstance(extras, Mapping) or not all(isinstance(p, Mapping) for p in extras.values()):
                raise TypeError("extras must map extra names to parameter mappings")
            if data["layer_type"] not in _LAYER_CLASSES:
                raise TypeError(f"layer_type {data['layer_type']!r} is not one of {', '.join(_LAYER_CLASSES)}")
            return cls(
                name=name,
                layer_type=data["layer_type"],
                weight_shape=tuple(_dimension(d) for d in data["weight_shape"]),
                has_bias=bool(data["has_bias"]),
                weights=None if data["weights"] is None else TensorSpec.from_dict(data["weights"]),
                activations=None if data["activations"] is None else TensorSpec.from_dict(data["activations"]),
                reason=str(data["reason"]),
                extras=extras,
            )
        except (KeyError, TypeError, ValueError, RecipeError) as error:
            raise FormatError(f"plan entry for layer {name!r} is malformed: {error}") from None


@dataclass(frozen=True)
class QuantPlan:
    """All layer decisions of one denoiser, in module order."""

    layers: tuple[LayerPlan, ...]
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "_index", {layer.name: i for i, layer in enumerate(self.layers)})

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def with_layer(self, layer: LayerPlan) -> QuantPlan:
        """This plan with the entry of ``layer.name`` replaced by ``layer``."""
        layers = list(self.layers)
        layers[self._index[layer.name]] = layer
        return QuantPlan(tuple(layers))

    @property
    def needs_timestep(self) -> bool:
        """Whether some layer reads the current denoising step at inference."""
        return any(layer.needs_timestep for layer in self.quantized)

    @property
    def quantized(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.quantized)

    @property
    def needs_calibration(self) -> bool:
        """Whether any layer has static activation scales, which only calibration data can give."""
        return any(layer.static_input for layer in self.quantized)

    def to_dict(self) -> dict[str, Any]:
        return {layer.name: layer.to_dict() for layer in self.layers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        if not isinstance(data, Mapping):
            raise FormatError("the stored plan must be a mapping of layer name -> decision")
        return cls(tuple(LayerPlan.from_dict(name, entry) for name, entry in data.items()))


def resolve_plan(denoiser: nn.Module, recipe: Recipe, architecture: Architecture) -> QuantPlan:
    """Decide, for every candidate layer of ``denoiser``, how it is quantized (see the module docstring)."""
    layer_classes = tuple(_LAYER_CLASSES[name] for name in recipe.layer_types)
    default_ignore = architecture.default_ignore if recipe.use_default_ignore else ()
    used_patterns: set[str] = set()
    layers = []
    for name, module in denoiser.named_modules():
        # Exact types only: a subclass may change forward() in ways a swap would silently drop.
        if type(module) not in layer_classes:
            continue
        weights, activations, reason = _decide(name, recipe, default_ignore, used_patterns)
        layers.append(
            LayerPlan(
                name=name,
                layer_type=type(module).__name__,
                weight_shape=tuple(module.weight.shape),
                has_bias=module.bias is not None,
                weights=weights,
                activations=activations,
                reason=reason,
            )
        )
    user_patterns = [o.pattern for o in recipe.overrides] + list(recipe.ignore)
    unmatched = [p for p in user_patterns if p not in used_patterns]
    if unmatched:
        warnings.warn(
            f"recipe {recipe.name!r}: pattern(s) {unmatched} matched no layer of this "
            f"{architecture.title}; check the names with `quantdiff inspect`",
            stacklevel=2,
        )
    candidates = {layer.name for layer in layers}
    unknown = sorted(name for name in recipe.layers if name not in candidates)
    if unknown:
        warnings.warn(
            f"recipe {recipe.name!r}: {len(unknown)} exact layer entr{'y' if len(unknown) == 1 else 'ies'} name no "
            f"Linear / Conv2d layer of this {architecture.title}, e.g. {unknown[0]!r}; the recipe was made for "
            "another model?",
            stacklevel=2,
        )
    return QuantPlan(tuple(layers))


def _dimension(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"weight_shape holds {value!r}, not a size")
    return value


def _check_extra(layer: LayerPlan, extra: str, params: Mapping[str, Any]) -> None:
    kind = LAYER_EXTRAS.get(extra)
    if kind is None:
        raise ValueError(
            f"layer {layer.name!r}: unknown extra {extra!r} (this quantdiff knows {', '.join(LAYER_EXTRAS)}): "
            "upgrade quantdiff"
        )
    if layer.weights is None:
        raise ValueError(f"layer {layer.name!r}: extra {extra!r} on a layer that is not quantized")
    if not isinstance(params, Mapping) or set(params) != set(kind.params):
        raise ValueError(f"layer {layer.name!r}: extra {extra!r} takes exactly the parameters {list(kind.params)}")
    for param, check in kind.params.items():
        problem = check(params[param])
        if problem:
            raise ValueError(f"layer {layer.name!r}: extra {extra!r} parameter {param!r} {problem}")
    if extra == "input_split" and not params["at"] < layer.weight_shape[1]:
        raise ValueError(
            f"layer {layer.name!r}: input_split at={params['at']} must be below its {layer.weight_shape[1]} input channels"
        )
    if extra == "bos_kv" and layer.layer_type != "Linear":
        raise ValueError(f"layer {layer.name!r}: extra 'bos_kv' applies to Linear key / value projections only")
    if kind.needs_static_input and not layer.static_input:
        raise ValueError(f"layer {layer.name!r}: extra {extra!r} needs inputs quantized with calibrated scales")


def _decide(name, recipe, default_ignore, used_patterns):
    entry = recipe.layers.get(name)
    if entry is not None:
        weights, activations = recipe.specs_for(entry)
        return weights, activations, "layer entry" + (" (skip)" if entry.skip else "")
    for override in recipe.overrides:
        if fnmatch.fnmatchcase(name, override.pattern):
            used_patterns.add(override.pattern)
            weights, activations = recipe.specs_for(override)
            verb = "skip" if override.skip else "override"
            return weights, activations, f"{verb} {override.pattern!r}"
    for pattern in recipe.ignore:
        if fnmatch.fnmatchcase(name, pattern):
            used_patterns.add(pattern)
            return None, None, f"ignore {pattern!r}"
    for rule in default_ignore:
        if fnmatch.fnmatchcase(name, rule.pattern):
            return None, None, f"default ignore: {rule.reason}"
    return recipe.weights, recipe.activations, f"recipe {recipe.name}"
