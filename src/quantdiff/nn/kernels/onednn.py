"""Integer execution of quantized layers on CPU with oneDNN's int8 kernels.

Why these kernels (benchmarks/KERNELS.md, section 1): on x86 CPUs PyTorch ships oneDNN's int8 GEMM and
convolution as ``torch.ops.onednn.qlinear_pointwise`` / ``qconv_pointwise``, the same kernels inductor
emits for PT2E static int8, but callable eagerly, from our own buffers, with an **fp32 output** (no
output requantization). Measured on the 2-core AVX2 machine: 1.6-1.7x (Linear) and 1.7x (Conv2d) over
fp32 eager per layer, 1.6x on a whole SD1.5 UNet step; ``torch._int_mm``, ``torch.ao`` quantized ops,
ONNX Runtime and PT2E were slower, inexact against our reference, or both.

What one layer does here:

* once, at :meth:`OneDNNBackend.build` (when a model is switched to integer mode): the int8 weight is
  *prepacked* into oneDNN's blocked layout (``qlinear_prepack`` / ``qconv_prepack``). The packed copy is
  the kernel's own tensor, held on the module as a plain attribute: never in ``state_dict``, never saved.
  It is a full copy of the weight (measured: prepacking a 12.5 MiB int8 weight adds 12.5 MiB of RSS;
  conv adds 4 B of compensation per output channel). ``IntegerKernel.dense_weight`` reads ``weight_q``
  back from the packed copy bit for bit, so the layer releases ``weight_q`` once the kernel is built and
  rebuilds it from here whenever it is needed (:meth:`QuantizedLayer.integer_weight`): integer mode holds
  1 byte per weight for W8, as the reference mode does;
* per call: the input is quantized to uint8 with the layer's static per-tensor scale and zero point by
  exactly the formula of :func:`quantdiff.primitives.quantize` (``clamp(round(x / s) + z)``, division and
  round-half-even in float32), so the integers are bit-identical to the reference path's; the kernel
  multiplies u8 x s8, accumulates in int32 and rescales with ``x_scale * w_scale[c]`` and the fp32 bias.

Agreement with the reference (fake-quant) path is therefore exact up to the fp32 rounding of the rescale
(110-135 dB per layer) -- with one exception. x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
multiply with ``vpmaddubsw``, which adds the products of two neighbouring input channels into a
*saturating int16*; plain int8 weights overflow it (14-46 dB per layer). Layers whose weights are
pair-safe (``TensorSpec(pair_safe=True)``, preset ``w8a8-int``) cannot overflow; the others stay on the
reference path on such a CPU unless the caller accepts wrong results (``allow_inexact``). Whether the CPU
saturates is decided from its flags (``avx512_vnni``, ``avx_vnni``, ``amx_int8`` in /proc/cpuinfo,
capped by ``ONEDNN_MAX_CPU_ISA``) *and* by running the kernel on a worst-case input (:func:`kernel_support`).

What cannot run here (the layer keeps the reference path, and the summary says why): what no int8 kernel
of ours takes (:func:`quantdiff.nn.kernels.shared_blockers`: weight-only layers, per-group or asymmetric
weights, input scales that change per call), weights or inputs off the CPU, non-float32 inputs, inputs
that need gradients. 4-bit weights with one scale per channel are widened to int8 for the kernel
(the stored weight stays packed; the kernel's copy is int8).

NaN inputs have no uint8 image: the quantized kernel input would hold an arbitrary finite value in their
place, so a call whose input holds NaN returns an all-NaN output (the reference path propagates NaN to the
outputs that depend on it), and the numerics guard of ``quantdiff serve`` still sees it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from quantdiff.nn.kernels import KernelDecision, KernelInputs, shared_blockers
from quantdiff.primitives import SCALE_EPS, compute_qparams, pair_sums

__all__ = ["IntegerKernel", "KernelSupport", "OneDNNBackend", "kernel_support"]

INT16_MAX = 32767
_OPS = ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv_pointwise")
# CPU flags of the int8 instructions that accumulate u8 x s8 straight into int32 (no int16 pair sums).
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which it may use VNNI / AMX.
_VNNI_ISAS = ("VNNI", "AMX", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10", "ALL")


@dataclass(frozen=True)
class KernelSupport:
    """What the oneDNN int8 kernels can do in this process.

    Attributes:
        available: the four ops exist and compute a small Linear and Conv2d correctly.
        reason: why they are not available ("" when they are).
        cpu_capability: ATen's CPU capability (``AVX2``, ``AVX512``, ...).
        vnni: the CPU flags list a VNNI / AMX int8 instruction and oneDNN is not capped below it.
        saturates: int16 pair sums can saturate, so only pair-safe weights are exact. True without
            VNNI, or whenever the worst-case probe saturated (whatever the flags say).
        probe: what the worst-case probe measured, for reports.
        per_call_scales: the conv kernel honours an input scale and zero point given at call time (other
            than those it was packed with), so per-call scales (timestep groups, dynamic) can run on it.
    """

    available: bool
    reason: str
    cpu_capability: str
    vnni: bool
    saturates: bool
    probe: str
    per_call_scales: bool = True

    def describe(self) -> str:
        if not self.available:
            return f"oneDNN int8 kernels unavailable: {self.reason}"
        pairs = "u8 x s8 pair sums saturate int16 (pair-safe weights needed)" if self.saturates else "no saturation"
        return f"oneDNN int8 kernels, CPU {self.cpu_capability}, VNNI {'yes' if self.vnni else 'no'}: {pairs}"


def _cpu_has_vnni() -> bool:
    """VNNI / AMX int8 instructions in /proc/cpuinfo, unless oneDNN is capped below them by the environment."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if not any(isa in cap for isa in _VNNI_ISAS):
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _VNNI_FLAGS)
    except OSError:
        pass
    return False


# Trailing arguments of every call: output scale 1 and zero point 0 with an fp32 output dtype (no output
# requantization), and no fused post-op (empty argument tuple, no algorithm).
_FP32_OUT = (1.0, 0, torch.float32, "none", (), "")


def _qlinear(q: Tensor, x_scale: float, x_zp: int, packed: Tensor, w_scale: Tensor, w_zp: Tensor, bias) -> Tensor:
    """``(..., K)`` uint8 -> ``(..., C_out)`` fp32."""
    return torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zp, packed, w_scale, w_zp, bias, *_FP32_OUT)


def _qconv(q: Tensor, x_scale: float, x_zp: int, packed: Tensor, w_scale: Tensor, w_zp: Tensor, bias, conv_args):
    """``(N, C_in, H, W)`` uint8 -> ``(N, C_out, H', W')`` fp32 in channels-last memory."""
    return torch.ops.onednn.qconv_pointwise(q, x_scale, x_zp, packed, w_scale, w_zp, bias, *conv_args, *_FP32_OUT)


def _conv_args(inputs: KernelInputs) -> tuple[list[int], list[int], list[int], int] | None:
    """``(stride, padding, dilation, groups)`` as the ops take them; None when padding cannot be expressed."""
    conv = inputs.conv
    padding = conv.explicit_padding(tuple(inputs.weight_shape[2:]))
    if padding is None:
        return None
    return list(conv.stride), list(padding), list(conv.dilation), conv.groups


def kernel_support() -> KernelSupport:
    """Check that the oneDNN int8 ops exist and run, and whether they saturate on this CPU.

    Runs a small Linear and a 3x3 Conv2d (a few milliseconds) against exact integer math: first on an
    input that cannot saturate (correctness), then with every weight 127 and every input 255, where a
    pair of products (64770) overflows int16. Not cached, so no process-wide state: callers that switch
    many layers compute it once and pass it on.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    vnni = _cpu_has_vnni()
    missing = [name for name in _OPS if not hasattr(torch.ops.onednn, name)]
    if missing:
        reason = f"torch {torch.__version__} has no torch.ops.onednn.{', '.join(missing)}"
        return KernelSupport(False, reason, capability, vnni, True, "not run")
    try:
        generator = torch.Generator().manual_seed(0)
        w = torch.randint(-8, 8, (16, 64), dtype=torch.int8, generator=generator)  # (N, K)
        x = torch.randint(0, 16, (8, 64), dtype=torch.uint8, generator=generator)  # (M, K)
        zeros16, zeros64 = torch.zeros(16, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
        y = _qlinear(x, 1.0, 3, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(16), zeros16, None)
        if not torch.equal(y.double(), (x.double() - 3) @ w.double().t()):
            return KernelSupport(False, "qlinear_pointwise gave wrong results", capability, vnni, True, "failed")
        wc = torch.randint(-8, 8, (8, 16, 3, 3), dtype=torch.int8, generator=generator)  # (C_out, C_in, 3, 3)
        xc = torch.randint(0, 16, (1, 16, 6, 6), dtype=torch.uint8, generator=generator)
        conv = ([1, 1], [1, 1], [1, 1], 1)
        packed = torch.ops.onednn.qconv_prepack(wc, torch.ones(8), 1.0, 3, *conv, None)
        yc = _qconv(xc, 1.0, 3, packed, torch.ones(8), torch.zeros(8, dtype=torch.int64), None, conv)
        expected = torch.nn.functional.conv2d(xc.double() - 3, wc.double(), None, 1, 1)
        if not torch.equal(yc.double(), expected):
            return KernelSupport(False, "qconv_pointwise gave wrong results", capability, vnni, True, "failed")
        # The same packed weight called with another input zero point than it was packed with.
        other = _qconv(xc, 1.0, 5, packed, torch.ones(8), torch.zeros(8, dtype=torch.int64), None, conv)
        per_call = torch.equal(other.double(), torch.nn.functional.conv2d(xc.double() - 5, wc.double(), None, 1, 1))
        # Worst case: each pair of products is 2 * 255 * 127 = 64770 > 32767.
        worst = torch.ops.onednn.qlinear_prepack(torch.full((64, 64), 127, dtype=torch.int8), None)
        y = _qlinear(torch.full((64, 64), 255, dtype=torch.uint8), 1.0, 0, worst, torch.ones(64), zeros64, None)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        return KernelSupport(False, f"the ops failed to run ({error})", capability, vnni, True, "failed")
    exact_value, got = 64 * 255 * 127, float(y[0, 0])
    probe_saturated = got != exact_value
    probe = f"worst-case pair sums: {got:.0f} (exact {exact_value})"
    return KernelSupport(True, "", capability, vnni, (not vnni) or probe_saturated, probe, per_call)


class OneDNNBackend:
    """oneDNN's int8 conv / linear on x86 CPUs (see the module docstring)."""

    name = "onednn"

    def decide(self, inputs: KernelInputs, support: KernelSupport | None, allow_inexact: bool) -> KernelDecision:
        """Whether the layer can run on the oneDNN kernel, and why (not); every blocker is named.

        ``support`` comes from :func:`kernel_support` (computed here when None); ``allow_inexact`` runs
        layers that can saturate anyway (marked ``exact=False``).
        """
        support = kernel_support() if support is None else support
        blockers = []
        if not support.available:
            blockers.append(support.reason)
        if inputs.weight_q.device.type != "cpu":
            blockers.append(f"weights on {inputs.weight_q.device} (the oneDNN kernels are CPU only)")
        blockers += shared_blockers(inputs)
        activations = inputs.activations
        if inputs.conv is not None and inputs.per_call_input_scale and not support.per_call_scales:
            blockers.append("per-call input scales: this CPU's conv kernel keeps the scale it was packed with")
        if inputs.conv is not None and _conv_args(inputs) is None:
            blockers.append(f"padding={inputs.conv.padding!r} would be asymmetric")
        if blockers:
            return KernelDecision("reference", "reference: " + "; ".join(blockers))
        widened = inputs.weights.packed
        reason = "int8 oneDNN" + ("; int4 weights widened to int8" if widened else "")
        if not support.saturates:
            return KernelDecision("integer", reason + "; no int16 saturation on this CPU", True, widened)
        q = inputs.int8_weight()  # (C_out, K)
        shape = inputs.weight_shape
        worst = int(pair_sums(q.reshape(shape[0], shape[1], -1)).max()) if q.numel() else 0
        x_max = 255 if activations.symmetric else (1 << activations.bits) - 1  # largest uint8 input value
        if x_max * worst <= INT16_MAX:
            safe = "pair-safe weights" if inputs.weights.pair_safe else f"pairs within int16 (worst pair sum {worst})"
            return KernelDecision("integer", f"{reason}; {safe}", True, widened)
        problem = (
            f"weights not pair-safe for this CPU (worst same-sign pair sum {worst} x input {x_max} > {INT16_MAX}: "
            "AVX2 without VNNI saturates int16)"
        )
        if allow_inexact:
            return KernelDecision("integer", f"{reason}; INEXACT: {problem}", False, widened)
        return KernelDecision("reference", f"reference: {problem}; quantize with pair_safe weights (preset w8a8-int)")

    def build(self, inputs: KernelInputs) -> IntegerKernel:
        return IntegerKernel(inputs)


class IntegerKernel:
    """One layer's prepacked oneDNN weight and the scalars the kernel call takes.

    Input scales come in three kinds: static (calibrated, held here as Python numbers), per call (the
    layer passes ``(scale, zero_point)``: a timestep group's, or a dynamic per-tensor one) and per token
    (dynamic: the kernel runs with scale 1 and multiplies each output token / pixel by its input's scale,
    exact because a per-row scale factors out of the sum; an asymmetric row's zero point ``z`` factors out
    too, as ``z * sum_k W[n, k]``, a rank-1 term subtracted before the scale).

    A plain object, not a module: nothing here is a parameter or buffer, so it is never saved, never moved
    by ``.to()``, and is rebuilt from the layer's buffers (:meth:`OneDNNBackend.build`) when they change.
    """

    def __init__(self, inputs: KernelInputs):
        activations = inputs.activations
        c_out = inputs.c_out
        self.bits, self.symmetric = activations.bits, activations.symmetric
        self.per_token = activations.granularity == "token"
        self.clip_ratio = activations.clip_ratio
        self.q_max = (1 << (activations.bits - 1)) - 1  # largest signed value of symmetric inputs
        if activations.symmetric:  # signed q in [-2^(b-1), 2^(b-1)-1] is u8 q + 128 with zero point 128
            self.q_low, self.q_high = 128 - (1 << (activations.bits - 1)), 127 + (1 << (activations.bits - 1))
        else:
            self.q_low, self.q_high = 0, (1 << activations.bits) - 1
        # Python numbers, as the op schema wants (and .item() in forward would break torch.compile graphs).
        # Per-call and per-token kernels are packed with a placeholder: the call's own numbers are used.
        static = inputs.input_scale is not None and inputs.input_scale.dim() == 0
        scale, zero_point = (float(inputs.input_scale), int(inputs.input_zero_point)) if static else (1.0, 0)
        self.x_scale, self.x_zp = self.affine(scale, zero_point)
        self.w_scale = inputs.weight_scale.reshape(-1).float().expand(c_out).contiguous()  # (C_out,)
        self.w_zp = torch.zeros(c_out, dtype=torch.int64)
        q = inputs.int8_weight().reshape(inputs.weight_shape)  # (C_out, K) or (C_out, C_in/g, kh, kw)
        # asymmetric per-token inputs: y = s_x * (w_s * sum_k q_x W - z_x * w_s * sum_k W), per output channel
        self.w_row_sums = self.w_scale * q.reshape(c_out, -1).sum(dim=1).float()  # (C_out,)
        self.is_conv = inputs.conv is not None
        if self.is_conv:
            self.conv_args = _conv_args(inputs)
            # x_shape None: any input size. The scales go in because oneDNN precomputes zero-point terms; the
            # call's scale and zero point are honoured (kernel_support checks it: per_call_scales).
            self.packed = torch.ops.onednn.qconv_prepack(
                q, self.w_scale, self.x_scale, self.x_zp, *self.conv_args, None
            )
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)

    def affine(self, scale: float, zero_point: int) -> tuple[float, int]:
        """A layer's (scale, zero point) as the kernel takes them: uint8, so symmetric inputs shift by 128."""
        return scale, zero_point + 128 if self.symmetric else zero_point

    def dense_weight(self) -> Tensor:
        """The int8 weight ``(C_out, K)`` read back from the packed copy (equals the widened ``weight_q``).

        The packed copy alone holds the weight: in integer mode the layer releases ``weight_q`` and rebuilds
        it from here for saving, the reference fallback, ``.to()`` and copies.
        """
        dense = self.packed.to_dense()  # Linear: (K, C_out); Conv2d: (C_out, C_in/g, kh, kw)
        if self.is_conv:
            return dense.reshape(dense.shape[0], -1)
        return dense.t().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (oneDNN's own buffer, outside ``state_dict``)."""
        try:
            return int(torch.ops.mkldnn._nbytes(self.packed))
        except (AttributeError, RuntimeError):
            return self.packed.numel() * self.packed.element_size()

    requirement = "float32 CPU inputs without autograd"

    @staticmethod
    def accepts(x: Tensor) -> bool:
        """Inputs the kernel computes like the reference: fp32 on CPU, no autograd, not empty."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def quantize(self, x: Tensor, x_scale: float | Tensor | None = None, x_zp: int | None = None) -> Tensor:
        """uint8 input, bit-identical to ``primitives.quantize`` (shifted by 128 for symmetric inputs).

        ``x_scale`` may be a tensor that broadcasts over ``x`` (per-token scales). Not
        ``torch.quantize_per_tensor``: it multiplies by ``1 / scale``, so a few values round the other way
        (65-90 dB instead of exact), and the flips compound through a whole model.
        """
        x_scale = self.x_scale if x_scale is None else x_scale
        x_zp = self.x_zp if x_zp is None else x_zp
        if torch.compiler.is_compiling():  # plain ATen ops fuse into the kernel that produces x
            return torch.clamp(torch.round(x / x_scale) + x_zp, self.q_low, self.q_high).to(torch.uint8)
        y = x / x_scale  # one temporary, then in place: 1.3-2.6x faster than the functional form
        y.round_().add_(x_zp).clamp_(self.q_low, self.q_high)
        return y.to(torch.uint8)

    def token_qparams(self, x: Tensor, channel: int) -> tuple[Tensor, Tensor | int]:
        """Per-token (per-pixel) ``(scale, zero point)`` of ``x`` as the kernel takes them, bit-identical to
        ``compute_qparams`` of each token's min / max along the channel dimension, kept for broadcasting.
        Symmetric: ``max|x| / q_max`` and the fixed uint8 shift; asymmetric: a zero point per token."""
        clip = self.clip_ratio  # the layer multiplies each range by it first: the same product, bit for bit
        if self.symmetric:
            absmax = x.abs().amax(dim=channel, keepdim=True)
            return ((absmax * clip if clip != 1.0 else absmax) / self.q_max).clamp_min(SCALE_EPS), self.x_zp
        low, high = x.amin(dim=channel, keepdim=True), x.amax(dim=channel, keepdim=True)
        if clip != 1.0:
            low, high = low * clip, high * clip
        return compute_qparams(low, high, self.bits, False)

    def rescale_tokens(self, y: Tensor, scale: Tensor, zero_point: Tensor | int, w_row_sums: Tensor) -> Tensor:
        """``w_s * sum(q W)`` from a kernel run at scale 1 -> the layer's output: subtract each token's zero
        point times the weight's row sums (asymmetric), then multiply by the token's scale. In place."""
        if not self.symmetric:
            y = y.sub_(zero_point.to(y.dtype) * w_row_sums)  # (..., C_out) - (..., 1) * (C_out,)
        return y.mul_(scale)

    def __call__(self, x: Tensor, bias: Tensor | None, input_qparams: tuple[float, int] | None = None) -> Tensor:
        y = self._compute(x, bias, input_qparams)
        # NaN has no uint8 image: the kernel alone would turn it into a finite value and hide it from the
        # numerics guard downstream. A call whose input holds NaN answers NaN (the whole output).
        if not torch.compiler.is_compiling() and bool(torch.isnan(x).any()):
            y = y.add_(float("nan"))
        return y

    def _compute(self, x: Tensor, bias: Tensor | None, input_qparams: tuple[float, int] | None) -> Tensor:
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        x_scale, x_zp = self.x_scale, self.x_zp
        if input_qparams is not None:
            x_scale, x_zp = self.affine(*input_qparams)
        if not self.is_conv:  # (..., K) -> (..., C_out): the op takes any leading dims
            if self.per_token:
                scale, zero_point = self.token_qparams(x, -1)  # (..., 1) each
                q = self.quantize(x, scale, zero_point).contiguous()  # (..., K) uint8
                y = _qlinear(q, 1.0, self.x_zp, self.packed, self.w_scale, self.w_zp, None)  # w_s * sum(q w)
                y = self.rescale_tokens(y, scale, zero_point, self.w_row_sums)
                return y if bias is None else y.add_(bias)
            q = self.quantize(x, x_scale, x_zp).contiguous()  # (..., K) uint8
            return _qlinear(q, x_scale, x_zp, self.packed, self.w_scale, self.w_zp, bias)
        unbatched = x.dim() == 3  # nn.Conv2d accepts (C, H, W)
        x4 = x.unsqueeze(0) if unbatched else x  # (N, C_in, H, W)
        if self.per_token:  # a 1x1 convolution: per-pixel scales factor out like per-token ones
            scale, zero_point = self.token_qparams(x4, 1)  # (N, 1, H, W) each
            q = self.quantize(x4, scale, zero_point)
            y = _qconv(q, 1.0, self.x_zp, self.packed, self.w_scale, self.w_zp, None, self.conv_args)
            y = self.rescale_tokens(y, scale, zero_point, self.w_row_sums[:, None, None])
            y = y if bias is None else y.add_(bias[:, None, None])
        else:
            y = _qconv(
                self.quantize(x4, x_scale, x_zp),
                x_scale,
                x_zp,
                self.packed,
                self.w_scale,
                self.w_zp,
                bias,
                self.conv_args,
            )
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()  # as nn.Conv2d: NCHW in, NCHW out (callers may .view() the result)
        return y.squeeze(0) if unbatched else y
