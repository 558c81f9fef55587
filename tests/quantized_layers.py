"""A quantized module made directly from a float layer, for the per-layer kernel tests."""

from __future__ import annotations

import torch
from torch import nn

from quantdiff.nn import QuantizedLayer
from quantdiff.nn.quantized import QUANTIZED_CLASSES
from quantdiff.plan import LayerPlan
from quantdiff.primitives import compute_qparams
from quantdiff.recipe import Recipe


def quantized_like(layer: nn.Module, x: torch.Tensor, recipe: Recipe) -> QuantizedLayer:
    """The quantized module of ``layer`` (``nn.Linear`` / ``nn.Conv2d``) with a min-max static input scale from ``x``."""
    activations = recipe.activations
    layer_type = type(layer).__name__
    plan = LayerPlan(
        "layer", layer_type, tuple(layer.weight.shape), layer.bias is not None, recipe.weights, activations, "test"
    )
    quantized = QUANTIZED_CLASSES[layer_type].like(layer, plan)
    quantized.set_weight(layer.weight.detach())
    if layer.bias is not None:
        quantized.bias.data.copy_(layer.bias.detach())
    if activations is not None:
        quantized.set_input_qparams(*compute_qparams(x.min(), x.max(), activations.bits, activations.symmetric))
    return quantized.eval()
