"""The per-layer quantization plan: a recipe resolved against one denoiser.

Resolution visits every ``nn.Linear`` and ``nn.Conv2d`` of the denoiser, by its ``named_modules()`` name,
and decides in this order (first rule that applies wins):

1. the recipe's ``overrides`` (first matching pattern): skip, or changed specs;
2. the recipe's ``ignore`` globs: kept in floating point;
3. the architecture's default ignore list (``pipelines/architectures.py``), unless
   ``use_default_ignore`` is off: kept in floating point, with the documented reason;
4. otherwise the recipe's default weight and activation specs.

The plan is stored *resolved* with the quantized model, so a saved model never depends on how a later
quantdiff would resolve the same recipe, and two plans can be diffed layer by layer.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantdiff.errors import FormatError
from quantdiff.pipelines.architectures import Architecture
from quantdiff.recipe import Recipe, TensorSpec

_LAYER_CLASSES: Mapping[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


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
    """

    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    weights: TensorSpec | None
    activations: TensorSpec | None
    reason: str

    @property
    def quantized(self) -> bool:
        return self.weights is not None

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
        return {
            "layer_type": self.layer_type,
            "weight_shape": list(self.weight_shape),
            "has_bias": self.has_bias,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> LayerPlan:
        try:
            return cls(
                name=name,
                layer_type=data["layer_type"],
                weight_shape=tuple(int(d) for d in data["weight_shape"]),
                has_bias=bool(data["has_bias"]),
                weights=None if data["weights"] is None else TensorSpec.from_dict(data["weights"]),
                activations=None if data["activations"] is None else TensorSpec.from_dict(data["activations"]),
                reason=str(data["reason"]),
            )
        except (KeyError, TypeError) as error:
            raise FormatError(f"plan entry for layer {name!r} is malformed: {error}") from None


@dataclass(frozen=True)
class QuantPlan:
    """All layer decisions of one denoiser, in module order."""

    layers: tuple[LayerPlan, ...]

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def quantized(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.quantized)

    @property
    def needs_calibration(self) -> bool:
        """Whether any layer has static activation scales, which only calibration data can give."""
        return any(layer.activations is not None for layer in self.quantized)

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
    return QuantPlan(tuple(layers))


def _decide(name, recipe, default_ignore, used_patterns):
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
