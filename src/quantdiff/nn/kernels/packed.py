"""Packed-weight kernels: 4-bit weights computed on the CPU's int8 units without widening them in memory, and
weight-only layers without a float copy of their weights.

Why a kernel of our own (benchmarks/KERNELS.md, section 6): oneDNN's int8 kernels take one int8 scale per
output channel, so per-group 4-bit weights had no kernel at all (the reference path: 0.35-0.63x of fp32 in the
benchmark) and per-channel 4-bit weights ran only widened to a full int8 copy (1 byte per weight instead of
0.5). PyTorch's own 4-bit kernels (``_weight_int4pack_mm*``) are weight-only and written for LLM decoding: at
diffusion shapes they were ~100x slower than fp32. This backend is a small C++ extension
(``csrc/packed_amx.cpp``, JIT-built on first use with ``torch.utils.cpp_extension.load`` and cached):

* **int8 activations (W4A8, W8A8 per group)**: Intel AMX tiles multiply the layer's uint8 input by int8
  weight tiles (int32 accumulation). The weights stay packed: 4-bit weights are held as two nibbles per
  byte in the tile order, plus their scales and per-group sums (0.53 byte per weight at group 128), and are
  unpacked into int8 tiles one block of 32 output channels at a time, right before use. The reduction ``K``
  is permuted once, at build time, so that every 64-wide step of it lies in one scale group: each group's
  int32 tile is multiplied by its scale in fp32 (per-group weights) or the whole sum is (per channel). For a
  convolution the same permutation turns im2col into copies of contiguous channel runs of the quantized,
  channels-last, zero-point padded input. In eager mode the fp32 input is quantized inside the kernel by the
  reference formula (``clamp(round(x / s) + z)``, IEEE division, round half to even: one pass instead of
  torch's five); under ``torch.compile`` that formula is plain ATen ops, fused by inductor into the op that
  produces the input, and the kernel reads uint8. Either way the integers are the reference path's and the
  output equals exact integer math up to the fp32 rounding of the epilogue.
* **weight-only (W4A16, W8A16)**: each call dequantizes the stored weight into one reused buffer per thread
  and runs the layer's float op on it; no float copy of any layer is held between calls. On CPUs that compute
  bf16 natively (AMX-BF16 / AVX512-BF16, the test integer mode already uses for attention), unless the caller
  asks for fp32 (``use_integer_kernels(weight_only="float32")``), the buffer is bf16 and so is the op (input rounded to bf16, output back in fp32): 0.23-0.53x the time of the fp32 layer at
  SD1.5 shapes, about 51 dB of the fp32 reference per layer. Elsewhere the buffer is fp32 with exactly
  :func:`quantdiff.primitives.dequantize`'s arithmetic, so the output is bit-identical to the reference path
  (measured 1.02-1.15x the fp32 layer's time: writing 4 bytes per weight per call costs more than the weight
  bandwidth saved).

What cannot run here keeps another path, with the reason (``auto`` falls back to the oneDNN backend, which
still takes per-channel 4-bit weights widened to int8): no AMX-INT8 on this CPU or no permission for its tile
state, no C++ compiler or a failed build or self-check (the extension is optional), weights off the CPU,
group sizes that are not multiples of 64, grouped convolutions, asymmetric weights, per-token input scales,
inputs split in two parts with per-group weights.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from quantdiff.nn.attention import native_bf16
from quantdiff.nn.kernels import KernelDecision, KernelInputs, shared_blockers
from quantdiff.nn.kernels.extension import CSRC, load_extension_once
from quantdiff.nn.kernels.onednn import IntegerKernel

__all__ = [
    "DequantizeKernel",
    "PackedBackend",
    "PackedKernel",
    "PackedSupport",
    "pack_tiles",
    "packed_support",
    "reduction_order",
    "unpack_tiles",
]

_SOURCE = CSRC / "packed_amx.cpp"
_EXTENSION = "quantdiff_packed_kernels"
# Set to 1 to run without the extension (every layer it would take keeps its other path, with this reason).
DISABLE_ENV = "QUANTDIFF_NO_EXTENSION"
_STEP = 64  # K per AMX tile step (bytes of one tile row)
_BLOCK = 16  # output channels per tile
_PAIR = 32  # output channels per kernel block (two tiles)
# Measured per layer at SD1.5 shapes (benchmarks/KERNELS.md, section 6): bf16 input and weight rounding.
BF16_AGREEMENT = "about 51 dB of the fp32 reference per layer"


@dataclass(frozen=True)
class PackedSupport:
    """What the packed kernels can do in this process.

    Attributes:
        amx: the int8-activation kernels run (AMX-INT8 usable, extension built, self-check passed).
        dequantize: the weight-only kernel runs (extension built; it needs no AMX).
        reason: why ``amx`` (or ``dequantize``) is False; "" when both run.
        bf16: the CPU computes bf16 natively, so weight-only layers can compute in bf16 where the caller allows
            it (``weight_only="auto"``, as attention in integer mode), else they compute in fp32, bit-identical
            to the reference path.
        build_seconds: time spent building or loading the extension in this process.
    """

    amx: bool
    dequantize: bool
    reason: str = ""
    bf16: bool = False
    build_seconds: float = 0.0

    def describe(self) -> str:
        weight_only = f"weight-only layers in {'bf16 (or fp32 on request)' if self.bf16 else 'fp32'}"
        if self.amx:
            return f"packed kernels: AMX-INT8, {weight_only}"
        if self.dequantize:
            return f"packed kernels: {weight_only} only ({self.reason})"
        return f"packed kernels unavailable: {self.reason}"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def packed_support() -> PackedSupport:
    """Build (or load from the cache) the extension once per process and check it on this CPU.

    The build takes about a minute the first time on a machine (then the cached library loads in a second);
    ``QUANTDIFF_NO_EXTENSION=1`` skips it. Every failure is a reason, never an exception.
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return PackedSupport(False, False, f"disabled by {DISABLE_ENV}")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return PackedSupport(
            False, False, f"the extension is written for x86-64 Linux, not {platform.system()} {platform.machine()}"
        )
    problem, seconds = load_extension_once(_EXTENSION, _SOURCE, _register_fakes)
    if problem:
        return PackedSupport(False, False, problem)
    bf16 = native_bf16()[0]
    status = int(torch.ops.quantdiff_packed.amx_status())
    if status == 1:
        flags = _cpu_flags()
        have = ", ".join(f for f in ("avx512bw", "amx_tile", "amx_int8") if f in flags) or "none"
        reason = f"this CPU has no AMX-INT8 (of avx512bw, amx_tile, amx_int8 it has {have})"
        return PackedSupport(False, True, reason, bf16, seconds)
    if status == 2:
        return PackedSupport(False, True, "the OS refused the AMX tile state (arch_prctl)", bf16, seconds)
    problem = _self_check()
    if problem:
        return PackedSupport(False, True, f"self-check failed: {problem}", bf16, seconds)
    return PackedSupport(True, True, "", bf16, seconds)


_fakes_registered = False


def _register_fakes() -> None:
    """Shapes of the ops' outputs for torch.compile (the ops are opaque to it: one call each)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("quantdiff_packed::packed_linear")
    def _linear(x, weight, scales, rowsums, n, group_cols, bits, x_scale, x_zp, q_low, q_high, bias):
        return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)

    @torch.library.register_fake("quantdiff_packed::packed_conv2d")
    def _conv(
        x,
        weight,
        scales,
        rowsums,
        segments,
        n,
        kernel,
        stride,
        padding,
        dilation,
        group_cols,
        bits,
        x_scale,
        x_zp,
        q_low,
        q_high,
        bias,
    ):
        h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        return x.new_empty((x.shape[0], n, h, w), dtype=torch.float32).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("quantdiff_packed::dequantize_into")
    def _dequantize(weight_q, scale, zero_point, k, bits, group_size, signed_values, out):
        return None


def _self_check() -> str:
    """A small Linear and 3x3 Conv2d (per group and per channel) against exact integer math; "" if exact."""
    generator = torch.Generator().manual_seed(0)
    for group in (None, 64):
        for conv in (False, True):
            c_in, c_out = (24, 40) if conv else (200, 40)
            shape = (c_out, c_in, 3, 3) if conv else (c_out, c_in)
            k = math.prod(shape[1:])
            q = torch.randint(-8, 8, (c_out, k), dtype=torch.int8, generator=generator)
            groups = 1 if group is None else math.ceil(k / group)
            scale = torch.rand(c_out, groups, generator=generator) + 0.5
            x = torch.randn((2, c_in, 5, 6) if conv else (7, c_in), generator=generator)
            x_scale, x_zp = 0.02, 131
            kernel = PackedKernel.from_parts(
                q, scale, shape, group, 4, (1, 1, 1, 1, 1, 1) if conv else None, x_scale, x_zp, 0, 255
            )
            got = kernel(x, None).double()
            xq = torch.clamp(torch.round(x / x_scale) + x_zp, 0, 255).double() - x_zp
            w = q.double()
            if group is not None:
                w = F.pad(w, (0, groups * group - k)).reshape(c_out, groups, group)
                w = (w * scale.double()[..., None]).reshape(c_out, -1)[:, :k]
            else:
                w = w * scale.double()
            if conv:
                exact = F.conv2d(xq, w.reshape(shape), padding=1) * x_scale
            else:
                exact = xq @ w.t() * x_scale
            error = float((got - exact).abs().max() / exact.abs().max())
            if not error < 1e-5:
                kind = ("Conv2d" if conv else "Linear") + (" per channel" if group is None else f" group {group}")
                return f"{kind}: relative error {error:.2e}"
    return ""


# ------------------------------------------------------------------------------------------------- layout
def reduction_order(weight_shape: torch.Size | tuple[int, ...], group_size: int | None) -> tuple[Tensor, int, int]:
    """The kernel's order of the reduction ``K = C_in x taps`` (PyTorch's order is channel-major: ``k = c *
    taps + t``) and its padded length.

    Every group's ``k`` come together (group ``g`` occupies columns ``[g * cols, (g + 1) * cols)``, ``cols``
    the group size, or for per-channel weights ``K`` rounded up to 64), and inside a group they are ordered
    tap-major, so one tap's channels are a contiguous run of the channels-last input. A Linear (one tap)
    keeps PyTorch's order.

    Returns:
        ``source`` ``(Kp,)`` int64: the original ``k`` of each column, -1 for padding; the group columns; ``Kp``.
    """
    c_in, taps = int(weight_shape[1]), math.prod(weight_shape[2:])
    k = c_in * taps
    cols = math.ceil(k / _STEP) * _STEP if group_size is None else group_size
    groups = math.ceil(k / cols)
    original = torch.arange(k)
    channel, tap = original // taps, original % taps
    group = original // cols
    key = (group * taps + tap) * c_in + channel  # group, then tap, then channel
    order = torch.argsort(key)  # original k in kernel order
    counts = torch.bincount(group, minlength=groups)  # k per group (the last may be short)
    rank = torch.arange(k) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    source = torch.full((groups * cols,), -1, dtype=torch.int64)
    source[group[order] * cols + rank] = order
    return source, cols, groups * cols


def conv_segments(weight_shape: torch.Size | tuple[int, ...], source: Tensor) -> Tensor:
    """Runs of consecutive channels at one tap in the kernel order: ``(S, 4)`` int32 rows ``(tap, c_start,
    length, column)``, what the kernel copies from the channels-last input into each im2col row."""
    taps = math.prod(weight_shape[2:])
    column = torch.nonzero(source >= 0).flatten()
    k = source[column]
    channel, tap = k // taps, k % taps
    starts = torch.ones_like(column, dtype=torch.bool)
    starts[1:] = (tap[1:] != tap[:-1]) | (channel[1:] != channel[:-1] + 1) | (column[1:] != column[:-1] + 1)
    first = torch.nonzero(starts).flatten()
    length = torch.diff(first, append=torch.tensor([len(column)]))
    return torch.stack([tap[first], channel[first], length, column[first]], dim=1).to(torch.int32).contiguous()


def pack_tiles(weight: Tensor, bits: int) -> Tensor:
    """Int8 weights ``(Np, Kp)`` (kernel order, padded) -> the kernel's tiles ``(Np/16, Kp/64, 512 or 1024)``.

    Tile layout (AMX's VNNI B layout): byte ``r * 64 + j * 4 + i`` of tile ``(nb, ks)`` is
    ``W[16 nb + j, 64 ks + 4 r + i]``. 4-bit tiles hold tile bytes ``[128 c, 128 c + 64)`` in the low nibbles
    and ``[128 c + 64, 128 c + 128)`` in the high nibbles of bytes ``[64 c, 64 c + 64)``.
    """
    n_pad, k_pad = weight.shape
    tiles = weight.reshape(n_pad // _BLOCK, _BLOCK, k_pad // _STEP, 16, 4).permute(0, 2, 3, 1, 4)  # nb, ks, r, j, i
    tiles = tiles.reshape(n_pad // _BLOCK, k_pad // _STEP, 1024)
    if bits == 8:
        return tiles.contiguous()
    halves = tiles.reshape(*tiles.shape[:2], 8, 2, 64).to(torch.int16) & 0xF  # chunk, low/high half, byte
    return (halves[..., 0, :] | (halves[..., 1, :] << 4)).to(torch.uint8).reshape(*tiles.shape[:2], 512).contiguous()


def unpack_tiles(tiles: Tensor) -> Tensor:
    """Inverse of :func:`pack_tiles`: the int8 weight ``(Np, Kp)`` in kernel order."""
    blocks, steps, size = tiles.shape
    if size == 512:
        chunks = tiles.reshape(blocks, steps, 8, 64)
        nibbles = torch.stack([chunks & 0xF, chunks >> 4], dim=3).to(torch.int16)  # chunk, low/high half, byte
        tiles = ((nibbles ^ 8) - 8).to(torch.int8).reshape(blocks, steps, 1024)
    weight = tiles.reshape(blocks, steps, 16, _BLOCK, 4).permute(0, 3, 1, 2, 4)  # nb, j, ks, r, i
    return weight.reshape(blocks * _BLOCK, steps * _STEP)


# ------------------------------------------------------------------------------------------------- kernels
class PackedKernel:
    """One layer's packed weight tiles, scales and per-group weight sums, and the scalars of its calls.

    A plain object, like the other backends' kernels: never in ``state_dict``, rebuilt from the layer's
    buffers when they change; :meth:`dense_weight` gives the stored integers back bit for bit.
    """

    requirement = "float32 CPU inputs without autograd"

    def __init__(self, inputs: KernelInputs):
        activations = inputs.activations
        weights = inputs.weights
        group = weights.group_size if weights.granularity == "group" else None
        scale = inputs.weight_scale.float().contiguous()  # the layer's own buffer (no copy): (C_out or 1, G)
        if activations.symmetric:  # signed q in [-2^(b-1), 2^(b-1) - 1] is uint8 q + 128 with zero point 128
            low, high, shift = 128 - (1 << (activations.bits - 1)), 127 + (1 << (activations.bits - 1)), 128
        else:
            low, high, shift = 0, (1 << activations.bits) - 1, 0
        static = inputs.input_scale is not None and inputs.input_scale.dim() == 0
        x_scale, x_zp = (float(inputs.input_scale), int(inputs.input_zero_point)) if static else (1.0, 0)
        conv = None
        if inputs.conv is not None:
            padding = inputs.conv.explicit_padding(tuple(inputs.weight_shape[2:]))
            conv = (*inputs.conv.stride, *padding, *inputs.conv.dilation)
        self._setup(
            inputs.int8_weight(),
            scale,
            inputs.weight_shape,
            group,
            4 if weights.packed else 8,
            conv,
            x_scale,
            x_zp + shift,
            low,
            high,
        )
        self.shift = shift

    @classmethod
    def from_parts(
        cls,
        weight: Tensor,
        scale: Tensor,
        shape,
        group: int | None,
        bits: int,
        conv,
        x_scale: float,
        x_zp: int,
        low: int,
        high: int,
    ) -> PackedKernel:
        """A kernel from raw parts (the self-check): int8 ``(C_out, K)``, scales ``(C_out, G)``, uint8 input
        range ``[low, high]`` with zero point ``x_zp``, ``conv`` = (stride h, w, padding h, w, dilation h, w)."""
        kernel = cls.__new__(cls)
        kernel._setup(weight, scale, torch.Size(shape), group, bits, conv, x_scale, x_zp, low, high)
        kernel.shift = 0
        return kernel

    def _setup(
        self,
        weight: Tensor,
        scale: Tensor,
        shape: torch.Size,
        group: int | None,
        bits: int,
        conv,
        x_scale: float,
        x_zp: int,
        low: int,
        high: int,
    ) -> None:
        c_out, k = weight.shape
        self.shape, self.group, self.bits, self.k = torch.Size(shape), group, bits, k
        self.x_scale, self.x_zp, self.q_low, self.q_high = x_scale, x_zp, low, high
        self.is_conv = conv is not None
        source, self.group_cols, k_pad = reduction_order(shape, group)
        n_pad = math.ceil(c_out / _PAIR) * _PAIR
        ordered = torch.zeros(n_pad, k_pad, dtype=torch.int8)  # (Np, Kp) kernel order, zero padded
        valid = source >= 0
        ordered[:c_out, valid] = weight[:, source[valid]]
        self.tiles = pack_tiles(ordered, bits)
        groups = k_pad // self.group_cols
        self.scales = scale  # (C_out or 1, G): read by the kernel where the layer holds it
        sums = ordered.reshape(n_pad, groups, self.group_cols).sum(-1, dtype=torch.int32).t().contiguous()  # (G, Np)
        # the zero point's share of each group's sum, z * sum(W), is formed per call from these; int16 where a
        # group's sum always fits (group * 128 <= 32767): half the bytes
        fits = group is not None and group * 128 <= torch.iinfo(torch.int16).max
        self.rowsums = sums.to(torch.int16) if fits else sums
        self.segments = conv_segments(shape, source) if self.is_conv else None
        if self.is_conv:
            self.stride, self.padding, self.dilation = list(conv[0:2]), list(conv[2:4]), list(conv[4:6])

    def affine(self, scale: float, zero_point: int) -> tuple[float, int]:
        """A call's (scale, zero point) as the kernel takes them (uint8: symmetric inputs shift by 128)."""
        return scale, zero_point + self.shift

    def dense_weight(self) -> Tensor:
        """The int8 weight ``(C_out, K)`` in PyTorch's order, read back from the tiles bit for bit."""
        ordered = unpack_tiles(self.tiles)  # (Np, Kp) kernel order
        source, _, _ = reduction_order(self.shape, self.group)
        weight = torch.empty(self.shape[0], self.k, dtype=torch.int8)
        valid = source >= 0
        weight[:, source[valid]] = ordered[: self.shape[0], valid]
        return weight

    @property
    def nbytes(self) -> int:
        """Bytes the kernel holds besides the layer's buffers (the scales are the layer's ``weight_scale``)."""
        held = [self.tiles, self.rowsums] + ([self.segments] if self.is_conv else [])
        return sum(t.numel() * t.element_size() for t in held)

    accepts = staticmethod(IntegerKernel.accepts)  # the same inputs as oneDNN's kernel

    def __call__(
        self,
        x: Tensor,
        bias: Tensor | None,
        input_qparams: tuple[float, int] | None = None,
        channels_last: bool = False,
    ) -> Tensor:
        """The layer's output. ``channels_last`` (convolutions): return the kernel's own channels-last output
        whatever ``x``'s layout, where the model keeps its activations channels-last
        (:func:`quantdiff.nn.use_activation_layout`); by default an NCHW input gets an NCHW output, as from
        ``nn.Conv2d``, which costs a copy of the output."""
        x_scale, x_zp = self.x_scale, self.x_zp
        if input_qparams is not None:
            x_scale, x_zp = self.affine(*input_qparams)
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        if bias is not None:
            bias = bias.contiguous()
        ops, n = torch.ops.quantdiff_packed, self.shape[0]
        nchw = x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last)
        if torch.compiler.is_compiling():
            # plain ATen ops fuse into the kernel that produces x: it writes uint8, the op reads 1 byte per value
            # instead of 4 (eager: the op quantizes in one pass, faster than these ops unfused)
            x = torch.clamp(torch.round(x / x_scale) + x_zp, self.q_low, self.q_high).to(torch.uint8)
        if not self.is_conv:
            return ops.packed_linear(
                x,
                self.tiles,
                self.scales,
                self.rowsums,
                n,
                self.group_cols,
                self.bits,
                x_scale,
                x_zp,
                self.q_low,
                self.q_high,
                bias,
            )
        unbatched = x.dim() == 3  # nn.Conv2d accepts (C, H, W)
        x4 = x.unsqueeze(0) if unbatched else x
        y = ops.packed_conv2d(
            x4,
            self.tiles,
            self.scales,
            self.rowsums,
            self.segments,
            n,
            list(self.shape[2:]),
            self.stride,
            self.padding,
            self.dilation,
            self.group_cols,
            self.bits,
            x_scale,
            x_zp,
            self.q_low,
            self.q_high,
            bias,
        )  # (N, C_out, H', W') channels-last
        if channels_last and not unbatched:
            return y
        if nchw or (unbatched and not x4.is_contiguous(memory_format=torch.channels_last)):
            y = y.contiguous()  # as nn.Conv2d: NCHW in, NCHW out (callers may .view() the result)
        return y.squeeze(0) if unbatched else y


_scratch = threading.local()


def _weight_buffer(numel: int, dtype: torch.dtype) -> Tensor:
    """This thread's reused buffer of at least ``numel`` values of ``dtype`` (grown, never shrunk)."""
    name = f"weight_{dtype}".replace(".", "_")
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:numel]


class DequantizeKernel:
    """A weight-only layer: its stored weight (still packed), dequantized into a reused buffer at each call.

    ``dtype`` float32: exactly the reference path's weight and op (bit-identical output). bfloat16 (CPUs that
    compute it natively): the same weight rounded to bf16 and the op in bf16 on the bf16-rounded input, output
    back in float32. Holds the stored ``weight_q`` tensor itself (no copy); the buffer is one per thread, as
    large as the largest layer that thread ran, shared by all layers.
    """

    requirement = "float32 CPU inputs without autograd"

    def __init__(self, inputs: KernelInputs, op, dtype: torch.dtype):
        self.weight_q, self.shape, self.k = inputs.weight_q, inputs.weight_shape, inputs.reduction_size
        self.packed = inputs.weights.packed
        self.bits = 4 if self.packed else 8
        self.signed = inputs.weights.symmetric
        self.scale = inputs.weight_scale.float().contiguous()
        groups = self.scale.shape[1]
        self.group_size = inputs.weights.group_size if groups > 1 else self.k
        self.op, self.dtype = op, dtype  # op: (x, weight, bias) -> y, the layer's float op

    def dense_weight(self) -> Tensor:
        if self.packed:
            from quantdiff.primitives import unpack_int4

            return unpack_int4(self.weight_q, self.k, signed=self.signed)
        return self.weight_q

    @property
    def nbytes(self) -> int:
        """The stored weight (the layer released it to the kernel); the scales stay the layer's."""
        return self.weight_q.numel() * self.weight_q.element_size()

    accepts = staticmethod(PackedKernel.accepts)

    def weight(self) -> Tensor:
        """The dequantized weight in ``dtype``: :func:`quantdiff.nn.weights.dequantize_weight`'s values (bf16:
        rounded to nearest even), in this thread's reused buffer (a new tensor while compiling)."""
        numel = self.shape[0] * self.k
        if torch.compiler.is_compiling():
            out = torch.empty(numel, dtype=self.dtype)
        else:
            out = _weight_buffer(numel, self.dtype)
        torch.ops.quantdiff_packed.dequantize_into(
            self.weight_q, self.scale, None, self.k, self.bits, self.group_size, self.signed, out
        )
        return out.view(self.shape)

    def __call__(self, x: Tensor, bias: Tensor | None, input_qparams=None) -> Tensor:
        if self.dtype == torch.float32:
            return self.op(x, self.weight(), bias)
        bias = None if bias is None else bias.to(self.dtype)
        return self.op(x.to(self.dtype), self.weight(), bias).float()


# ------------------------------------------------------------------------------------------------- backend
class PackedBackend:
    """The packed-weight kernels (see the module docstring); ``decide`` names every blocker."""

    name = "packed"

    def claims(self, inputs: KernelInputs) -> bool:
        """Layers ``auto`` offers to this backend first: 4-bit or per-group weights, weight-only layers, and on
        AMX CPUs int8 per-channel weights with one input scale per call too. Why the last: eager, the packed
        layer quantizes its input in one pass inside the kernel, and measured W8A8 SD1.5 UNet steps at 64x64
        were about 1.8x faster than on oneDNN (min of 5, 0.97 vs 1.78 s), the digits-sd UNet 0.75x of fp32 where
        oneDNN took 1.81x (benchmarks/KERNELS.md, section 6). Compiled, oneDNN's layer was faster (0.79 vs
        0.91 s: inductor fuses its input quantization too): ``backend="onednn"`` before ``torch.compile``."""
        weights, activations = inputs.weights, inputs.activations
        if activations is None or weights.packed or weights.granularity == "group":
            return True
        return activations.granularity == "tensor" and packed_support().amx

    def decide(
        self, inputs: KernelInputs, support: PackedSupport | None = None, allow_inexact: bool = False
    ) -> KernelDecision:
        """Whether the layer runs here, and why (not). ``support``: a :class:`PackedSupport` (anything else,
        e.g. the oneDNN backend's description that ``select_kernel`` passes along, means this process's)."""
        support = support if isinstance(support, PackedSupport) else packed_support()
        weights, activations = inputs.weights, inputs.activations
        blockers = []
        if inputs.weight_q.device.type != "cpu":
            blockers.append(f"weights on {inputs.weight_q.device} (the packed kernels are CPU only)")
        if not weights.symmetric:
            blockers.append("asymmetric weights (the kernel takes zero-point-free weights)")
        if activations is None:
            if not support.dequantize:
                blockers.append(support.reason)
            if blockers:
                return KernelDecision("reference", "reference: weight-only layer: " + "; ".join(blockers))
            if support.bf16 and inputs.float_dtype == torch.bfloat16:
                return KernelDecision(
                    "integer",
                    f"weight-only: int{weights.bits} dequantized per call into a reused "
                    f"bf16 buffer, computed in bf16 ({BF16_AGREEMENT})",
                )
            return KernelDecision(
                "integer",
                f"weight-only: int{weights.bits} dequantized per call into a reused fp32 "
                "buffer (bit-identical to the reference path)",
            )
        if not support.amx:
            blockers.append(support.reason)
        # per-group weights are this kernel's; asymmetric weights and per-token inputs are named here already
        blockers += [b for b in shared_blockers(inputs) if not b.startswith(("per-group", "asymmetric", "per-pixel"))]
        if weights.granularity == "group" and weights.group_size % _STEP:
            blockers.append(f"group size {weights.group_size} (the kernel takes multiples of {_STEP})")
        if activations.granularity == "token":
            blockers.append("per-token input scales (the packed kernel takes one input scale per call)")
        if inputs.input_split is not None and weights.granularity == "group":
            blockers.append("an input split in two parts with per-group weights")
        if inputs.conv is not None:
            if inputs.conv.groups != 1:
                blockers.append(f"grouped convolution (groups={inputs.conv.groups})")
            if inputs.conv.explicit_padding(tuple(inputs.weight_shape[2:])) is None:
                blockers.append(f"padding={inputs.conv.padding!r} would be asymmetric")
        if blockers:
            return KernelDecision("reference", "reference: packed kernel: " + "; ".join(blockers))
        kind = f"group{weights.group_size}" if weights.granularity == "group" else "per channel"
        return KernelDecision("integer", f"int{weights.bits} {kind} packed, int8 AMX kernel", True, False)

    def build(self, inputs: KernelInputs):
        if inputs.activations is None:
            native = packed_support().bf16 and inputs.float_dtype == torch.bfloat16
            dtype = torch.bfloat16 if native else torch.float32
            return DequantizeKernel(inputs, _float_op(inputs), dtype)
        return PackedKernel(inputs)


def _float_op(inputs: KernelInputs):
    """The layer's float op from its geometry (``F.linear`` / ``F.conv2d``)."""
    conv = inputs.conv
    if conv is None:
        return F.linear
    return lambda x, weight, bias: F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
