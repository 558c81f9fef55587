"""Quantized Linear and Conv2d modules: integer weights in memory, static input scales.

``convert`` swaps every planned ``nn.Linear`` / ``nn.Conv2d`` for one of these. They hold

* ``weight_q``: the integer weight, ``(C_out, K)`` int8 (symmetric) or uint8 (asymmetric), or for 4 bits
  and fewer ``(C_out, ceil(K / 2))`` uint8 with two values per byte; ``K`` is the reduction size
  (``in`` for Linear, ``in/groups * kh * kw`` for Conv2d). A last partial group is padded only while
  computing, never stored;
* ``weight_scale`` ``(C_out, G)`` float32 and, for asymmetric weights, ``weight_zero_point`` ``(C_out, G)``
  int32, where ``G`` is 1 (per channel), ``ceil(K / group_size)`` (per group), and the first dimension is
  1 for a per-tensor scale;
* ``input_scale`` / ``input_zero_point`` (0-d) when inputs are quantized with a calibrated static scale;
* ``bias`` in float32.

The floating-point weight is gone after conversion: everything the module computes comes from the stored
integers, so a saved and reloaded module computes bit-identically. ``forward`` here is the reference
(simulated) path: it fake-quantizes the input with the stored scale and runs the float op on the
dequantized weight; integer kernels plug in behind the same buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantdiff.observers import make_observer
from quantdiff.plan import LayerPlan
from quantdiff.primitives import (
    dequantize,
    fake_quantize,
    group_rows,
    pack_int4,
    quantize,
    unpack_int4,
)
from quantdiff.recipe import TensorSpec


def weight_layout(spec: TensorSpec, c_out: int, k: int) -> tuple[int, int]:
    """The shape of ``weight_scale``: ``(rows of scales, groups per row)``."""
    if spec.granularity == "tensor":
        return 1, 1
    if spec.granularity == "channel":
        return c_out, 1
    return c_out, math.ceil(k / spec.group_size)


def padded_reduction_size(spec: TensorSpec, k: int) -> int:
    """``K`` rounded up to whole groups for group-wise specs (the layout scales are computed on)."""
    if spec.granularity == "group":
        return math.ceil(k / spec.group_size) * spec.group_size
    return k


def quantize_weight(weight: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize a floating-point weight to its stored form.

    Args:
        weight: ``(C_out, ...)`` floating-point weight.
        spec: weight spec; its observer chooses the range of each scale row.

    Returns:
        ``(weight_q, weight_scale, weight_zero_point)`` as described in the module docstring;
        the zero point is ``None`` for symmetric specs.
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
    q = quantize(rows, scale[:, None], zero_point[:, None], spec.bits, spec.symmetric)
    scale_rows, groups = weight_layout(spec, c_out, k)
    q = q.reshape(c_out, padded_reduction_size(spec, k))[:, :k]  # (C_out, K): padding is not stored
    if spec.packed:
        q = pack_int4(q)  # (C_out, ceil(K/2))
    scale = scale.reshape(scale_rows, groups).contiguous()
    zero_point = None if spec.symmetric else zero_point.reshape(scale_rows, groups).to(torch.int32).contiguous()
    return q.contiguous(), scale, zero_point


def dequantize_weight(
    weight_q: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None, spec: TensorSpec, shape: torch.Size
) -> Tensor:
    """Float32 weight of ``shape`` from its stored form (inverse of :func:`quantize_weight` up to rounding)."""
    c_out = shape[0]
    k = math.prod(shape[1:])
    n = padded_reduction_size(spec, k)
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


class QuantizedLayer(nn.Module):
    """Shared storage and input quantization of :class:`QuantizedLinear` and :class:`QuantizedConv2d`."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        has_bias: bool,
        weights: TensorSpec,
        activations: TensorSpec | None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.weight_shape = torch.Size(weight_shape)
        self.weight_spec = weights
        self.input_spec = activations
        c_out = weight_shape[0]
        k = math.prod(weight_shape[1:])
        storage = (c_out, math.ceil(k / 2)) if weights.packed else (c_out, k)
        storage_dtype = torch.int8 if weights.symmetric and not weights.packed else torch.uint8
        scale_shape = weight_layout(weights, c_out, k)
        self.register_buffer("weight_q", torch.zeros(storage, dtype=storage_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if not weights.symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        if activations is not None:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        if has_bias:
            self.bias = nn.Parameter(torch.zeros(c_out, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def set_weight(self, weight: Tensor) -> None:
        """Quantize and store a floating-point weight of this layer's shape."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} != layer shape {tuple(self.weight_shape)}")
        weight_q, scale, zero_point = quantize_weight(weight, self.weight_spec)
        self.weight_q = weight_q.to(self.weight_q.device)
        self.weight_scale = scale.to(self.weight_scale.device)
        if zero_point is not None:
            self.weight_zero_point = zero_point.to(self.weight_zero_point.device)

    def set_input_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Store the calibrated static input scale and zero point."""
        if self.input_spec is None:
            raise ValueError("this layer keeps its inputs in floating point")
        self.input_scale = scale.detach().reshape(()).float().to(self.input_scale.device)
        self.input_zero_point = zero_point.detach().reshape(()).to(torch.int32).to(self.input_zero_point.device)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the integer weight stands for."""
        return dequantize_weight(
            self.weight_q, self.weight_scale, self.weight_zero_point, self.weight_spec, self.weight_shape
        )

    def quantize_input(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the static input scale (identity for weight-only layers)."""
        if self.input_spec is None:
            return x
        return fake_quantize(
            x, self.input_scale, self.input_zero_point, self.input_spec.bits, self.input_spec.symmetric
        )

    def extra_repr(self) -> str:
        act = self.input_spec.describe() if self.input_spec else "fp"
        return f"weight={tuple(self.weight_shape)} [{self.weight_spec.describe()}], input=[{act}], bias={self.bias is not None}"


class QuantizedLinear(QuantizedLayer):
    """``nn.Linear`` with integer weights; see the module docstring for the stored tensors."""

    @classmethod
    def like(cls, linear: nn.Linear, layer: LayerPlan) -> QuantizedLinear:
        """An empty module with ``linear``'s geometry and device (use on meta to build a loading skeleton)."""
        return cls(
            tuple(linear.weight.shape), linear.bias is not None, layer.weights, layer.activations, linear.weight.device
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight().to(x.dtype), _cast(self.bias, x))


class QuantizedConv2d(QuantizedLayer):
    """``nn.Conv2d`` with integer weights; see the module docstring for the stored tensors."""

    def __init__(self, *args, stride=1, padding=0, dilation=1, groups=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def like(cls, conv: nn.Conv2d, layer: LayerPlan) -> QuantizedConv2d:
        """An empty module with ``conv``'s geometry and device."""
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d with padding_mode={conv.padding_mode!r} cannot be quantized yet")
        return cls(
            tuple(conv.weight.shape),
            conv.bias is not None,
            layer.weights,
            layer.activations,
            conv.weight.device,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
        )

    def forward(self, x: Tensor) -> Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return F.conv2d(
            self.quantize_input(x), weight, _cast(self.bias, x), self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


QUANTIZED_CLASSES: dict[str, type[QuantizedLayer]] = {"Linear": QuantizedLinear, "Conv2d": QuantizedConv2d}


def _cast(bias: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bias is None else bias.to(x.dtype)
