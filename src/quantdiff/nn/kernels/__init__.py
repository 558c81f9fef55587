"""Integer kernels of quantized layers: what a kernel is built from, the backends, and the choice between them.

A quantized layer in integer mode asks :func:`select_kernel` for a kernel. The layer describes itself as a
:class:`KernelInputs` (its stored integers, scales, specs and conv geometry: a named structure, shared by
every backend); the backend registered under the requested name (:data:`BACKENDS`) answers with a
:class:`KernelDecision` (the path, and the reason for it, every reason when it is a fallback) and, on the
integer path, builds the kernel. A kernel is a plain object: ``kernel(x, bias)`` computes the layer from a
floating-point input, ``accepts(x)`` says whether an input is one it computes like the reference path, and
``dense_weight()`` gives back the int8 weight bit for bit (the layer releases its own copy to the kernel).

Backends:

* ``"onednn"`` (:mod:`quantdiff.nn.kernels.onednn`): oneDNN's int8 conv / linear on x86 CPUs;
* ``"int_mm"`` (:mod:`quantdiff.nn.kernels.int_mm`): ``torch._int_mm`` int8 GEMM, the CUDA path (its math
  also runs, slowly, on the CPU, which is how the tests check it);
* ``"packed"`` (:mod:`quantdiff.nn.kernels.packed`): 4-bit and per-group weights kept packed, on AMX int8
  tiles, and weight-only layers dequantized per call into a reused buffer (a C++ extension built on first use).

``"auto"`` picks ``int_mm`` for weights on CUDA; on the CPU ``packed`` for 4-bit, per-group and weight-only
layers where it can take them (else ``onednn``, with packed's reason), and on AMX CPUs for int8 layers with one
input scale per call too (faster eager; compiled, ``onednn`` is: see ``PackedBackend.claims``); ``onednn`` for
the others. A new
backend is one module with a class that has ``name``, ``decide(inputs, support, allow_inexact)`` and
``build(inputs)``, registered with :func:`register_backend` at the bottom of this file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from quantdiff.primitives import unpack_int4
from quantdiff.recipe import TensorSpec


@dataclass(frozen=True)
class KernelDecision:
    """Which path one layer takes in integer mode, and why.

    Attributes:
        path: ``"integer"`` (a kernel) or ``"reference"`` (fake-quant forward); in auto execution also
            ``"float"`` (the reference math on a cached floating-point weight: faster than the kernel for
            this layer on this CPU) and ``"pending"`` (eligible for the kernel, measured at the first call).
        reason: one line for reports, e.g. ``"int8 oneDNN; pair-safe weights"`` or
            ``"reference: per-group weights (group128) ..."``.
        exact: the path computes what the reference computes (up to fp32 rounding of the rescale);
            False only for an integer layer that can saturate and was allowed to run anyway. (A weight-only
            layer has no integers to match: its reason names the dtype its float op runs in.)
        widened: the stored 4-bit weight is widened to int8 for the kernel.
    """

    path: str
    reason: str
    exact: bool = True
    widened: bool = False


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a convolution, as ``nn.Conv2d`` holds them."""

    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, conv: Any) -> ConvGeometry:
        """The geometry of an ``nn.Conv2d`` or ``QuantizedConv2d``."""
        padding = conv.padding if isinstance(conv.padding, str) else tuple(int(p) for p in _pair(conv.padding))
        return cls(
            tuple(int(s) for s in _pair(conv.stride)),
            padding,
            tuple(int(d) for d in _pair(conv.dilation)),
            int(conv.groups),
        )

    def is_pointwise(self, weight_shape: torch.Size) -> bool:
        """A 1x1 convolution with stride 1, no padding and one group: a Linear over pixels."""
        no_padding = self.padding in ("valid", "same") or all(p == 0 for p in self.padding)
        return tuple(weight_shape[2:]) == (1, 1) and self.stride == (1, 1) and self.groups == 1 and no_padding

    def explicit_padding(self, kernel_size: tuple[int, ...]) -> tuple[int, int] | None:
        """Padding as two numbers (``"valid"`` / ``"same"`` resolved); None when it would be asymmetric."""
        if not isinstance(self.padding, str):
            return self.padding
        totals = [d * (k - 1) for k, d in zip(kernel_size, self.dilation, strict=True)]
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same" and all(t % 2 == 0 for t in totals):
            return (totals[0] // 2, totals[1] // 2)
        return None


@dataclass(frozen=True)
class KernelInputs:
    """Everything a kernel is built from: one layer's stored integers, scales, specs and conv geometry.

    Attributes:
        weight_q: the stored integer weight ``(C_out, K)`` (or packed 4-bit ``(C_out, ceil(K/2))``).
        weights: the weight spec.
        weight_shape: the float weight's shape ``(C_out, C_in / groups, ...)``.
        weight_scale: ``(C_out, G)`` or ``(1, 1)`` float32.
        activations: the input spec; ``None`` for weight-only layers.
        input_scale, input_zero_point: the stored input quantization (0-d, or one per timestep group);
            ``None`` for weight-only and dynamic inputs.
        conv: the convolution's geometry; ``None`` for a Linear.
        per_call_input_scale: the input scale changes from call to call (per timestep group, or dynamic per
            tensor): the layer passes each call's ``(scale, zero_point)`` to the kernel.
        input_split: the input is ``cat([a, b])`` along channels with one scale per part (``input_scale``
            ``(2,)``); ``at`` is the number of channels of ``a``.
        float_dtype: the dtype a weight-only layer's float op may run in: ``torch.bfloat16`` where the caller
            allows it (``use_integer_kernels(weight_only=...)``), else float32, exact.
    """

    weight_q: Tensor
    weights: TensorSpec
    weight_shape: torch.Size
    weight_scale: Tensor
    activations: TensorSpec | None
    input_scale: Tensor | None
    input_zero_point: Tensor | None
    conv: ConvGeometry | None
    per_call_input_scale: bool = False
    input_split: int | None = None
    float_dtype: torch.dtype = torch.float32

    @property
    def c_out(self) -> int:
        return int(self.weight_shape[0])

    @property
    def reduction_size(self) -> int:
        return math.prod(self.weight_shape[1:])

    def int8_weight(self) -> Tensor:
        """The stored weight as int8 ``(C_out, K)``: 4-bit weights unpacked (widened), int8 as is."""
        if self.weights.packed:
            return unpack_int4(self.weight_q, self.reduction_size, signed=True)
        return self.weight_q


class Kernel(Protocol):
    """What a backend builds for one layer (see the module docstring)."""

    requirement: str

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor: ...

    def accepts(self, x: Tensor) -> bool: ...

    def dense_weight(self) -> Tensor: ...

    @property
    def nbytes(self) -> int: ...


class KernelBackend(Protocol):
    """A family of integer kernels: decides per layer and builds."""

    name: str

    def decide(self, inputs: KernelInputs, support: Any, allow_inexact: bool) -> KernelDecision: ...

    def build(self, inputs: KernelInputs) -> Kernel: ...


BACKENDS: dict[str, KernelBackend] = {}


def register_backend(backend: KernelBackend) -> KernelBackend:
    """Make ``backend`` selectable by its name (``use_integer_kernels(model, backend=name)``)."""
    BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """``"auto"`` and every registered backend."""
    return ("auto", *BACKENDS)


def shared_blockers(inputs: KernelInputs) -> list[str]:
    """Reasons no int8 kernel of ours takes a layer: they all multiply an int8 input by int8 weights with
    one scale per output channel, and factor the input's scale out of each output."""
    blockers = []
    activations = inputs.activations
    if activations is None:
        blockers.append("weight-only layer (inputs stay floating point: no int8 input for the kernel)")
    elif activations.granularity == "group":
        blockers.append(
            f"per-token input scales in groups of {activations.group_size} channels (the kernels factor one "
            "input scale per row out of the whole sum)"
        )
    elif (
        activations.granularity == "token"
        and inputs.conv is not None
        and not inputs.conv.is_pointwise(inputs.weight_shape)
    ):
        size = "x".join(str(v) for v in inputs.weight_shape[2:])
        blockers.append(f"per-pixel input scales do not factor out of a {size} convolution (only 1x1, stride 1)")
    if inputs.weights.granularity == "group":
        blockers.append(
            f"per-group weights (group{inputs.weights.group_size}): the kernel takes one scale per output channel"
        )
    if not inputs.weights.symmetric:
        blockers.append("asymmetric weights (the kernel takes zero-point-free weights)")
    return blockers


def select_kernel(
    inputs: KernelInputs,
    backend: str = "auto",
    *,
    support: Any = None,
    allow_inexact: bool = False,
    build: bool = True,
) -> tuple[Kernel | None, KernelDecision]:
    """The kernel one layer runs in integer mode, or None with the reason it keeps the reference path.

    Args:
        inputs: the layer (:class:`KernelInputs`).
        backend: ``"auto"`` or a name in :data:`BACKENDS`.
        support: what the CPU's oneDNN kernels can do (:func:`kernel_support`); computed when needed.
        allow_inexact: run layers that a kernel can only compute approximately (see the oneDNN backend).
        build: False only decides (the kernel is None even where the decision is ``"integer"``): auto
            execution asks first and builds the kernel only for layers that turn out faster on it.
    """
    if backend == "auto":
        if inputs.weight_q.device.type == "cuda":
            backend = "int_mm"
        elif "packed" in BACKENDS and BACKENDS["packed"].claims(inputs):
            return _select_packed_first(inputs, support, allow_inexact, build)
        else:
            backend = "onednn"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown: use one of {', '.join(backend_names())}")
    chosen = BACKENDS[backend]
    if inputs.input_split is not None:
        return _select_split(chosen, inputs, support, allow_inexact, build)
    decision = chosen.decide(inputs, support, allow_inexact)
    if decision.path != "integer" or not build:
        return None, decision
    return chosen.build(inputs), decision


def _select_packed_first(
    inputs: KernelInputs, support: Any, allow_inexact: bool, build: bool
) -> tuple[Kernel | None, KernelDecision]:
    """``auto`` on the CPU for 4-bit, per-group and weight-only layers: the packed kernels, else oneDNN (which
    takes per-channel 4-bit weights widened to int8), else the reference path with both reasons."""
    kernel, decision = select_kernel(inputs, "packed", allow_inexact=allow_inexact, build=build)
    if decision.path == "integer":
        return kernel, decision
    why = decision.reason.removeprefix("reference: ")
    kernel, fallback = select_kernel(inputs, "onednn", support=support, allow_inexact=allow_inexact, build=build)
    if fallback.path == "integer":
        return kernel, dataclasses.replace(fallback, reason=f"{fallback.reason} ({why})")
    return None, KernelDecision("reference", f"{fallback.reason}; {why}", fallback.exact)


def split_inputs(inputs: KernelInputs) -> tuple[KernelInputs, KernelInputs]:
    """A layer whose input is ``cat([a, b])`` with one scale per part, as two layers: ``a`` times the weight's
    first ``at`` input channels, ``b`` times the rest (their outputs add up to the layer's)."""
    at, shape = inputs.input_split, inputs.weight_shape
    taps = math.prod(shape[2:])  # K is channel-major: the first at * taps columns belong to a
    weight = inputs.int8_weight()  # (C_out, K)
    parts = []
    for index, (start, stop, channels) in enumerate(((0, at * taps, at), (at * taps, weight.shape[1], shape[1] - at))):
        parts.append(
            dataclasses.replace(
                inputs,
                weight_q=weight[:, start:stop].contiguous(),
                weights=dataclasses.replace(inputs.weights, bits=8) if inputs.weights.packed else inputs.weights,
                weight_shape=torch.Size((shape[0], channels, *shape[2:])),
                input_scale=inputs.input_scale[index],
                input_zero_point=inputs.input_zero_point[index],
                input_split=None,
            )
        )
    return parts[0], parts[1]


class SplitKernel:
    """Two kernels on the two parts of a split input; the bias is added once."""

    def __init__(self, first: Kernel, second: Kernel, at: int, channel_dim: int):
        self.first, self.second, self.at, self.channel_dim = first, second, at, channel_dim
        self.requirement = first.requirement

    def accepts(self, x: Tensor) -> bool:
        return self.first.accepts(x)

    def dense_weight(self) -> Tensor:
        return torch.cat([self.first.dense_weight(), self.second.dense_weight()], dim=1)  # (C_out, K)

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + self.second.nbytes

    def __call__(self, x: Tensor, bias: Tensor | None, input_qparams: Any = None) -> Tensor:
        a, b = x.split([self.at, x.shape[self.channel_dim] - self.at], dim=self.channel_dim)
        return self.first(a.contiguous(), bias) + self.second(b.contiguous(), None)


def _select_split(
    backend: KernelBackend, inputs: KernelInputs, support: Any, allow_inexact: bool, build: bool
) -> tuple[Kernel | None, KernelDecision]:
    parts = split_inputs(inputs)
    decisions = [backend.decide(part, support, allow_inexact) for part in parts]
    if any(decision.path != "integer" for decision in decisions):
        reasons = "; ".join(d.reason.removeprefix("reference: ") for d in decisions if d.path != "integer")
        return None, KernelDecision("reference", f"reference: {reasons}")
    first = decisions[0]
    reason = f"{first.reason}; input split at channel {inputs.input_split}, two kernels"
    exact = all(decision.exact for decision in decisions)
    if not build:
        return None, KernelDecision("integer", reason, exact, inputs.weights.packed)
    kernel = SplitKernel(
        backend.build(parts[0]), backend.build(parts[1]), inputs.input_split, -1 if inputs.conv is None else -3
    )
    return kernel, KernelDecision("integer", reason, exact, inputs.weights.packed)


from quantdiff.nn.kernels.int_mm import Int8MatmulKernel, IntMMBackend  # noqa: E402
from quantdiff.nn.kernels.onednn import IntegerKernel, KernelSupport, OneDNNBackend, kernel_support  # noqa: E402
from quantdiff.nn.kernels.packed import PackedBackend, PackedSupport, packed_support  # noqa: E402

register_backend(OneDNNBackend())
register_backend(IntMMBackend())
register_backend(PackedBackend())

__all__ = [
    "BACKENDS",
    "ConvGeometry",
    "Int8MatmulKernel",
    "IntegerKernel",
    "Kernel",
    "KernelBackend",
    "KernelDecision",
    "KernelInputs",
    "KernelSupport",
    "PackedSupport",
    "backend_names",
    "kernel_support",
    "packed_support",
    "register_backend",
    "select_kernel",
    "shared_blockers",
]
