"""How a layer's input is quantized where its ranges are its own: the scale and zero point of one call's dynamic
input (per tensor, per token / pixel, per token / pixel and channel group, times a clip ratio), shared by the
quantized layers and the algorithms that choose among specs (``clip_search``)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from quantdiff.primitives import channel_group_ranges, compute_qparams, fake_quantize, fake_quantize_channel_groups
from quantdiff.recipe import TensorSpec


class InputQParams(NamedTuple):
    """A layer's input quantization: scale and zero point (0-d, or one per timestep group)."""

    scale: Tensor
    zero_point: Tensor


def dynamic_input_qparams(x: Tensor, channel_dim: int, spec: TensorSpec) -> InputQParams:
    """A dynamic input's scale and zero point for this call (``spec.dynamic``): per tensor, per token / pixel
    (the range over ``channel_dim``), or per token / pixel and channel group, each range times ``clip_ratio``;
    shaped to broadcast over ``x``."""
    if spec.granularity == "token":
        low, high = x.amin(dim=channel_dim, keepdim=True), x.amax(dim=channel_dim, keepdim=True)  # (..., 1)
    elif spec.granularity == "group":
        low, high = channel_group_ranges(x, channel_dim, spec.group_size)  # x's shape
    else:
        low, high = x.min(), x.max()
    if spec.clip_ratio != 1.0:
        low, high = low * spec.clip_ratio, high * spec.clip_ratio
    return InputQParams(*compute_qparams(low, high, spec.bits, spec.symmetric))


def fake_quantize_dynamic_input(x: Tensor, channel_dim: int, spec: TensorSpec) -> Tensor:
    """``x`` fake-quantized with its own dynamic ranges (:func:`dynamic_input_qparams`), as a layer with input
    spec ``spec`` quantizes it."""
    if spec.granularity == "group":  # the grouped view: the same numbers as the ranges above, without broadcasting
        return fake_quantize_channel_groups(x, channel_dim, spec.group_size, spec.bits, spec.symmetric, spec.clip_ratio)
    scale, zero_point = dynamic_input_qparams(x, channel_dim, spec)
    return fake_quantize(x, scale, zero_point, spec.bits, spec.symmetric)
