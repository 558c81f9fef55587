"""Layer-level probe: which int8 execution path should QuantizedLinear / QuantizedConv2d use on this CPU?

For SD1.5-UNet-sized Linear and Conv2d layers (32x32 latent, batch 2) it times, side by side in one process
with interleaved repeats (medians), every candidate path against fp32 eager and fp32 ``torch.compile``,
and measures how close each integer path is to quantdiff's own fake-quant reference
(``quantdiff.nn.QuantizedLinear`` / ``QuantizedConv2d`` forward) by SQNR.

Paths (see KERNELS.md for what each one is):

* ``fp32``        nn.Linear / nn.Conv2d, eager
* ``fp32c``       the same module under torch.compile (inductor, freezing=True)
* ``fq``          quantdiff's fake-quant reference forward (today's QuantizedLinear / QuantizedConv2d)
* ``a_x86``       torch.ops.quantized.linear / conv2d (x86 engine = fbgemm/onednn), quint8 in, requantized
                  quint8 out with a calibrated output scale, dequantized to fp32
* ``a_dyn``       torch.ops.quantized.linear_dynamic (fp32 in/out, its own per-call activation range)
* ``e_onednn``    torch.ops.onednn.qlinear_pointwise / qconv_pointwise called eagerly: uint8 input quantized
                  with OUR static scale, prepacked int8 weight with OUR per-channel scales, fp32 output
* ``b_pt2e``      our module written as quantized_decomposed q/dq + aten op, torch.compile'd with freezing:
                  inductor rewrites it to the same onednn ops (checked in the generated code)
* ``c_intmm``     torch._int_mm (s8 x s8 -> s32) + rescale, torch.compile'd (Linear only)

Accuracy columns: SQNR (dB) of the integer path against the fake-quant reference with the SAME bit widths
(W8A8 = int8 weights, uint8 activations; W8A7 = activations restricted to 0..127 (reduce_range);
W7A8 = weights restricted to -64..63), and of each fake-quant reference against fp32 (the quantization
error itself).

Usage::

    .venv/bin/python benchmarks/kernel_probe.py            # full table (~10-15 min on 2 shared cores)
    .venv/bin/python benchmarks/kernel_probe.py --quick    # 3 Linear + 3 Conv2d shapes, no _int_mm, < 3 min

It prints markdown and writes it into benchmarks/KERNELS.md between the kernel_probe markers (the rest of the
file, the hand-written analysis, is kept).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# torchao registers quantized_decomposed.{quantize,dequantize}_per_channel, which torch 2.13 no longer does.
import torchao.quantization.pt2e  # noqa: E402,F401
from torch import nn  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402

from quantdiff.nn.quantized import QUANTIZED_CLASSES, QuantizedConv2d  # noqa: E402
from quantdiff.plan import LayerPlan  # noqa: E402
from quantdiff.primitives import compute_qparams, sqnr_db  # noqa: E402
from quantdiff.recipe import TensorSpec  # noqa: E402

qd = torch.ops.quantized_decomposed
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LinearShape:
    name: str
    tokens: tuple[int, ...]  # leading dims of the input, e.g. (2, 1024)
    k: int
    n: int
    input_kind: str  # how the input is distributed: "ln" (centred, zp ~ 128) or "geglu" (heavy tail)

    kind = "Linear"

    @property
    def flops(self) -> float:
        return 2 * math.prod(self.tokens) * self.k * self.n


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    hw: int
    kernel: int
    stride: int
    input_kind: str  # "silu" (after GroupNorm+SiLU, zp small) or "ln" (centred)

    kind = "Conv2d"

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def flops(self) -> float:
        return 2 * 2 * self.out_hw**2 * self.c_out * self.c_in * self.kernel**2


# SD1.5 UNet at 32x32 latent, batch 2 (CFG). Names say where the layer occurs.
LINEARS = [
    LinearShape("attn1 q/k/v/out, down0 (1024 tok)", (2, 1024), 320, 320, "ln"),
    LinearShape("ff GEGLU proj, down0", (2, 1024), 320, 2560, "ln"),
    LinearShape("ff out, down0", (2, 1024), 1280, 320, "geglu"),
    LinearShape("attn2 to_k/to_v (77 text tok)", (2, 77), 768, 320, "ln"),
    LinearShape("attn1 q, down1 (256 tok)", (2, 256), 640, 640, "ln"),
    LinearShape("ff GEGLU proj, down2 (64 tok)", (2, 64), 1280, 10240, "ln"),
    LinearShape("ff out, down2 (64 tok)", (2, 64), 5120, 1280, "geglu"),
]
CONVS = [
    ConvShape("resnet 3x3 320->320 @32", 320, 320, 32, 3, 1, "silu"),
    ConvShape("resnet 3x3 640->640 @16", 640, 640, 16, 3, 1, "silu"),
    ConvShape("resnet 3x3 1280->1280 @8", 1280, 1280, 8, 3, 1, "silu"),
    ConvShape("resnet 3x3 1280->1280 @4", 1280, 1280, 4, 3, 1, "silu"),
    ConvShape("up resnet 3x3 960->320 @32", 960, 320, 32, 3, 1, "silu"),
    ConvShape("proj_in 1x1 320->320 @32", 320, 320, 32, 1, 1, "ln"),
    ConvShape("shortcut 1x1 960->320 @32", 960, 320, 32, 1, 1, "ln"),
    ConvShape("downsample 3x3 s2 320 @32", 320, 320, 32, 3, 2, "ln"),
]
QUICK_LINEARS = [0, 1, 5]
QUICK_CONVS = [0, 2, 5]

# name -> (weight bits, activation bits, pair-safe int8 weights)
BITS = {"W8A8": (8, 8, False), "W8pA8": (8, 8, True), "W8A7": (8, 7, False), "W7A8": (7, 8, False)}

# vpmaddubsw (AVX2 without VNNI) adds u8*s8 products of two neighbouring input channels into a SATURATING
# int16: |a0*w0 + a1*w1| can reach 2*255*128 = 65280 > 32767. oneDNN and fbgemm pair input channels
# (2j, 2j+1); for Conv2d at the same (kh, kw) tap. With u8 activations in 0..255, a pair is safe iff
# its same-sign weights satisfy |w0 + w1| <= 128 (255 * 128 = 32640). "W8pA8" = int8 weights quantized
# under that constraint (pair_safe_quantize), "W7A8" = 7-bit weights, "W8A7" = 7-bit activations.
PAIR_LIMIT = 128


def _clip_pairs(q: torch.Tensor) -> torch.Tensor:
    """Move every same-sign pair (q[:, 2j], q[:, 2j+1]) with |sum| > 128 onto |sum| = 128 (excess split in two)."""
    a, b = q[:, 0::2].clone(), q[:, 1::2].clone()
    for sign in (1, -1):
        excess = (sign * (a + b) - PAIR_LIMIT).clamp(min=0)
        excess = torch.where((sign * a > 0) & (sign * b > 0), excess, torch.zeros_like(excess))
        a_takes_more = a.abs() >= b.abs()
        half_up, half_down = (
            torch.div(excess + 1, 2, rounding_mode="floor"),
            torch.div(excess, 2, rounding_mode="floor"),
        )
        a = a - sign * torch.where(a_takes_more, half_up, half_down)
        b = b - sign * torch.where(a_takes_more, half_down, half_up)
    out = q.clone()
    out[:, 0::2], out[:, 1::2] = a, b
    return out


def pair_safe_quantize(weight: torch.Tensor, steps: int = 11) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Symmetric per-channel int8 weights that cannot saturate the AVX2 u8*s8 pair sums.

    For each output channel, try scales ``absmax/127 * f`` for f in [1, 2] (f = 2 is a 7-bit weight), clip
    the pairs that still violate |w0 + w1| <= 128, and keep the f with the smallest weight MSE. Pairs run
    over input channels (dim 1), per kernel tap for Conv2d. Returns ``(weight_q (C_out, K) int8,
    weight_scale (C_out, 1) fp32, fraction of channels whose scale grew)`` in quantdiff's layout.
    """
    c_out, c_in = weight.shape[:2]
    w = weight.detach().float().reshape(c_out, c_in, -1)  # (C_out, C_in, taps)
    if c_in % 2:  # odd: the last channel pairs with oneDNN's zero padding
        w = F.pad(w, (0, 0, 0, 1))
    base = (w.abs().amax(dim=(1, 2)) / 127).clamp_min(1e-12)  # (C_out,)
    best_q = best_s = best_err = best_f = None
    for f in torch.linspace(1.0, 2.0, steps).tolist():
        scale = base * f
        q = _clip_pairs(torch.round(w / scale[:, None, None]).clamp(-128, 127))
        err = (w - q * scale[:, None, None]).square().sum(dim=(1, 2))
        if best_err is None:
            best_q, best_s, best_err, best_f = q, scale, err, torch.full_like(err, f)
        else:
            better = err < best_err
            best_q = torch.where(better[:, None, None], q, best_q)
            best_s = torch.where(better, scale, best_s)
            best_f = torch.where(better, torch.full_like(err, f), best_f)
            best_err = torch.minimum(err, best_err)
    q = best_q[:, :c_in].reshape(c_out, -1).to(torch.int8).contiguous()
    return q, best_s.float().reshape(c_out, 1), float((best_f > 1).float().mean())


def make_input(shape, generator: torch.Generator) -> torch.Tensor:
    """A realistic activation for the layer: centred (LayerNorm/GroupNorm output), post-SiLU or GEGLU."""
    if shape.kind == "Linear":
        size = (*shape.tokens, shape.k)
    else:
        size = (2, shape.c_in, shape.hw, shape.hw)
    x = torch.randn(size, generator=generator)
    if shape.input_kind == "silu":
        return F.silu(x * 1.5)
    if shape.input_kind == "geglu":
        return torch.randn(size, generator=generator) * F.gelu(x * 1.5)
    return x


def make_float_layer(shape, generator: torch.Generator, init: str = "normal") -> nn.Module:
    """The float layer. ``normal``: N(0, 1/fan_in) weights (bell-shaped, like trained weights: most int8
    values small); ``uniform``: PyTorch's default kaiming-uniform init (int8 values spread over the whole
    range: the worst case for int16 pair saturation, and what a from_config UNet has)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    if shape.kind == "Linear":
        layer = nn.Linear(shape.k, shape.n)
    else:
        layer = nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, shape.stride, padding=shape.kernel // 2)
    if init == "normal":
        with torch.no_grad():
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, fan_in**-0.5)
    return layer.eval()


def make_reference(layer: nn.Module, x: torch.Tensor, wbits: int, abits: int, safe: bool = False):
    """quantdiff's fake-quant module for ``layer`` with min-max weight scales and a min-max static input scale.

    ``safe``: replace the stored int8 weight by its pair-safe version (what a convert-time option would do).
    """
    wspec = TensorSpec(bits=wbits, symmetric=True, granularity="channel")
    aspec = TensorSpec(bits=abits, symmetric=False, granularity="tensor")
    kind = type(layer).__name__
    plan = LayerPlan("probe", kind, tuple(layer.weight.shape), True, wspec, aspec, "probe")
    q = QUANTIZED_CLASSES[kind].like(layer, plan)
    q.set_weight(layer.weight.detach())
    with torch.no_grad():
        q.bias.copy_(layer.bias)
    scale, zero_point = compute_qparams(x.min(), x.max(), abits, symmetric=False)
    q.set_input_qparams(scale, zero_point)
    if safe:
        q.weight_q, q.weight_scale, q.pair_changed = pair_safe_quantize(layer.weight)
    return q.eval()


# ------------------------------------------------------------------------------- candidate integer paths
class OnednnInt8(nn.Module):
    """Path (e): eager oneDNN int8 kernels, fp32 output, straight from quantdiff's buffers.

    Precomputed once (convert/load time): the oneDNN-packed weight (``*_prepack``), the per-channel scales
    as a flat fp32 vector, zero weight zero points, and the static input scale / zero point as Python
    numbers (the op signature wants float/int).
    """

    def __init__(self, ref):
        super().__init__()
        self.is_conv = isinstance(ref, QuantizedConv2d)
        c_out = ref.weight_shape[0]
        w_q = ref.weight_q.reshape(ref.weight_shape)  # (C_out, K) -> conv (C_out, C_in/g, kh, kw)
        self.x_scale = float(ref.input_scale)
        self.x_zp = int(ref.input_zero_point)
        self.x_qmax = (1 << ref.input_spec.bits) - 1
        self.w_scale = ref.weight_scale.reshape(-1).contiguous()  # (C_out,) fp32
        self.w_zp = torch.zeros(c_out, dtype=torch.int64)
        self.bias = None if ref.bias is None else ref.bias.detach()
        if self.is_conv:
            self.conv_args = ([*ref.stride], [*ref.padding], [*ref.dilation], ref.groups)
            self.packed = torch.ops.onednn.qconv_prepack(
                w_q, self.w_scale, self.x_scale, self.x_zp, *self.conv_args, None
            )
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(w_q, None)

    fast_quantize = False  # class-wide switch, see quantize()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 input with the static scale, rounded exactly like quantdiff.primitives.quantize.

        ``round(x / scale) + zero_point`` (division, round-half-even) must match the reference bit for bit:
        a 1-ulp difference flips the rounding of a few values, and in a whole UNet those 1-LSB flips compound
        layer after layer to the level of the quantization noise itself (measured: 28 dB end to end with
        the faster ``quantize_per_tensor``, which multiplies by 1/scale). Under torch.compile these plain
        aten ops fuse into the kernel that produces x (GroupNorm+SiLU, LayerNorm, GEGLU...).
        """
        if self.fast_quantize and not torch.compiler.is_compiling():
            # one fused ATen kernel + a 1-byte copy; x * (1/scale) rounding, deprecated quint8 API
            q = torch.quantize_per_tensor(x, self.x_scale, self.x_zp, torch.quint8).int_repr()
            return q.clamp_(max=self.x_qmax) if self.x_qmax < 255 else q
        if torch.compiler.is_compiling():
            return torch.clamp(torch.round(x / self.x_scale) + self.x_zp, 0, self.x_qmax).to(torch.uint8)
        # eager: the same arithmetic in place on one temporary (1.3-2.6x faster than the functional form)
        y = x / self.x_scale
        y.round_().add_(self.x_zp).clamp_(0, self.x_qmax)
        return y.to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_quantized(self.quantize(x))

    def forward_quantized(self, q: torch.Tensor) -> torch.Tensor:
        operands = (q, self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp, self.bias)
        # output scale 1 and zero point 0 with an fp32 output: no requantization, no fused post-op
        output = (1.0, 0, torch.float32, "none", [], "")
        if self.is_conv:
            return torch.ops.onednn.qconv_pointwise(*operands, *self.conv_args, *output)
        return torch.ops.onednn.qlinear_pointwise(*operands, *output)


class PT2EDecomposed(nn.Module):
    """Path (b): the q/dq pattern inductor's quantization passes recognise, written in our module's forward.

    Under torch.compile with freezing the int8 weight buffer becomes a constant, the pattern
    dequant(x) -> linear/conv <- dequant_per_channel(w_q) is rewritten to onednn.qlinear/qconv_pointwise
    with a constant-folded prepacked weight. Scales must be Python floats (the .tensor variant of
    the lowering asserts ``type(x_scale) is float`` in torch 2.13).
    """

    def __init__(self, ref):
        super().__init__()
        self.is_conv = isinstance(ref, QuantizedConv2d)
        self.register_buffer("weight_q", ref.weight_q.reshape(ref.weight_shape).clone())
        self.register_buffer("weight_scale", ref.weight_scale.reshape(-1).clone())
        self.register_buffer("weight_zp", torch.zeros(ref.weight_shape[0], dtype=torch.int64))
        self.bias = nn.Parameter(ref.bias.detach().clone(), requires_grad=False)
        self.x_scale = float(ref.input_scale)
        self.x_zp = int(ref.input_zero_point)
        self.x_qmax = (1 << ref.input_spec.bits) - 1
        wbits = ref.weight_spec.bits
        self.w_qmin, self.w_qmax = -(1 << (wbits - 1)), (1 << (wbits - 1)) - 1
        if self.is_conv:
            self.conv_args = (ref.stride, ref.padding, ref.dilation, ref.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = qd.quantize_per_tensor(x, self.x_scale, self.x_zp, 0, self.x_qmax, torch.uint8)
        x_dq = qd.dequantize_per_tensor(q, self.x_scale, self.x_zp, 0, self.x_qmax, torch.uint8)
        w = qd.dequantize_per_channel(
            self.weight_q, self.weight_scale, self.weight_zp, 0, self.w_qmin, self.w_qmax, torch.int8
        )
        if self.is_conv:
            return F.conv2d(x_dq, w, self.bias, *self.conv_args)
        return F.linear(x_dq, w, self.bias)


class IntMMLinear(nn.Module):
    """Path (c): s8 x s8 -> s32 torch._int_mm, exact, with zero-point correction and fp32 rescale."""

    def __init__(self, ref):
        super().__init__()
        w_q = ref.weight_q  # (N, K) int8
        self.x_scale = float(ref.input_scale)
        self.x_zp_s8 = int(ref.input_zero_point) - 128  # u8 value q -> s8 value q - 128
        self.register_buffer("w_t", w_q.t().contiguous())  # (K, N)
        self.register_buffer("out_scale", (ref.weight_scale.reshape(1, -1) * self.x_scale).contiguous())
        self.register_buffer("zp_corr", (self.x_zp_s8 * w_q.to(torch.int32).sum(1)).reshape(1, -1))
        self.bias = nn.Parameter(ref.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        q = (torch.round(x2 / self.x_scale) + self.x_zp_s8).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(q, self.w_t) - self.zp_corr
        return (acc.to(torch.float32) * self.out_scale + self.bias).reshape(*lead, -1)


class X86Quantized:
    """Path (a): torch.ops.quantized.* (x86 engine): quint8 in, requantized quint8 out, dequantized."""

    def __init__(self, ref, out_ref: torch.Tensor):
        torch.backends.quantized.engine = "x86"
        self.is_conv = isinstance(ref, QuantizedConv2d)
        w = ref.dequantized_weight()
        w_q = torch.quantize_per_channel(
            w, ref.weight_scale.reshape(-1).double(), torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8
        )
        self.x_scale, self.x_zp = float(ref.input_scale), int(ref.input_zero_point)
        lo, hi = float(out_ref.min()), float(out_ref.max())
        self.out_scale = (hi - lo) / 255  # calibrated static OUTPUT scale: an extra quantization
        self.out_zp = int(round(-lo / self.out_scale))
        if self.is_conv:
            self.packed = torch.ops.quantized.conv2d_prepack(
                w_q, ref.bias.detach(), list(ref.stride), list(ref.padding), list(ref.dilation), ref.groups
            )
        else:
            self.packed = torch.ops.quantized.linear_prepack(w_q, ref.bias.detach())

    def __call__(self, x):
        qx = torch.quantize_per_tensor(x, self.x_scale, self.x_zp, torch.quint8)
        op = torch.ops.quantized.conv2d if self.is_conv else torch.ops.quantized.linear
        return op(qx, self.packed, self.out_scale, self.out_zp).dequantize()

    def dynamic(self, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)  # reduce_range=True (AVX2)


# ------------------------------------------------------------------------------------------------ timing
def compile_module(module: nn.Module, x: torch.Tensor):
    """torch.compile with freezing; returns (callable, first-call seconds, generated source)."""
    compiled = torch.compile(module)
    t0 = time.perf_counter()
    with torch.no_grad():
        _, code = run_and_get_code(compiled, x)
    return compiled, time.perf_counter() - t0, "\n".join(code)


def interleaved_medians(fns: dict, x, repeats: int, seed: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per path; each round runs every path once, in a fresh random order."""
    import random

    rng = random.Random(seed)
    times = {k: [] for k in fns}
    keys = list(fns)
    with torch.no_grad():
        for f in fns.values():
            for _ in range(warmup):
                f(x)
        for _ in range(repeats):
            rng.shuffle(keys)
            for k in keys:
                t0 = time.perf_counter()
                fns[k](x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def count(src: str, *needles: str) -> dict[str, int]:
    return {n: src.count(n) for n in needles}


def adversarial_sqnr(module: OnednnInt8, ref, x_like: torch.Tensor) -> float:
    """SQNR of the oneDNN kernel vs exact integer math on an all-255 / random {0,255} uint8 input (worst case)."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randint(0, 2, x_like.shape, generator=g) * 255).to(torch.uint8)
    q[..., : q.shape[-1] // 2] = 255
    x_scale, x_zp = module.x_scale, module.x_zp
    if module.is_conv:
        y = torch.ops.onednn.qconv_pointwise(
            q,
            x_scale,
            x_zp,
            module.packed,
            module.w_scale,
            module.w_zp,
            None,
            *module.conv_args,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        w = ref.weight_q.reshape(ref.weight_shape).double()
        exact = F.conv2d(q.double() - x_zp, w, None, ref.stride, ref.padding, ref.dilation, ref.groups)
        exact = exact * x_scale * module.w_scale.double()[None, :, None, None]
    else:
        y = torch.ops.onednn.qlinear_pointwise(
            q,
            x_scale,
            x_zp,
            module.packed,
            module.w_scale,
            module.w_zp,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        exact = (q.double() - x_zp) @ ref.weight_q.double().t() * x_scale * module.w_scale.double()
    return sqnr_db(exact, y)


def ort_probe(shape, layer, x, ref_out) -> dict:
    """Path (d): ONNX Runtime static QDQ (u8 activations, per-channel s8 weights) for one layer."""
    import logging
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x.numpy()}])

        def get_next(self):
            return next(self.it, None)

    out = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        torch.onnx.export(layer, (x,), f"{d}/f.onnx", input_names=["x"], output_names=["y"], dynamo=False)
        quantize_static(
            f"{d}/f.onnx",
            f"{d}/q.onnx",
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=False,
        )
        out["prep_s"] = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        sf = ort.InferenceSession(f"{d}/f.onnx", so, providers=["CPUExecutionProvider"])
        sq = ort.InferenceSession(f"{d}/q.onnx", so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    out["sqnr"] = sqnr_db(ref_out, torch.from_numpy(sq.run(None, {"x": xn})[0]))
    out["fns"] = {"d_ort_fp32": lambda _x: sf.run(None, {"x": xn}), "d_ort_qdq": lambda _x: sq.run(None, {"x": xn})}
    return out


def probe(shape, repeats: int, generator: torch.Generator, with_intmm: bool, with_ort: bool) -> dict:
    torch._dynamo.reset()
    x = make_input(shape, generator)
    layer = make_float_layer(shape, generator, "normal")
    layer_u = make_float_layer(shape, generator, "uniform")
    row = {"shape": shape}
    with torch.no_grad():
        y_fp32 = layer(x)
        refs = {tag: make_reference(layer, x, *bits) for tag, bits in BITS.items()}
        ref_out = {tag: r(x) for tag, r in refs.items()}
        row["fq_vs_fp32"] = {tag: sqnr_db(y_fp32, o) for tag, o in ref_out.items()}
        row["pair_changed"] = refs["W8pA8"].pair_changed

        # (e) eager oneDNN, one module per bit-width variant (same kernel)
        t0 = time.perf_counter()
        onednn = {tag: OnednnInt8(r) for tag, r in refs.items()}
        row["prepack_s"] = (time.perf_counter() - t0) / len(onednn)
        row["e_sqnr"] = {tag: sqnr_db(ref_out[tag], m(x)) for tag, m in onednn.items()}
        row["e_adv"] = {tag: adversarial_sqnr(onednn[tag], refs[tag], x) for tag in ("W8A8", "W8pA8")}
        row["packed_bytes"] = torch.ops.mkldnn._nbytes(onednn["W8pA8"].packed)
        row["int8_bytes"] = refs["W8A8"].weight_q.numel()
        row["fp32_bytes"] = layer.weight.numel() * 4
        # the same with kaiming-uniform weights (accuracy only)
        refs_u = {tag: make_reference(layer_u, x, *BITS[tag]) for tag in ("W8A8", "W8pA8")}
        row["e_sqnr_uniform"] = {tag: sqnr_db(r(x), OnednnInt8(r)(x)) for tag, r in refs_u.items()}
        row["pair_changed_uniform"] = refs_u["W8pA8"].pair_changed

        # (a) torch.ops.quantized.* with the pair-safe weights (so only the output requantization differs)
        x86 = X86Quantized(refs["W8pA8"], ref_out["W8pA8"])
        row["a_sqnr"] = sqnr_db(ref_out["W8pA8"], x86(x))
        x86_plain = X86Quantized(refs["W8A8"], ref_out["W8A8"])
        row["a_sqnr_plain"] = sqnr_db(ref_out["W8A8"], x86_plain(x))
        if shape.kind == "Linear":
            row["adyn_sqnr"] = sqnr_db(ref_out["W8A8"], x86.dynamic(x))

        # compiled candidates
        fp32c, row["fp32c_compile_s"], _ = compile_module(layer, x)
        pt2e = PT2EDecomposed(refs["W8pA8"]).eval()
        pt2e_c, row["b_compile_s"], src = compile_module(pt2e, x)
        row["b_lowered"] = count(
            src,
            "onednn.qlinear_pointwise",
            "onednn.qconv_pointwise",
            "extern_kernels.mm",
            "extern_kernels.convolution",
            "mkldnn._convolution_pointwise",
            "cpp_fused",
        )
        row["b_sqnr"] = sqnr_db(ref_out["W8pA8"], pt2e_c(x))
        pt2e_plain_c, _, _ = compile_module(PT2EDecomposed(refs["W8A8"]).eval(), x)
        row["b_sqnr_plain"] = sqnr_db(ref_out["W8A8"], pt2e_plain_c(x))

        e = onednn["W8pA8"]
        q_in = e.quantize(x)
        fns = {
            "fp32": layer,
            "fp32c": fp32c,
            "fq": refs["W8pA8"],
            "a_x86": x86,
            "e_onednn": e,
            "e_kernel": lambda _x: e.forward_quantized(q_in),
            "e_onednn_qpt": lambda _x: e.forward_quantized(
                torch.quantize_per_tensor(_x, e.x_scale, e.x_zp, torch.quint8).int_repr()
            ),
            "b_pt2e": pt2e_c,
        }
        if shape.kind == "Linear":
            fns["a_dyn"] = x86.dynamic
        if with_ort:
            try:
                ort_res = ort_probe(shape, layer, x, ref_out["W8A8"])
                fns.update(ort_res["fns"])
                row["d_sqnr"], row["d_prep_s"] = ort_res["sqnr"], ort_res["prep_s"]
            except Exception as err:  # optional path
                row["d_error"] = repr(err)[:200]
        row["t"] = interleaved_medians(fns, x, repeats, seed=len(shape.name))

        if with_intmm and shape.kind == "Linear":
            # (c) is 10-100x slower than fp32 (aten._int_mm is a reference kernel, inductor calls it as an
            # extern kernel), so it is timed separately with 3 repeats, right after an fp32 run for the ratio.
            intmm = IntMMLinear(refs["W8A8"]).eval()
            intmm_c, row["c_compile_s"], src = compile_module(intmm, x)
            row["c_lowered"] = count(src, "extern_kernels._int_mm", "onednn.qlinear_pointwise")
            row["c_sqnr"] = sqnr_db(ref_out["W8A8"], intmm_c(x))
            tc = interleaved_medians({"fp32": layer, "c_intmm": intmm_c}, x, 3, seed=0, warmup=1)
            row["c_ratio"] = tc["fp32"] / tc["c_intmm"]
            row["c_ms"] = tc["c_intmm"]
    gc.collect()
    return row


# ----------------------------------------------------------------------------------------------- report
def machine_description() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    model = re.search(r"Model name:\s*(.+)", lscpu)
    flags_m = re.search(r"Flags:\s*(.+)", lscpu)
    flags = set(flags_m.group(1).split()) if flags_m else set()
    has = {f: (f in flags) for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}
    return (
        f"- CPU: {model.group(1) if model else platform.processor()} ({os.cpu_count()} logical CPUs); flags: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in has.items())
        + f"\n- torch {torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}), "
        f"quantized engine {torch.backends.quantized.engine}, torch threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}"
    )


def fmt_ms(t: float) -> str:
    return f"{t * 1e3:.2f}"


def fmt_db(v) -> str:
    if v is None:
        return "n/a"
    return "exact" if v == math.inf or v > 140 else f"{v:.1f}"


def shape_text(s) -> str:
    if s.kind == "Linear":
        return f"({'x'.join(map(str, s.tokens))}, {s.k}) -> {s.n}"
    return f"{s.c_in}->{s.c_out} k{s.kernel} s{s.stride} @{s.hw}"


SPEED_COLS = [
    ("fq", "fake-quant ref (today)"),
    ("a_x86", "(a) quantized.* q->requant->dq"),
    ("a_dyn", "(a) linear_dynamic"),
    ("e_onednn", "(e) onednn eager (exact quantize + kernel)"),
    ("e_onednn_qpt", "(e) with quantize_per_tensor (fast, 1/scale rounding)"),
    ("e_kernel", "(e) kernel only (input already u8)"),
    ("b_pt2e", "(b) PT2E q/dq compiled"),
    ("d_ort_qdq", "(d) ORT QDQ"),
]


def geomean(vals):
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")


def tables(rows: list[dict]) -> str:
    out = []
    cols = [c for c in SPEED_COLS if any(c[0] in r["t"] for r in rows)]
    out.append(
        "### Speed\n\nMedian ms over interleaved repeats (random order per round). `a/b` after each time: "
        "speedup over fp32 eager / over fp32 torch.compile (freezing) of the same layer.\n"
    )
    out.append(
        "| layer | shape | GFLOP | fp32 eager ms | fp32 compiled ms (vs eager) | "
        + " | ".join(h for _, h in cols)
        + " | (c) _int_mm compiled |"
    )
    out.append("|" + "---|" * (5 + len(cols) + 1))
    for r in rows:
        s, t = r["shape"], r["t"]
        base, basec = t["fp32"], t["fp32c"]
        cells = []
        for k, _ in cols:
            cells.append(f"{fmt_ms(t[k])} ({base / t[k]:.2f}/{basec / t[k]:.2f})" if k in t else "n/a")
        c = f"{r['c_ms'] * 1e3:.0f} ({r['c_ratio']:.2f}x)" if "c_ms" in r else "n/a"
        out.append(
            f"| {s.kind} {s.name} | {shape_text(s)} | {s.flops / 1e9:.2f} | {fmt_ms(base)} | "
            f"{fmt_ms(basec)} ({base / basec:.2f}x) | " + " | ".join(cells) + f" | {c} |"
        )
    out.append("")
    for kind in ("Linear", "Conv2d"):
        rs = [r for r in rows if r["shape"].kind == kind]
        if not rs:
            continue
        parts = [f"fp32 compiled {geomean([r['t']['fp32'] / r['t']['fp32c'] for r in rs]):.2f}x"]
        for k, _ in cols:
            v = [r["t"]["fp32"] / r["t"][k] for r in rs if k in r["t"]]
            vc = [r["t"]["fp32c"] / r["t"][k] for r in rs if k in r["t"]]
            if v:
                parts.append(f"{k} {geomean(v):.2f}x / {geomean(vc):.2f}x")
        tot = {k: sum(r["t"][k] for r in rs) for k in ("fp32", "fp32c", "e_onednn", "e_kernel", "b_pt2e")}
        out.append(
            f"- {kind} geometric mean over {len(rs)} shapes, speedup vs fp32 eager / vs fp32 compiled: "
            + "; ".join(parts)
            + ". Summed ms: "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in tot.items())
        )

    out.append(
        "\n### Accuracy\n\nSQNR (dB) of each integer path against quantdiff's fake-quant reference "
        "(`QuantizedLinear`/`QuantizedConv2d` forward) with the SAME stored integers and scales; "
        "'exact' = above 140 dB (float64-level). W8A8: plain min-max int8 weights; W8pA8: int8 weights "
        "quantized pair-safe (scale search + pair clipping, see text); W8A7: activations 0..127 (reduce_range); W7A8: weights -64..63. "
        "'adversarial' = worst-case u8 input (half all-255, half random 0/255) vs exact integer math. "
        "Weights N(0, 1/fan_in) unless marked 'uniform init' (PyTorch default kaiming-uniform, worst case).\n"
    )
    out.append(
        "| layer (input) | (e) W8A8 | (e) W8pA8 | (e) W8A7 | (e) W7A8 | (e) adversarial W8A8 / W8pA8 "
        "| (e) uniform init W8A8 / W8pA8 | (b) W8A8 / W8pA8 | (a) W8A8 / W8pA8 | (a) dynamic | (c) _int_mm | (d) ORT QDQ "
        "| channels with grown scale, pair-safe (normal / uniform init) |"
    )
    out.append("|" + "---|" * 13)
    for r in rows:
        s, e = r["shape"], r["e_sqnr"]
        out.append(
            f"| {s.kind} {s.name} ({s.input_kind}) | {fmt_db(e['W8A8'])} | {fmt_db(e['W8pA8'])} | {fmt_db(e['W8A7'])} | "
            f"{fmt_db(e['W7A8'])} | {fmt_db(r['e_adv']['W8A8'])} / {fmt_db(r['e_adv']['W8pA8'])} | "
            f"{fmt_db(r['e_sqnr_uniform']['W8A8'])} / {fmt_db(r['e_sqnr_uniform']['W8pA8'])} | "
            f"{fmt_db(r['b_sqnr_plain'])} / {fmt_db(r['b_sqnr'])} | {fmt_db(r['a_sqnr_plain'])} / {fmt_db(r['a_sqnr'])} | "
            f"{fmt_db(r.get('adyn_sqnr'))} | {fmt_db(r.get('c_sqnr'))} | {fmt_db(r.get('d_sqnr'))} | "
            f"{r['pair_changed'] * 100:.0f}% / {r['pair_changed_uniform'] * 100:.0f}% |"
        )
    out.append("\nQuantization error itself: fake-quant reference vs fp32 (SQNR dB, normal-init weights)\n")
    out.append("| layer | W8A8 | W8pA8 (pair-safe) | W8A7 (reduce_range) | W7A8 |")
    out.append("|---|---|---|---|---|")
    for r in rows:
        f = r["fq_vs_fp32"]
        out.append(
            f"| {r['shape'].kind} {r['shape'].name} | {fmt_db(f['W8A8'])} | {fmt_db(f['W8pA8'])} | "
            f"{fmt_db(f['W8A7'])} | {fmt_db(f['W7A8'])} |"
        )

    out.append("\n### One-time cost and weight memory\n")
    out.append(
        "| layer | fp32 weight bytes | int8 weight_q bytes | onednn packed bytes | prepack ms | compile s: fp32 / (b) / (c) "
        "| (b) generated code | (c) generated code |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["shape"]
        low_b = ", ".join(f"{k}={v}" for k, v in r["b_lowered"].items() if v)
        low_c = ", ".join(f"{k}={v}" for k, v in r.get("c_lowered", {}).items() if v) or "n/a"
        c_s = f"{r['c_compile_s']:.1f}" if "c_compile_s" in r else "n/a"
        out.append(
            f"| {s.kind} {s.name} | {r['fp32_bytes']:,} | {r['int8_bytes']:,} | {r['packed_bytes']:,} | "
            f"{r['prepack_s'] * 1e3:.1f} | {r['fp32c_compile_s']:.1f} / {r['b_compile_s']:.1f} / {c_s} | {low_b} | {low_c} |"
        )
    if any("d_prep_s" in r for r in rows):
        out.append(
            "\n(d) ORT: export + quantize_static per layer "
            + ", ".join(f"{r['shape'].name}: {r['d_prep_s']:.1f} s" for r in rows if "d_prep_s" in r)
            + "."
        )
    errs = [f"{r['shape'].name}: {r['d_error']}" for r in rows if "d_error" in r]
    if errs:
        out.append("\n(d) ORT failed: " + "; ".join(errs))
    return "\n".join(out)


BEGIN, END = "<!-- kernel_probe:begin -->", "<!-- kernel_probe:end -->"


def write_report(path: Path, text: str) -> None:
    """Replace the generated block of KERNELS.md (between the markers), keeping the hand-written text."""
    block = f"{BEGIN}\n{text}\n{END}"
    if path.exists():
        old = path.read_text()
        if BEGIN in old and END in old:
            head, rest = old.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            path.write_text(head + block + tail)
            return
        path.write_text(old.rstrip() + "\n\n" + block + "\n")
        return
    path.write_text("# Integer kernels on this CPU\n\n" + block + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 Linear + 3 Conv2d shapes, 5 repeats, no _int_mm")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per path (default 11, quick 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ort", action="store_true", help="skip (d) ONNX Runtime")
    parser.add_argument("--no-intmm", action="store_true", help="skip (c) torch._int_mm (slow)")
    parser.add_argument("--out", type=Path, default=HERE / "KERNELS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    inductor_config.freezing = True
    inductor_config.fx_graph_cache = False  # report cold compile times
    torch._dynamo.config.cache_size_limit = 64
    repeats = args.repeats or (5 if args.quick else 11)
    shapes = [LINEARS[i] for i in QUICK_LINEARS] + [CONVS[i] for i in QUICK_CONVS] if args.quick else LINEARS + CONVS
    with_intmm = not args.no_intmm and not args.quick
    generator = torch.Generator().manual_seed(0)
    rows = []
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    for i, shape in enumerate(shapes):
        t0 = time.perf_counter()
        with_ort = not args.no_ort and (i == 0 or shape is CONVS[0] or not args.quick)
        rows.append(probe(shape, repeats, generator, with_intmm and (not args.quick), with_ort))
        print(
            f"[{time.perf_counter() - t_start:6.1f}s] {shape.kind} {shape.name}: {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    cmd = "python benchmarks/kernel_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"## Layer table, generated by `{cmd.strip()}`\n\n{machine_description()}\n"
        f"- {repeats} timed repeats per path (interleaved, median); 1-minute load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (2 cores shared with other work: ratios, not absolute times); "
        f"total {time.perf_counter() - t_start:.0f} s\n\n" + tables(rows) + "\n"
    )
    print(text)
    write_report(args.out, text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
