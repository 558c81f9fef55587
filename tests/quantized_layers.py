"""A quantized module made directly from a float layer, for the per-layer kernel tests."""

from __future__ import annotations

import torch
from torch import nn

from quantdiff.nn import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from quantdiff.primitives import compute_qparams
from quantdiff.recipe import Recipe


def quantized_like(layer: nn.Module, x: torch.Tensor, recipe: Recipe) -> QuantizedLayer:
    """The quantized module of ``layer`` (``nn.Linear`` / ``nn.Conv2d``) with a min-max static input scale from ``x``."""
    weights, activations = recipe.weights, recipe.activations
    if isinstance(layer, nn.Linear):
        quantized = QuantizedLinear(tuple(layer.weight.shape), layer.bias is not None, weights, activations)
    else:
        quantized = QuantizedConv2d(
            tuple(layer.weight.shape),
            layer.bias is not None,
            weights,
            activations,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
        )
    quantized.set_weight(layer.weight.detach())
    if layer.bias is not None:
        quantized.bias.data.copy_(layer.bias.detach())
    if activations is not None:
        quantized.set_input_qparams(*compute_qparams(x.min(), x.max(), activations.bits, activations.symmetric))
    return quantized.eval()
