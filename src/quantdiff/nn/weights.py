"""Weight quantization: a floating-point weight to its stored integer form and back (pure tensor math).

The stored form of one layer's weight (:class:`QuantizedWeight`):

* ``weight_q``: ``(C_out, K)`` int8 (symmetric) or uint8 (asymmetric), or for 4 bits and fewer
  ``(C_out, ceil(K / 2))`` uint8 with two values per byte; ``K`` is the reduction size (``in`` for Linear,
  ``in/groups * kh * kw`` for Conv2d). A last partial group is padded only while computing, never stored;
* ``weight_scale`` ``(C_out, G)`` float32 and, for asymmetric weights, ``weight_zero_point`` ``(C_out, G)``
  int32, where ``G`` is 1 (per channel), ``ceil(K / group_size)`` (per group), and the first dimension is
  1 for a per-tensor scale.

:func:`quantize_weight` rounds to nearest with the spec's observer choosing each scale row; algorithms that
round otherwise (GPTQ, AdaRound) produce a :class:`QuantizedWeight` of the same layout themselves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from quantdiff.observers import make_observer
from quantdiff.primitives import dequantize, group_rows, pack_int4, pair_safe_quantize, quantize, unpack_int4
from quantdiff.recipe import TensorSpec


class QuantizedWeight(NamedTuple):
    """One layer's stored weight: integers, scales and (asymmetric specs only) zero points."""

    weight_q: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor | None


def quantize_weight(weight: Tensor, spec: TensorSpec) -> QuantizedWeight:
    """Quantize a floating-point weight to its stored form.

    Args:
        weight: ``(C_out, ...)`` floating-point weight.
        spec: weight spec; its observer chooses the range of each scale row.

    Returns:
        The stored form described in the module docstring; the zero point is ``None`` for symmetric specs.
    """
    c_out = weight.shape[0]
    w = weight.detach().float().reshape(c_out, -1)  # (C_out, K)
    k = w.shape[1]
    if spec.granularity == "tensor":
        rows = w.reshape(1, -1)  # (1, C_out*K)
    elif spec.granularity == "channel":
        rows = w  # (C_out, K)
    else:
        rows = group_rows(w, spec.group_size)  # (C_out*G, group)
    observer = make_observer(spec.observer, spec.bits, spec.symmetric, **dict(spec.observer_options))
    observer.update(rows)
    scale, zero_point = observer.qparams()  # (R,), (R,)
    if spec.pair_safe:  # 8-bit symmetric per channel (TensorSpec checks): the observer's scale is the start
        # Pairs run over input channels at the same kernel tap: (C_out, C_in/groups, kh*kw); Linear taps = 1.
        q, scale = pair_safe_quantize(weight.detach().float().reshape(c_out, weight.shape[1], -1), scale)
        return QuantizedWeight(q.reshape(c_out, k).contiguous(), scale.reshape(c_out, 1).contiguous(), None)
    q = quantize(rows, scale[:, None], zero_point[:, None], spec.bits, spec.symmetric)
    scale_rows, groups = spec.scale_shape(c_out, k)
    q = q.reshape(c_out, spec.padded_reduction_size(k))[:, :k]  # (C_out, K): padding is not stored
    if spec.packed:
        q = pack_int4(q)  # (C_out, ceil(K/2))
    scale = scale.reshape(scale_rows, groups).contiguous()
    zero_point = None if spec.symmetric else zero_point.reshape(scale_rows, groups).to(torch.int32).contiguous()
    return QuantizedWeight(q.contiguous(), scale, zero_point)


def dequantize_weight(
    weight_q: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, spec: TensorSpec, shape: torch.Size
) -> Tensor:
    """Float32 weight of ``shape`` from its stored form (inverse of :func:`quantize_weight` up to rounding)."""
    c_out = shape[0]
    k = math.prod(shape[1:])
    n = spec.padded_reduction_size(k)
    q = unpack_int4(weight_q, k, signed=spec.symmetric) if spec.packed else weight_q  # (C_out, K)
    if n > k:
        q = F.pad(q, (0, n - k))  # (C_out, N): whole groups again; the padding is dropped below
    groups = weight_scale.shape[1]
    q = q.reshape(c_out, groups, n // groups)  # (C_out, G, group)
    if weight_zero_point is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=weight_q.device)
    else:
        zero_point = weight_zero_point[..., None]  # (C_out, G, 1)
    w = dequantize(q, weight_scale[..., None], zero_point)  # (C_out, G, group)
    return w.reshape(c_out, n)[:, :k].reshape(shape)
