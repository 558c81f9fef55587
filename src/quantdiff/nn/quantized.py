"""Quantized Linear and Conv2d modules: integer weights in memory, calibrated input scales, layer extras.

``quantize.prepare`` swaps every planned ``nn.Linear`` / ``nn.Conv2d`` for one of these, and ``convert``
turns it into integers. A layer's life has two states:

* **prepared**: it holds the floating-point ``weight`` (the original parameter) and ``bias``, and computes
  exactly what the float layer computed, plus its extras. Algorithms work on this state: they may change
  the weight and add extras; calibration taps (:meth:`QuantizedLayer.register_input_tap`) see the input at
  the point where it will be quantized.
* **converted**: the floating-point weight is gone; the layer holds the tensors its plan declares
  (:meth:`quantdiff.plan.LayerPlan.stored_tensors`, stored layout in :mod:`quantdiff.nn.weights`):
  ``weight_q``, ``weight_scale``, ``weight_zero_point`` (asymmetric weights), ``input_scale`` /
  ``input_zero_point`` (quantized inputs), ``bias`` (float32), and its extras' tensors. Everything it
  computes comes from them, so a saved and reloaded layer computes bit-identically. A loading skeleton
  (:meth:`QuantizedLinear.like`) is an empty converted layer.

One forward serves every variant, in this order::

    x = x * input_pre_scale                          # extra "input_pre_scale" (channel balancing)
    y = layer(quantize(x, scale of this call), W)    # the integer kernel, or the reference path
    y = y + up(down(x))                              # extra "lowrank": a floating-point branch

The scale of a call is the static ``input_scale``, or with the extra ``timestep_groups`` the row of the
current timestep's group (read from the denoiser's :class:`~quantdiff.calibration.timestep.StepClock`).

Three execution modes share the converted buffers:

* ``"reference"`` (default): fake-quantizes the input with the stored scale and runs the float op on the
  dequantized weight. The ground truth: quality is measured on it, and it runs anywhere.
* ``"integer"``: the layer asks :func:`quantdiff.nn.kernels.select_kernel` for an int8 kernel, which computes
  the same integers exactly when the layer is eligible; layers that are not keep the reference path, each
  with the reason (:mod:`quantdiff.nn.execution` switches whole models and summarises).
* ``"auto"``: a layer eligible for the kernel takes, at its first call, whichever is faster on this CPU for
  that call's shape: the int8 kernel or the *float path* -- the reference math (same fake-quantized input)
  on a dequantized fp32 weight cached once, so its output is bit-identical to the reference path's. On
  small layers the kernel's fixed costs (quantizing the input, the call) outweigh what the integer math
  saves; on SD-sized layers the kernel wins. The float path holds its fp32 copy beside ``weight_q``
  (:attr:`QuantizedLayer.float_weight_bytes`). Timings are measured once per process per distinct shape
  (:data:`MEASURED_PATHS`), and each layer's decision says what was measured.

In integer mode the kernel's prepacked weight is the only copy held: ``weight_q`` is released (its buffer
is ``None``) and rebuilt bit for bit from the packed copy whenever something needs it -- ``state_dict`` /
saving, the reference fallback, ``.to()``, copying, or switching back -- so W8 holds 1 byte per weight in
either mode, not 2. :meth:`QuantizedLayer.integer_weight` reads it in either mode.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from quantdiff.errors import CalibrationError
from quantdiff.nn.inputs import InputQParams, dynamic_input_qparams, fake_quantize_dynamic_input
from quantdiff.nn.kernels import (
    ConvGeometry,
    KernelDecision,
    KernelInputs,
    KernelSupport,
    kernel_support,
    select_kernel,
)
from quantdiff.nn.kernels.packed import PackedKernel
from quantdiff.nn.weights import QuantizedWeight, dequantize_weight, quantize_weight
from quantdiff.plan import LayerPlan, TensorDecl
from quantdiff.primitives import (
    fake_quantize,
    integer_range,
    pack_int4,
    rotate_channels,
)
from quantdiff.recipe import TensorSpec

EXECUTION_MODES = ("auto", "integer", "reference")
_REFERENCE = KernelDecision("reference", "reference mode")
_PENDING = KernelDecision(
    "pending", "auto: the int8 kernel or the float path, whichever is faster, chosen at the first call"
)
# Tensors that conversion creates (the prepared layer holds the float weight instead).
_CONVERTED_TENSORS = ("weight_q", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


# The float path holds an extra fp32 copy of the weight: auto takes it only where it is this much faster.
FLOAT_MARGIN = 1.1


@dataclasses.dataclass(frozen=True)
class PathTiming:
    """Seconds per call of the int8 kernel and of the float path for one layer shape on this CPU (the
    fastest of ``calls`` alternating calls of each)."""

    kernel_seconds: float
    float_seconds: float
    calls: int

    @property
    def float_wins(self) -> bool:
        return self.float_seconds * FLOAT_MARGIN < self.kernel_seconds

    def describe(self) -> str:
        return f"float {self.float_seconds * 1e3:.3f} ms vs int8 kernel {self.kernel_seconds * 1e3:.3f} ms per call"


# Timings by everything a path's speed depends on (see QuantizedLayer._speed_key); the CPU is fixed within a
# process, so one measurement serves every layer of that shape, in every model switched to auto.
MEASURED_PATHS: dict[tuple, PathTiming] = {}
# A call of at least this many multiply-adds takes the kernel unmeasured. Why: the kernel's fixed cost per
# call (quantizing the input, the op's setup) is what small layers lose to; from a few MMAC up it is paid back
# (crossover at 1-5 MMAC on the 2-core Xeon, benchmarks/notes/execution-choice.md), and at SD sizes the
# kernel is 1.6-1.7x faster than fp32 (benchmarks/KERNELS.md). Timing such layers would cost several of their
# calls (tens of ms each) on the first step, and a loaded machine could mislead it.
KERNEL_WITHOUT_TIMING_MACS = 64_000_000
# Why these numbers: the minimum over alternating calls is the least disturbed estimate of each path on a
# shared machine (load hits both paths alike) and drops the first calls' one-off setup (oneDNN creates its
# primitive then). Layers below the threshold above take microseconds to about a millisecond a call: at least
# _MIN_CALLS each, then until _BUDGET_SECONDS are spent, at most _MAX_CALLS, cost a few ms per distinct shape.
_MIN_CALLS, _MAX_CALLS, _BUDGET_SECONDS = 3, 9, 0.01


@functools.cache
def fused_fake_quantize() -> Callable[[Tensor, float, int, int], Tensor] | None:
    """``(x, scale, low, high) -> clamp(round(x / scale) + 0, low, high) * scale`` in one pass, bit-identical to
    the float path's five torch ops (the packed kernels' C++ extension: ``quantdiff_packed::fake_quantize``), or
    None where the extension is not built (``packed_support().reason`` says why; the five ops then run)."""
    from quantdiff.nn.kernels.packed import packed_support

    return torch.ops.quantdiff_packed.fake_quantize.default if packed_support().dequantize else None


def _time_paths(run_kernel: Callable[[], Tensor], run_float: Callable[[], Tensor]) -> tuple[PathTiming, Tensor, Tensor]:
    """Time both paths on the same input (see _MIN_CALLS); returns the timing and each path's last output."""
    kernel_times: list[float] = []
    float_times: list[float] = []
    start = time.perf_counter()
    while len(kernel_times) < _MAX_CALLS:
        before = time.perf_counter()
        y_kernel = run_kernel()
        between = time.perf_counter()
        y_float = run_float()
        after = time.perf_counter()
        kernel_times.append(between - before)
        float_times.append(after - between)
        if len(kernel_times) >= _MIN_CALLS and after - start > _BUDGET_SECONDS:
            break
    return PathTiming(min(kernel_times), min(float_times), len(kernel_times)), y_kernel, y_float


class QuantizedLayer(nn.Module):
    """Shared state and forward of :class:`QuantizedLinear` / :class:`QuantizedConv2d` (see the module docstring).

    The integer kernel (``_kernel``) is a cache derived from the buffers: built when the layer is switched
    to integer mode, dropped whenever the buffers change (``set_weight``, ``set_input_qparams``,
    ``load_state_dict``, ``.to()``) or the module is copied, and rebuilt on the next forward.
    """

    def __init__(
        self,
        layer: LayerPlan,
        device: torch.device | str | None = None,
        *,
        float_weight: nn.Parameter | None = None,
        float_bias: nn.Parameter | None = None,
    ):
        """An empty converted layer of ``layer`` on ``device``, or with ``float_weight`` a prepared one."""
        super().__init__()
        if not layer.quantized:
            raise ValueError(f"layer {layer.name!r} stays in floating point: it has no quantized module")
        self.layer_plan = layer
        self.execution = "reference"  # see set_execution; a plain attribute, never saved
        self.step_clock = None  # the denoiser's StepClock, for layers with per-timestep tensors
        self._input_taps: OrderedDict[int, Callable[[Tensor], None]] = OrderedDict()
        self._allow_inexact = False
        self._backend = "auto"
        self._weight_only_dtype = torch.float32
        self._support: KernelSupport | None = None
        self._kernel = None
        self._decision: KernelDecision | None = None  # None: not decided since the last change
        self._eligible: KernelDecision | None = None  # auto mode: the kernel's own decision, for the reason
        self._float_weight: Tensor | None = None  # auto mode, float path: dequantized_weight(), cached
        self._float_fixed: tuple[float, int, int] | None = None  # float path: static (scale, low - z, high - z)
        self._call_table: list[tuple[float, int]] | None = None  # input qparams (per group) as Python numbers
        declared = layer.stored_tensors()
        if float_weight is None:  # a skeleton: every declared tensor, to be loaded into
            for name, decl in declared.items():
                self._store(name, decl.empty(device), decl)
        else:
            self.weight = float_weight
            self.bias = float_bias
            for name, decl in declared.items():  # extras a plan already had (normally added later)
                if name not in _CONVERTED_TENSORS and name != "bias":
                    self._store(name, decl.empty(float_weight.device), decl)
        for name in ("weight_zero_point", "bias"):
            if not hasattr(self, name):
                setattr(self, name, None)

    # ------------------------------------------------------------------------------------ plan and tensors
    @property
    def weight_spec(self) -> TensorSpec:
        return self.layer_plan.weights

    @property
    def input_spec(self) -> TensorSpec | None:
        return self.layer_plan.activations

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size(self.layer_plan.weight_shape)

    @property
    def extras(self) -> Mapping[str, Mapping]:
        return self.layer_plan.extras

    @property
    def is_prepared(self) -> bool:
        """True until :meth:`convert`: the layer holds and computes with its floating-point weight."""
        return self._parameters.get("weight") is not None

    def _store(self, name: str, tensor: Tensor, decl: TensorDecl) -> None:
        if tuple(tensor.shape) != decl.shape or tensor.dtype != decl.dtype:
            raise ValueError(
                f"layer {self.layer_plan.name!r}: {name} is {tuple(tensor.shape)} {tensor.dtype}, its plan "
                f"declares {decl.shape} {decl.dtype}"
            )
        if name in self.__dict__ and name not in self._buffers and name not in self._parameters:
            del self.__dict__[name]  # a placeholder None (see __init__)
        if decl.parameter:
            self._parameters.pop(name, None)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        else:
            self._buffers.pop(name, None)
            self.register_buffer(name, tensor)

    def set_layer_plan(self, layer: LayerPlan, tensors: Mapping[str, Tensor] | None = None) -> None:
        """Adopt a changed plan entry (new specs while prepared, or new extras with their ``tensors``).

        Every tensor the new plan declares and the layer does not hold yet must be given; each is checked
        against its declaration.
        """
        current = self.layer_plan
        if (layer.name, layer.layer_type, layer.weight_shape) != (
            current.name,
            current.layer_type,
            current.weight_shape,
        ):
            raise ValueError(f"plan entry {layer.name!r} describes another layer than {current.name!r}")
        if not self.is_prepared and (layer.weights, layer.activations) != (current.weights, current.activations):
            raise ValueError(f"layer {layer.name!r} is converted: its specs can no longer change")
        if "lowrank" in layer.extras and getattr(self, "groups", 1) != 1:
            raise ValueError(f"layer {layer.name!r}: a low-rank branch needs a convolution with one group")
        tensors = dict(tensors or {})
        for name, decl in layer.stored_tensors().items():
            if name in tensors:
                # contiguous, as loading gives: a strided copy (SVD factors) would take other kernels and
                # round differently from the reloaded layer
                stored = tensors.pop(name).detach().to(device=self.tensor_device())
                self._store(name, stored.clone(memory_format=torch.contiguous_format), decl)
            elif not (self.is_prepared and name in _CONVERTED_TENSORS) and name != "bias" and not self._holds(name):
                raise ValueError(f"layer {layer.name!r}: its plan declares {name!r}: pass the tensor")
        if tensors:
            raise ValueError(f"layer {layer.name!r}: tensors {sorted(tensors)} are not declared by its plan")
        self.layer_plan = layer
        self._drop_kernel()

    def _holds(self, name: str) -> bool:
        return name in self._buffers or self._parameters.get(name) is not None

    def tensor_device(self) -> torch.device:
        """The device the layer's tensors live on."""
        reference = self.weight if self.is_prepared else self.weight_scale
        return reference.device

    # ------------------------------------------------------------------------------------------ taps
    def register_input_tap(self, tap: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``tap(x)`` with every input at the point where it is (or will be) quantized, i.e. after the
        input pre-scale. Returns a handle; whoever registers a tap removes it (``handle.remove()``)."""
        handle = RemovableHandle(self._input_taps)
        self._input_taps[handle.id] = tap
        return handle

    # ---------------------------------------------------------------------------------------- conversion
    def convert(self, weight: QuantizedWeight | None = None, input_qparams: InputQParams | None = None) -> None:
        """Prepared -> converted: store the integer weight (``weight``, or the float weight rounded to
        nearest) and the input quantization, and drop the floating-point weight."""
        if not self.is_prepared:
            raise RuntimeError(f"layer {self.layer_plan.name!r} is already converted")
        if self.layer_plan.static_input and input_qparams is None:
            raise CalibrationError(f"no input scale for layer {self.layer_plan.name!r}: calibrate before converting")
        float_weight = self._parameters.pop("weight")
        if weight is None:
            weight = quantize_weight(float_weight.detach(), self.weight_spec)
        declared = self.layer_plan.stored_tensors()
        device = float_weight.device
        for name, tensor in zip(QuantizedWeight._fields, weight, strict=True):
            if tensor is not None:
                self._store(name, tensor.to(device), declared[name])
        if self.bias is not None:
            self._store("bias", self.bias.detach().float().clone(), declared["bias"])
        if self.layer_plan.static_input:
            self.set_input_qparams(*input_qparams)
        self._drop_kernel()

    def set_weight(self, weight: Tensor) -> None:
        """Quantize (round to nearest) and store a floating-point weight of this layer's shape."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} != layer shape {tuple(self.weight_shape)}")
        if self.is_prepared:
            raise RuntimeError("a prepared layer holds its float weight: change it, then convert()")
        device = self.weight_scale.device  # weight_q may be released to the kernel: see integer_weight()
        declared = self.layer_plan.stored_tensors()
        for name, tensor in zip(QuantizedWeight._fields, quantize_weight(weight, self.weight_spec), strict=True):
            if tensor is not None:
                self._store(name, tensor.to(device), declared[name])
        self._drop_kernel()

    def set_input_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Store the calibrated input scale and zero point (0-d, or one per timestep group)."""
        if not self.layer_plan.static_input:
            raise ValueError("this layer has no stored input scale (floating-point or dynamic inputs)")
        declared = self.layer_plan.stored_tensors()
        device = self.tensor_device()
        shape = declared["input_scale"].shape
        self._store("input_scale", scale.detach().reshape(shape).float().to(device), declared["input_scale"])
        self._store(
            "input_zero_point",
            zero_point.detach().reshape(shape).to(torch.int32).to(device),
            declared["input_zero_point"],
        )
        self._drop_kernel()

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        x = self.balanced_input(x)
        for tap in tuple(self._input_taps.values()):
            tap(x)
        if self.is_prepared:
            y = self._op(x, self.weight, self.bias)
        else:
            y = self._fast_forward(x)
            if y is None:
                y = self._reference_op(x)
        return self._with_branch(y, x)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The fake-quant path: the float op on the fake-quantized input and the dequantized weight."""
        x = self.balanced_input(x)
        return self._with_branch(self._reference_op(x), x)

    def _reference_op(self, x: Tensor) -> Tensor:
        return self._op(self.quantize_input(x), self.dequantized_weight().to(x.dtype), _cast(self.bias, x))

    def balanced_input(self, x: Tensor) -> Tensor:
        """The input as the layer quantizes it: times the channel-balancing pre-scale, then rotated, where the
        layer has those extras (identity otherwise)."""
        if "input_pre_scale" in self.extras:
            x = x * self._per_channel(self.input_pre_scale.to(x.dtype))
        if "input_rotation" in self.extras:
            x = rotate_channels(x, self._channel_dim(x), self.extras["input_rotation"]["block"])
        return x

    def _with_branch(self, y: Tensor, x: Tensor) -> Tensor:
        if "lowrank" not in self.extras:
            return y
        return y + self._branch(x, self.lowrank_down.to(x.dtype), self.lowrank_up.to(x.dtype))

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The float op of the layer (``F.linear`` / ``F.conv2d`` with its geometry)."""
        raise NotImplementedError

    def _branch(self, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
        """``up(down(x))``: the low-rank branch on the (pre-scaled) floating-point input."""
        raise NotImplementedError

    def _per_channel(self, vector: Tensor) -> Tensor:
        """``vector`` ``(C_in,)`` shaped to broadcast over the input's channel dimension."""
        raise NotImplementedError

    def call_input_qparams(self, x: Tensor) -> InputQParams:
        """The input scale and zero point of this call: the static pair, the current timestep group's, or
        (dynamic inputs) computed from ``x``: per tensor, per token / pixel, or per token / pixel and channel group
        (shaped to broadcast over ``x``)."""
        spec = self.input_spec
        if spec.dynamic:
            return dynamic_input_qparams(x, self._channel_dim(x), spec)
        if "input_split" in self.extras:  # one pair per part, laid out per channel
            sizes = self._split_sizes(x)
            scale = self._per_channel(self.input_scale.repeat_interleave(sizes))  # (C_in, ...) broadcasts over x
            return InputQParams(scale, self._per_channel(self.input_zero_point.repeat_interleave(sizes)))
        if "timestep_groups" not in self.extras:
            return InputQParams(self.input_scale, self.input_zero_point)
        group = self.timestep_group()
        return InputQParams(self.input_scale[group], self.input_zero_point[group])

    def _channel_dim(self, x: Tensor) -> int:
        """The input's channel dimension (Linear: last; Conv2d: the C of (N, C, H, W) or (C, H, W))."""
        raise NotImplementedError

    def _macs_per_call(self, x: Tensor) -> int:
        """Multiply-adds of the layer's op on ``x``."""
        raise NotImplementedError

    def _split_sizes(self, x: Tensor) -> Tensor:
        at = self.extras["input_split"]["at"]
        return torch.tensor([at, x.shape[self._channel_dim(x)] - at], device=self.input_scale.device)

    def timestep_group(self) -> int:
        """Index of the group of the denoiser's current timestep.

        Group ``g`` holds the timesteps ``t`` with ``edges[g-1] <= t < edges[g]``; timesteps outside the
        calibrated range take the first or the last group.
        """
        clock = self.step_clock
        if clock is None or clock.timestep is None:
            raise RuntimeError(
                f"layer {self.layer_plan.name!r} has per-timestep input scales but no current timestep: load the "
                "model with quantdiff (load_quantized_denoiser), or call "
                "quantdiff.calibration.timestep.attach_step_clock(denoiser)"
            )
        return bisect.bisect_right(self.timestep_edges.tolist(), clock.timestep)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with this call's input scale (identity for weight-only layers)."""
        spec = self.input_spec
        if spec is None:
            return x
        if spec.dynamic:
            return fake_quantize_dynamic_input(x, self._channel_dim(x), spec)
        scale, zero_point = self.call_input_qparams(x)
        return fake_quantize(x, scale, zero_point, spec.bits, spec.symmetric)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the integer weight stands for (the float weight itself while prepared)."""
        if self.is_prepared:
            return self.weight.detach().float()
        return dequantize_weight(
            self.integer_weight(), self.weight_scale, self.weight_zero_point, self.weight_spec, self.weight_shape
        )

    # ------------------------------------------------------------------------------------ execution mode
    def set_execution(
        self,
        mode: str,
        *,
        support: KernelSupport | None = None,
        allow_inexact: bool = False,
        backend: str = "auto",
        weight_only_dtype: torch.dtype = torch.float32,
    ) -> KernelDecision:
        """Choose the reference or the integer path; returns which path the layer will take and why.

        Args:
            mode: ``"reference"``, ``"integer"`` or ``"auto"`` (the faster of the kernel and the float path,
                measured at the first call: see the module docstring).
            support: from :func:`quantdiff.nn.kernels.kernel_support` (computed here when needed).
            allow_inexact: in integer mode, run the kernel even where it can saturate (weights that are not
                pair-safe on a CPU without VNNI): faster, but wrong. Default: such layers keep the reference.
            backend: ``"auto"`` or a backend of :data:`quantdiff.nn.kernels.BACKENDS` (``"onednn"``,
                ``"int_mm"``).
            weight_only_dtype: the dtype a weight-only layer's float op may run in (bfloat16: only where the
                CPU computes it natively; float32: bit-identical to the reference path).
        """
        if mode not in EXECUTION_MODES:
            raise ValueError(f"execution mode {mode!r} is unknown: use one of {', '.join(EXECUTION_MODES)}")
        if self.is_prepared:
            raise RuntimeError(f"layer {self.layer_plan.name!r} is not converted yet: it has no integer weights")
        self.execution = mode
        self._allow_inexact = allow_inexact
        self._support = support
        self._backend = backend
        self._weight_only_dtype = weight_only_dtype
        self._drop_kernel()
        return self.execution_decision()

    def execution_decision(self) -> KernelDecision:
        """The path this layer takes now (builds the kernel if integer mode needs it). In auto mode a layer the
        kernel can take is ``"pending"`` until its first call measures which path is faster."""
        if self.execution == "reference":
            return _REFERENCE
        if self._decision is None:
            if self._support is None and self._backend != "int_mm" and self.weight_q.device.type == "cpu":
                self._support = kernel_support()
            if self.execution == "integer":
                self._decision = self._build_kernel()
            else:
                _, self._eligible = select_kernel(
                    self.kernel_inputs(),
                    self._backend,
                    support=self._support,
                    allow_inexact=self._allow_inexact,
                    build=False,
                )
                self._decision = _PENDING if self._eligible.path == "integer" else self._eligible
        return self._decision

    def _build_kernel(self) -> KernelDecision:
        self._kernel, decision = select_kernel(
            self.kernel_inputs(), self._backend, support=self._support, allow_inexact=self._allow_inexact
        )
        if self._kernel is not None:
            self._buffers["weight_q"] = None  # the kernel's copy holds it now: see integer_weight()
        return decision

    def kernel_inputs(self) -> KernelInputs:
        """What a kernel is built from (:class:`~quantdiff.nn.kernels.KernelInputs`)."""
        quantized_input = self.layer_plan.static_input
        return KernelInputs(
            weight_q=self.integer_weight(),
            weights=self.weight_spec,
            weight_shape=self.weight_shape,
            weight_scale=self.weight_scale,
            activations=self.input_spec,
            input_scale=self.input_scale if quantized_input else None,
            input_zero_point=self.input_zero_point if quantized_input else None,
            conv=ConvGeometry.of(self) if isinstance(self, QuantizedConv2d) else None,
            input_split=self.extras.get("input_split", {}).get("at"),
            per_call_input_scale="timestep_groups" in self.extras
            or (self.input_spec is not None and self.input_spec.dynamic and self.input_spec.granularity == "tensor"),
            float_dtype=self._weight_only_dtype,
        )

    @property
    def holds_weight_q(self) -> bool:
        """False while the integer kernel's packed copy is the only copy of the weight (and while prepared)."""
        return self._buffers.get("weight_q") is not None

    def integer_weight(self) -> Tensor:
        """The stored integer weight (``weight_q``'s layout), rebuilt from the kernel while it is released."""
        stored = self._buffers.get("weight_q")
        if stored is not None:
            return stored
        if self._kernel is None:
            raise RuntimeError(f"layer {self.layer_plan.name!r} is not converted yet: it has no integer weight")
        dense = self._kernel.dense_weight()  # (C_out, K) int8, widened for 4-bit weights
        return pack_int4(dense) if self.weight_spec.packed else dense

    @property
    def kernel_bytes(self) -> int:
        """Bytes of the integer kernel's own (prepacked) weight copy; 0 when none is held."""
        return 0 if self._kernel is None else self._kernel.nbytes

    @property
    def float_weight_bytes(self) -> int:
        """Bytes of the float path's fp32 weight copy (auto mode, held beside ``weight_q``); 0 when none is held."""
        weight = self._float_weight
        return 0 if weight is None else weight.numel() * weight.element_size()

    def _drop_kernel(self) -> None:
        if self._kernel is not None:
            self._buffers["weight_q"] = self.integer_weight()
        self._kernel, self._decision, self._call_table = None, None, None
        self._eligible, self._float_weight, self._float_fixed = None, None, None

    def _fast_forward(self, x: Tensor) -> Tensor | None:
        """The kernel's or the float path's output, or None when this call must take the reference path."""
        if self.execution == "reference":
            return None
        decision = self.execution_decision()
        if decision.path == "pending":
            return self._choose_path(x)
        if decision.path == "float":
            return self._float_op(x)
        if self._kernel is None:
            return None
        if not self._kernel.accepts(x):
            warnings.warn(
                f"{type(self).__name__} is in {self.execution} mode but got a {x.dtype} input on {x.device}"
                f"{' that needs gradients' if x.requires_grad else ''}: the int8 kernel takes "
                f"{self._kernel.requirement}, so this call runs the reference path",
                stacklevel=3,
            )
            return None
        return self._kernel_op(x)

    def _kernel_op(self, x: Tensor) -> Tensor:
        return self._kernel(x, self.bias, self._kernel_call_qparams(x))

    # ---------------------------------------------------------------------- auto mode: the faster path
    def _float_op(self, x: Tensor) -> Tensor:
        """The float path: exactly the reference op, on the cached dequantized weight."""
        fixed = self._float_fixed
        if fixed is not None and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled()):
            # the common case with its numbers looked up once: small layers pay per Python step (see below)
            scale, low, high = fixed
            fused = fused_fake_quantize()
            if fused is not None:  # one pass of the C++ extension instead of five dispatches
                return self._op(fused(x, scale, low, high), self._float_weight, self.bias)
            q = x / scale  # (..., like x)
            return self._op(q.round_().add_(0.0).clamp_(low, high).mul_(scale), self._float_weight, self.bias)
        return self._op(self._fast_quantized_input(x), self._float_weight.to(x.dtype), _cast(self.bias, x))

    def _fast_quantized_input(self, x: Tensor) -> Tensor:
        """:meth:`quantize_input`, bit for bit, in fewer passes where the call's scale is one number."""
        spec = self.input_spec
        if (
            spec is None
            or spec.dynamic
            or "input_split" in self.extras
            or x.dtype != torch.float32
            or (x.requires_grad and torch.is_grad_enabled())  # in-place rounding would lose the STE gradient
        ):
            return self.quantize_input(x)
        scale, zero_point = self._input_scalars()
        low, high = integer_range(spec.bits, spec.symmetric)
        # clamp(round(x / s) + z, low, high) - z equals clamp(round(x / s), low - z, high - z): small integers
        # are exact in float32. "+ 0.0" turns round's -0.0 into +0.0 as the reference's "+ z" does, so the
        # bits match too. One temporary, then in place: 5 passes instead of about 10 with their temporaries
        # (on a 64-channel layer of the digits model: 12 us instead of 39 us, the op itself 13-120 us).
        y = x / scale  # (..., like x)
        return y.round_().add_(0.0).clamp_(low - zero_point, high - zero_point).mul_(scale)

    def _input_scalars(self) -> tuple[float, int]:
        """This call's static input scale and zero point as Python numbers (the timestep group's, if any)."""
        if self._call_table is None:  # Python numbers once: no .item() per call
            scales, zero_points = self.input_scale.reshape(-1).tolist(), self.input_zero_point.reshape(-1).tolist()
            self._call_table = list(zip(scales, zero_points, strict=True))
        return self._call_table[self.timestep_group() if "timestep_groups" in self.extras else 0]

    def _speed_key(self, x: Tensor) -> tuple:
        """What the two paths' speeds depend on: the op and its shapes, the input's quantization, the backend
        and the threads (the CPU itself is fixed within a process)."""
        return (
            type(self).__name__,
            tuple(self.weight_shape),
            ConvGeometry.of(self) if isinstance(self, QuantizedConv2d) else None,
            tuple(x.shape),
            x.dtype,
            None if self.input_spec is None else self.input_spec.describe(),  # weight-only, or bits, symmetry, ...
            self.weight_spec.packed,
            self.extras.get("input_split", {}).get("at"),
            "timestep_groups" in self.extras,
            self._backend,
            torch.get_num_threads(),
        )

    def _choose_path(self, x: Tensor) -> Tensor:
        """First call in auto mode: settle on the faster path for ``x``'s shape (measured here, or known from
        a layer of the same shape) and return this call's output from it."""
        shape = "x".join(map(str, x.shape))
        key = self._speed_key(x)
        timing = MEASURED_PATHS.get(key)
        if timing is not None and timing.float_wins:
            self._take_float_path(f"float: {timing.describe()} at input {shape} (same shape measured before)")
            return self._float_op(x)
        eligible = self._eligible
        self._build_kernel()
        macs = self._macs_per_call(x)
        if timing is None and macs >= KERNEL_WITHOUT_TIMING_MACS:
            self._decision = dataclasses.replace(
                eligible,
                reason=f"{eligible.reason}; {macs / 1e6:.0f} MMAC per call at input {shape}: large enough for the "
                f"kernel to win without timing (from {KERNEL_WITHOUT_TIMING_MACS / 1e6:.0f} MMAC)",
            )
            return self._fast_forward(x)
        if not self._kernel.accepts(x):
            self._take_float_path(
                f"float: the int8 kernel takes {self._kernel.requirement}, the first call was {x.dtype} on {x.device}"
            )
            return self._float_op(x)
        y_kernel = y_float = None
        if timing is None:
            self._float_weight = self.dequantized_weight()  # (C_out, C_in / groups, ...) fp32
            self._float_fixed = self._float_constants()  # time the float path as it would run
            timing, y_kernel, y_float = _time_paths(lambda: self._kernel_op(x), lambda: self._float_op(x))
            MEASURED_PATHS[key] = timing
            measured = f"{timing.calls} calls each"
        else:
            measured = "same shape measured before"
        if timing.float_wins:
            self._take_float_path(f"float: {timing.describe()} at input {shape} ({measured})")
            return y_float
        self._float_weight = self._float_fixed = None
        self._decision = dataclasses.replace(
            eligible, reason=f"{eligible.reason}; faster here: {timing.describe()} at input {shape} ({measured})"
        )
        return y_kernel if y_kernel is not None else self._kernel_op(x)

    def _float_constants(self) -> tuple[float, int, int] | None:
        """The float path's input quantization as Python numbers, where it is one static scale."""
        spec = self.input_spec
        if spec is None or not self.layer_plan.static_input or {"input_split", "timestep_groups"} & set(self.extras):
            return None
        low, high = integer_range(spec.bits, spec.symmetric)
        scale, zero_point = self._input_scalars()
        return scale, low - zero_point, high - zero_point

    def _take_float_path(self, reason: str) -> None:
        if self._float_weight is None:
            self._float_weight = self.dequantized_weight()  # (C_out, C_in / groups, ...) fp32
        self._float_fixed = self._float_constants()
        if self._kernel is not None:  # the float path keeps weight_q: take it back from the kernel
            self._buffers["weight_q"] = self.integer_weight()
            self._kernel = None
        self._decision = KernelDecision("float", reason)

    def _kernel_call_qparams(self, x: Tensor) -> tuple[float, int] | None:
        """This call's input scale and zero point as Python numbers, where they change per call (the kernel
        holds the static ones, and computes per-token ones itself)."""
        spec = self.input_spec
        if spec is None:  # weight-only: the kernel takes the input as it is
            return None
        if spec.dynamic and spec.granularity == "tensor":
            scale, zero_point = self.call_input_qparams(x)
            return float(scale), int(zero_point)
        if "timestep_groups" in self.extras:
            if self._call_table is None:  # Python numbers once per kernel: no .item() per call
                self._call_table = list(zip(self.input_scale.tolist(), self.input_zero_point.tolist(), strict=True))
            return self._call_table[self.timestep_group()]
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.is_prepared and not self.holds_weight_q:  # released: the file is the same in either mode
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
        if self._kernel is not None:
            state["_buffers"] = {**self._buffers, "weight_q": self.integer_weight()}
        state["_kernel"], state["_decision"], state["_call_table"] = None, None, None
        state["_eligible"], state["_float_weight"], state["_float_fixed"] = None, None, None
        return state

    def extra_repr(self) -> str:
        act = self.input_spec.describe() if self.input_spec else "fp"
        state = ", prepared" if self.is_prepared else ""
        extras = f", extras={sorted(self.extras)}" if self.extras else ""
        return (
            f"weight={tuple(self.weight_shape)} [{self.weight_spec.describe()}], input=[{act}], "
            f"bias={self.bias is not None}{extras}{state}"
        )


class QuantizedLinear(QuantizedLayer):
    """``nn.Linear`` with integer weights; see the module docstring for the stored tensors."""

    @classmethod
    def like(cls, linear: nn.Linear, layer: LayerPlan) -> QuantizedLinear:
        """An empty converted module with ``linear``'s geometry and device (on meta: a loading skeleton)."""
        return cls(layer, linear.weight.device)

    @classmethod
    def prepared(cls, linear: nn.Linear, layer: LayerPlan) -> QuantizedLinear:
        """A prepared module that holds ``linear``'s own weight and bias parameters."""
        return cls(layer, float_weight=linear.weight, float_bias=linear.bias)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _branch(self, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
        return F.linear(F.linear(x, down), up)  # (..., C_in) -> (..., r) -> (..., C_out)

    def _per_channel(self, vector: Tensor) -> Tensor:
        return vector  # (C_in,) broadcasts over (..., C_in)

    def _channel_dim(self, x: Tensor) -> int:
        return -1

    def _macs_per_call(self, x: Tensor) -> int:
        return x.numel() * int(self.weight_shape[0])  # tokens x C_in x C_out


class QuantizedConv2d(QuantizedLayer):
    """``nn.Conv2d`` with integer weights; see the module docstring for the stored tensors."""

    # Set by use_activation_layout (quantdiff.nn.execution): the packed kernel returns its channels-last output
    # as it is, with no copy back to NCHW. A class default, so modules pickled before it existed have it too.
    channels_last_output = False

    def __init__(self, layer: LayerPlan, device=None, *, stride=1, padding=0, dilation=1, groups=1, **kwargs):
        super().__init__(layer, device, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @staticmethod
    def _geometry(conv: nn.Conv2d) -> dict:
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d with padding_mode={conv.padding_mode!r} cannot be quantized yet")
        return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}

    @classmethod
    def like(cls, conv: nn.Conv2d, layer: LayerPlan) -> QuantizedConv2d:
        """An empty converted module with ``conv``'s geometry and device."""
        return cls(layer, conv.weight.device, **cls._geometry(conv))

    @classmethod
    def prepared(cls, conv: nn.Conv2d, layer: LayerPlan) -> QuantizedConv2d:
        """A prepared module that holds ``conv``'s own weight and bias parameters."""
        return cls(layer, float_weight=conv.weight, float_bias=conv.bias, **cls._geometry(conv))

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _kernel_op(self, x: Tensor) -> Tensor:
        if self.channels_last_output and isinstance(self._kernel, PackedKernel):
            # the kernel's output is channels-last already: no copy back to NCHW (the model keeps its
            # activations channels-last, see quantdiff.nn.execution.use_activation_layout)
            return self._kernel(x, self.bias, self._kernel_call_qparams(x), channels_last=True)
        return super()._kernel_op(x)

    def _branch(self, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
        hidden = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)  # (N, r, H', W')
        return F.conv2d(hidden, up[:, :, None, None])  # (N, C_out, H', W')

    def _per_channel(self, vector: Tensor) -> Tensor:
        return vector[:, None, None]  # (C_in, 1, 1) broadcasts over (N, C_in, H, W) and (C_in, H, W)

    def _channel_dim(self, x: Tensor) -> int:
        return -3

    def _macs_per_call(self, x: Tensor) -> int:
        stride = ConvGeometry.of(self).stride
        pixels_out = x.numel() // x.shape[-3] // (stride[0] * stride[1])  # N x H' x W', about
        return pixels_out * math.prod(self.weight_shape)  # x C_out x C_in / groups x kh x kw

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


QUANTIZED_CLASSES: dict[str, type[QuantizedLayer]] = {"Linear": QuantizedLinear, "Conv2d": QuantizedConv2d}


def _cast(bias: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bias is None else bias.to(x.dtype)
