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
integers, so a saved and reloaded module computes bit-identically.

Two execution modes share those buffers:

* ``"reference"`` (default): fake-quantizes the input with the stored scale and runs the float op on the
  dequantized weight. The ground truth: quality is measured on it, and it runs anywhere.
* ``"integer"``: the oneDNN int8 kernel on CPU (:mod:`quantdiff.nn.kernels`), which computes the same
  integers exactly when the layer is eligible; layers that are not keep the reference path, each with
  the reason. :func:`use_integer_kernels` switches a whole model and returns an :class:`ExecutionSummary`;
  on CPUs with native bf16 it also runs the attention modules' scaled-dot-product attention in bf16
  (:mod:`quantdiff.nn.attention`; ``attention="float32"`` keeps fp32). :func:`use_reference` switches
  back, fp32 attention included. The mode is not saved: a loaded model starts in reference mode.

In integer mode the kernel's prepacked weight is the only copy held: ``weight_q`` is released (its buffer
is ``None``) and rebuilt bit for bit from the packed copy whenever something needs it -- ``state_dict`` /
saving, the reference fallback, ``.to()``, copying, or switching back -- so W8 holds 1 byte per weight in
either mode, not 2. :meth:`QuantizedLayer.integer_weight` reads it in either mode.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantdiff.nn.attention import attention_dtype, resolve_attention, use_attention_dtype
from quantdiff.nn.int_mm import Int8MatmulKernel, build_int_mm_kernel
from quantdiff.nn.kernels import IntegerKernel, KernelDecision, KernelSupport, build_kernel, kernel_support
from quantdiff.observers import make_observer
from quantdiff.plan import LayerPlan
from quantdiff.primitives import (
    dequantize,
    fake_quantize,
    group_rows,
    pack_int4,
    pair_safe_quantize,
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
    if spec.pair_safe:  # 8-bit symmetric per channel (TensorSpec checks): the observer's scale is the start
        # Pairs run over input channels at the same kernel tap: (C_out, C_in/groups, kh*kw); Linear taps = 1.
        q, scale = pair_safe_quantize(weight.detach().float().reshape(c_out, weight.shape[1], -1), scale)
        return q.reshape(c_out, k).contiguous(), scale.reshape(c_out, 1).contiguous(), None
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


EXECUTION_MODES = ("reference", "integer")
BACKENDS = ("auto", "onednn", "int_mm")
_REFERENCE = KernelDecision("reference", "reference mode")


class QuantizedLayer(nn.Module):
    """Shared storage, input quantization and execution mode of :class:`QuantizedLinear` / :class:`QuantizedConv2d`.

    The integer kernel (``_kernel``) is a cache derived from the buffers: built when the layer is switched
    to integer mode, dropped whenever the buffers change (``set_weight``, ``set_input_qparams``,
    ``load_state_dict``, ``.to()``) or the module is copied, and rebuilt on the next forward.
    """

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
        self.execution = "reference"  # see set_execution; a plain attribute, never saved
        self._allow_inexact = False
        self._backend = "auto"
        self._support: KernelSupport | None = None
        self._kernel: IntegerKernel | Int8MatmulKernel | None = None
        self._decision: KernelDecision | None = None  # None: not decided since the last change

    def set_weight(self, weight: Tensor) -> None:
        """Quantize and store a floating-point weight of this layer's shape."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} != layer shape {tuple(self.weight_shape)}")
        weight_q, scale, zero_point = quantize_weight(weight, self.weight_spec)
        device = self.weight_scale.device  # weight_q may be released to the kernel: see integer_weight()
        self.weight_q = weight_q.to(device)
        self.weight_scale = scale.to(device)
        if zero_point is not None:
            self.weight_zero_point = zero_point.to(self.weight_zero_point.device)
        self._drop_kernel()

    def set_input_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Store the calibrated static input scale and zero point."""
        if self.input_spec is None:
            raise ValueError("this layer keeps its inputs in floating point")
        self.input_scale = scale.detach().reshape(()).float().to(self.input_scale.device)
        self.input_zero_point = zero_point.detach().reshape(()).to(torch.int32).to(self.input_zero_point.device)
        self._drop_kernel()

    # ------------------------------------------------------------------------------------ execution mode
    def set_execution(
        self,
        mode: str,
        *,
        support: KernelSupport | None = None,
        allow_inexact: bool = False,
        backend: str = "auto",
    ) -> KernelDecision:
        """Choose the reference or the integer path; returns which path the layer will take and why.

        Args:
            mode: ``"reference"`` or ``"integer"``.
            support: from :func:`quantdiff.nn.kernels.kernel_support` (computed here when omitted).
            allow_inexact: in integer mode, run the kernel even where it can saturate (weights that are not
                pair-safe on a CPU without VNNI): faster, but wrong. Default: such layers keep the reference.
            backend: ``"auto"`` (oneDNN for weights on the CPU, ``torch._int_mm`` on CUDA), ``"onednn"``
                (:mod:`quantdiff.nn.kernels`) or ``"int_mm"`` (:mod:`quantdiff.nn.int_mm`, any device).
        """
        if mode not in EXECUTION_MODES:
            raise ValueError(f"execution mode {mode!r} is unknown: use one of {', '.join(EXECUTION_MODES)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        self.execution = mode
        self._allow_inexact = allow_inexact
        self._support = support
        self._backend = backend
        self._drop_kernel()
        return self.execution_decision()

    def execution_decision(self) -> KernelDecision:
        """The path this layer takes now (prepacks the kernel if integer mode needs it)."""
        if self.execution != "integer":
            return _REFERENCE
        if self._decision is None:
            backend = self._backend
            if backend == "auto":
                backend = "int_mm" if self.weight_q.device.type == "cuda" else "onednn"
            if backend == "int_mm":
                self._kernel, self._decision = build_int_mm_kernel(self)
            else:
                if self._support is None:
                    self._support = kernel_support()
                self._kernel, self._decision = build_kernel(self, self._support, self._allow_inexact)
            if self._kernel is not None:
                self._buffers["weight_q"] = None  # the packed copy holds it now: see integer_weight()
        return self._decision

    @property
    def holds_weight_q(self) -> bool:
        """False while the integer kernel's packed copy is the only copy of the weight."""
        return self._buffers["weight_q"] is not None

    def integer_weight(self) -> Tensor:
        """The stored integer weight (``weight_q``'s layout), rebuilt from the kernel while it is released."""
        stored = self._buffers["weight_q"]
        if stored is not None:
            return stored
        dense = self._kernel.dense_weight()  # (C_out, K) int8, widened for 4-bit weights
        return pack_int4(dense) if self.weight_spec.packed else dense

    def _restore_weight_q(self) -> None:
        if self._buffers["weight_q"] is None:
            self._buffers["weight_q"] = self.integer_weight()

    @property
    def kernel_bytes(self) -> int:
        """Bytes of the integer kernel's own (prepacked) weight copy; 0 when none is held."""
        return 0 if self._kernel is None else self._kernel.nbytes

    def _drop_kernel(self) -> None:
        if self._kernel is not None:
            self._restore_weight_q()
        self._kernel, self._decision = None, None

    def _integer_forward(self, x: Tensor) -> Tensor | None:
        """The kernel's output, or None when this call must take the reference path."""
        if self.execution != "integer":
            return None
        self.execution_decision()
        if self._kernel is None:
            return None
        if not self._kernel.accepts(x):
            warnings.warn(
                f"{type(self).__name__} is in integer mode but got a {x.dtype} input on {x.device}"
                f"{' that needs gradients' if x.requires_grad else ''}: the int8 kernel takes "
                f"{self._kernel.requirement}, so this call runs the reference path",
                stacklevel=3,
            )
            return None
        return self._kernel(x, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.holds_weight_q:  # released in integer mode: the saved file is the same in either mode
            destination[prefix + "weight_q"] = self.integer_weight()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._drop_kernel()  # weight_q must be a buffer again to be loaded into
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._drop_kernel()  # moved or cast: rebuild from the buffers where they now are
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        # The packed oneDNN tensor cannot be copied or pickled; copies rebuild it on their first forward.
        state = self.__dict__.copy()
        state["_buffers"] = {**self._buffers, "weight_q": self.integer_weight()}
        state["_kernel"], state["_decision"] = None, None
        return state

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the integer weight stands for."""
        return dequantize_weight(
            self.integer_weight(), self.weight_scale, self.weight_zero_point, self.weight_spec, self.weight_shape
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
        y = self._integer_forward(x)
        return self.reference_forward(x) if y is None else y

    def reference_forward(self, x: Tensor) -> Tensor:
        """The fake-quant path: float op on the fake-quantized input and the dequantized weight."""
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
        y = self._integer_forward(x)
        return self.reference_forward(x) if y is None else y

    def reference_forward(self, x: Tensor) -> Tensor:
        """The fake-quant path: float conv of the fake-quantized input with the dequantized weight."""
        weight = self.dequantized_weight().to(x.dtype)
        return F.conv2d(
            self.quantize_input(x), weight, _cast(self.bias, x), self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


QUANTIZED_CLASSES: dict[str, type[QuantizedLayer]] = {"Linear": QuantizedLinear, "Conv2d": QuantizedConv2d}


def _cast(bias: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bias is None else bias.to(x.dtype)


@dataclass(frozen=True)
class LayerExecution:
    """One quantized layer's path after :func:`use_integer_kernels` / :func:`use_reference`.

    Attributes:
        name: qualified module name in the model.
        layer_type: ``Linear`` or ``Conv2d``.
        weights: the weight spec, described (``int8 sym channel minmax pair-safe``).
        path: ``"integer"`` or ``"reference"``.
        reason: why, e.g. ``"int8 oneDNN; pair-safe weights"`` or ``"reference: per-group weights ..."``.
        exact: the path computes what the reference computes (False: an allowed, saturating integer layer).
        widened: 4-bit weights widened to int8 for the kernel.
        stored_bytes: bytes of ``weight_q`` held now: 0 on the integer path, where the packed copy replaces it.
        kernel_bytes: bytes of the kernel's prepacked copy (integer path only).
    """

    name: str
    layer_type: str
    weights: str
    path: str
    reason: str
    exact: bool
    widened: bool
    stored_bytes: int
    kernel_bytes: int


@dataclass(frozen=True)
class ExecutionSummary:
    """Per-layer paths of a model, with what the CPU's int8 kernels can do (``support``).

    ``attention`` is the dtype its attention modules compute scaled-dot-product attention in
    (``"float32"``, ``"bfloat16"``: see :mod:`quantdiff.nn.attention`; None: no attention modules).
    """

    mode: str
    support: KernelSupport | None
    layers: tuple[LayerExecution, ...]
    attention: str | None = None

    @property
    def integer(self) -> tuple[LayerExecution, ...]:
        return tuple(layer for layer in self.layers if layer.path == "integer")

    @property
    def reference(self) -> tuple[LayerExecution, ...]:
        return tuple(layer for layer in self.layers if layer.path == "reference")

    @property
    def inexact(self) -> tuple[LayerExecution, ...]:
        return tuple(layer for layer in self.layers if not layer.exact)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "support": None if self.support is None else self.support.describe(),
            "integer_layers": len(self.integer),
            "reference_layers": len(self.reference),
            "stored_bytes": sum(layer.stored_bytes for layer in self.layers),
            "kernel_bytes": sum(layer.kernel_bytes for layer in self.layers),
            "attention": self.attention,
            "layers": [layer.__dict__.copy() for layer in self.layers],
        }

    def format(self, max_layers: int | None = None) -> str:
        """Plain text: one header line, then one line per layer (``name  path  reason``)."""
        lines = [
            f"{self.mode} mode: {len(self.integer)} of {len(self.layers)} quantized layers on the int8 kernel, "
            f"{len(self.reference)} on the reference path"
            + (f", {len(self.inexact)} INEXACT" if self.inexact else "")
            + (f" ({self.support.describe()})" if self.support is not None else "")
            + (f"; attention in {self.attention}" if self.attention is not None else "")
        ]
        width = max((len(layer.name) for layer in self.layers), default=0)
        shown = self.layers if max_layers is None else self.layers[:max_layers]
        lines += [f"  {layer.name:<{width}}  {layer.path:<9}  {layer.reason}" for layer in shown]
        if len(shown) < len(self.layers):
            lines.append(f"  ... {len(self.layers) - len(shown)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def use_integer_kernels(
    model: nn.Module, *, allow_inexact: bool = False, attention: str = "auto", backend: str = "auto"
) -> ExecutionSummary:
    """Switch ``model`` to its deployment path: each quantized layer on the int8 kernel where it can take it.

    Each layer's int8 weight is prepacked once here into the kernel's own copy, which replaces ``weight_q``
    (see :mod:`quantdiff.nn.kernels`); layers that cannot run the kernel keep the reference path, and the
    summary says why for each. Nothing saved changes: ``save_quantized`` writes the same file in either mode.

    Args:
        model: any module containing :class:`QuantizedLinear` / :class:`QuantizedConv2d` layers.
        allow_inexact: also run layers whose weights are not pair-safe on a CPU that saturates int16 pair
            sums (AVX2 without VNNI). Their results are wrong (14-46 dB per layer measured); a warning
            names them. Default: they stay on the reference path.
        attention: dtype of the attention modules' scaled-dot-product attention: ``"auto"`` (bf16 where the
            CPU computes bf16 natively, else fp32), ``"float32"`` or ``"bfloat16"``
            (:mod:`quantdiff.nn.attention`). :func:`use_reference` restores fp32.
        backend: ``"auto"`` (oneDNN on the CPU, ``torch._int_mm`` for layers on CUDA), ``"onednn"``, or
            ``"int_mm"`` on any device (:mod:`quantdiff.nn.int_mm`; on the CPU only a check of the GPU math).

    Returns:
        The per-layer :class:`ExecutionSummary`.
    """
    support = None if backend == "int_mm" else kernel_support()  # what the oneDNN path can do on this CPU
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device.type
    use_attention_dtype(model, resolve_attention(attention, device))
    summary = _switch(model, "integer", support, allow_inexact, backend)
    if summary.inexact:
        warnings.warn(
            f"{len(summary.inexact)} layer(s) run the int8 kernel although their weights are not pair-safe on "
            f"this CPU ({summary.support.describe()}); their outputs saturate and are wrong, e.g. "
            f"{summary.inexact[0].name}. Quantize with pair_safe weights (preset w8a8-int) instead.",
            stacklevel=2,
        )
    return summary


def use_reference(model: nn.Module) -> ExecutionSummary:
    """Switch every quantized layer of ``model`` back to the reference (fake-quant) path, attention to fp32;
    frees the kernels."""
    use_attention_dtype(model, "float32")
    return _switch(model, "reference", None, False)


def execution_summary(model: nn.Module) -> ExecutionSummary:
    """The current per-layer paths of ``model`` without switching anything."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]
    modes = {m.execution for _, m in layers}
    support = next((m._support for _, m in layers if m._support is not None), None)
    return ExecutionSummary(
        modes.pop() if len(modes) == 1 else "mixed",
        support,
        tuple(_describe(n, m) for n, m in layers),
        attention_dtype(model),
    )


def _switch(
    model: nn.Module, mode: str, support: KernelSupport | None, allow_inexact: bool, backend: str = "auto"
) -> ExecutionSummary:
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            module.set_execution(mode, support=support, allow_inexact=allow_inexact, backend=backend)
            layers.append(_describe(name, module))
    return ExecutionSummary(mode, support, tuple(layers), attention_dtype(model))


def _describe(name: str, module: QuantizedLayer) -> LayerExecution:
    decision = module.execution_decision()
    return LayerExecution(
        name=name,
        layer_type=type(module).__name__.removeprefix("Quantized"),
        weights=module.weight_spec.describe(),
        path=decision.path,
        reason=decision.reason,
        exact=decision.exact,
        widened=decision.widened,
        stored_bytes=module.weight_q.numel() * module.weight_q.element_size() if module.holds_weight_q else 0,
        kernel_bytes=module.kernel_bytes,
    )
