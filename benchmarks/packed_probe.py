"""Layer-level candidates for 4-bit weights with int8 activations, and for weight-only layers, at SD1.5 shapes.

Run: ``python benchmarks/packed_probe.py [--threads 1] [--repeats 7]``; prints a markdown table for
benchmarks/KERNELS.md, section 6. Every candidate of a layer is timed in one process, interleaved in random
order, and the minimum is kept (the least disturbed estimate on a shared machine). With one thread the clock is
the thread's CPU time, so other jobs on the machine cost it little; with more, wall-clock time.

Candidates (W4A8 = 4-bit weights, static uint8 inputs; each row quantizes its fp32 input itself, as in eager):

* ``w8a8 onednn``: the int8 baseline (oneDNN, 1 byte per weight, per-channel scales), eager: torch's exact
  input quantization (five passes) + the kernel; ``w8a8 kernel only``: the kernel on an input already in
  uint8, about what a compiled W8A8 layer pays (inductor fuses the quantization into the op before it);
* ``(a) unpack+prepack``: keep int4 packed, unpack into one reused int8 buffer and prepack for oneDNN at each call
  (per channel; per group 128 for Linear as one oneDNN call per group of K, accumulated in fp32);
* ``(c) widened``: oneDNN on a held int8 copy of the int4 weight (what quantdiff did for per-channel int4);
* ``(b) packed``: quantdiff's AMX kernel (``quantdiff.nn.kernels.packed``), per channel and group 128 / 64.

Weight-only rows: fp32 layer, the reference path (dequantize with torch ops), and the packed backend's
dequantize-per-call kernel in fp32 (bit-identical) and bf16.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from quantized_layers import quantized_like  # noqa: E402

from quantdiff.nn.kernels.onednn import _qconv, _qlinear  # noqa: E402
from quantdiff.nn.kernels.packed import DequantizeKernel, packed_support  # noqa: E402
from quantdiff.primitives import sqnr_db, unpack_int4  # noqa: E402
from quantdiff.recipe import PRESETS, Recipe, TensorSpec  # noqa: E402

A8 = PRESETS["w8a8"].activations
W4_CHANNEL = TensorSpec(4, True, "channel", observer="minmax")
W4_G128 = TensorSpec(4, True, "group", group_size=128, observer="minmax")
W4_G64 = TensorSpec(4, True, "group", group_size=64, observer="minmax")

LINEARS = [  # tokens, K, N: SD1.5 at a 64x64 latent, batch 2
    ("attn q/k/v/out, down0", 8192, 320, 320),
    ("ff GEGLU proj, down0", 8192, 320, 2560),
    ("ff out, down0", 8192, 1280, 320),
    ("attn, down1", 2048, 640, 640),
    ("attn2 to_k (77 text tokens)", 154, 768, 320),
    ("ff GEGLU proj, down2", 512, 1280, 10240),
    ("attn, mid (8x8)", 128, 1280, 1280),
]
CONVS = [  # C_in, C_out, kernel, stride, H=W
    ("resnet 3x3 320 @64", 320, 320, 3, 1, 64),
    ("resnet 3x3 640 @32", 640, 640, 3, 1, 32),
    ("resnet 3x3 1280 @16", 1280, 1280, 3, 1, 16),
    ("resnet 3x3 1280 @8", 1280, 1280, 3, 1, 8),
    ("up resnet 3x3 960->320 @64", 960, 320, 3, 1, 64),
    ("proj_in 1x1 320 @64", 320, 320, 1, 1, 64),
    ("downsample 3x3 s2 320 @64", 320, 320, 3, 2, 64),
]


def _quantize_u8(x, scale, zero_point):
    y = x / scale
    y.round_().add_(zero_point).clamp_(0, 255)
    return y.to(torch.uint8)


def unpack_prepack_linear(quantized, group):
    """Route (a) for a Linear: one reused int8 buffer, unpacked and prepacked for oneDNN at every call."""
    n, k = quantized.weight_shape
    stored, scale = quantized.weight_q, quantized.weight_scale
    x_scale, x_zp = float(quantized.input_scale), int(quantized.input_zero_point)
    buffer = torch.empty(n, k, dtype=torch.int8)
    zeros = torch.zeros(n, dtype=torch.int64)
    bias = quantized.bias

    def run(x):
        buffer.copy_(unpack_int4(stored, k, signed=True))
        q = _quantize_u8(x, x_scale, x_zp)
        if group is None:
            packed = torch.ops.onednn.qlinear_prepack(buffer, None)
            return torch.ops.onednn.qlinear_pointwise(
                q, x_scale, x_zp, packed, scale.reshape(-1), zeros, bias, 1.0, 0, torch.float32, "none", [], ""
            )
        y = None
        for g in range(math.ceil(k / group)):  # one call per group of K, each with its own scales
            part = slice(g * group, min(k, (g + 1) * group))
            packed = torch.ops.onednn.qlinear_prepack(buffer[:, part].contiguous(), None)
            out = torch.ops.onednn.qlinear_pointwise(
                q[..., part].contiguous(),
                x_scale,
                x_zp,
                packed,
                scale[:, g].contiguous(),
                zeros,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
            y = out if y is None else y.add_(out)
        return y.add_(bias)

    return run


def unpack_prepack_conv(quantized):
    """Route (a) for a Conv2d, per channel: unpack and prepack at every call."""
    shape = quantized.weight_shape
    k = math.prod(shape[1:])
    stored, scale = quantized.weight_q, quantized.weight_scale.reshape(-1).contiguous()
    x_scale, x_zp = float(quantized.input_scale), int(quantized.input_zero_point)
    buffer = torch.empty(shape[0], k, dtype=torch.int8)
    zeros = torch.zeros(shape[0], dtype=torch.int64)
    args = ([*quantized.stride], [*quantized.padding], [*quantized.dilation], quantized.groups)

    def run(x):
        buffer.copy_(unpack_int4(stored, k, signed=True))
        packed = torch.ops.onednn.qconv_prepack(buffer.view(shape), scale, x_scale, x_zp, *args, None)
        y = torch.ops.onednn.qconv_pointwise(
            _quantize_u8(x, x_scale, x_zp),
            x_scale,
            x_zp,
            packed,
            scale,
            zeros,
            quantized.bias,
            *args,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        return y.contiguous()

    return run


def _time(fns: dict, repeats: int, clock) -> dict:
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            order = list(fns)
            random.shuffle(order)
            for name in order:
                start = clock()
                fns[name]()
                times[name].append(clock() - start)
    return {name: min(values) * 1e3 for name, values in times.items()}


def _module(layer, x, weights, activations, backend):
    quantized = quantized_like(layer, x, Recipe("probe", weights, activations))
    if backend:
        quantized.set_execution("integer", backend=backend)
    return quantized


def w4a8_rows(repeats, clock):
    rows = []
    for kind, items in (("Linear", LINEARS), ("Conv2d", CONVS)):
        for item in items:
            torch.manual_seed(0)
            if kind == "Linear":
                name, m, k, n = item
                layer, x = nn.Linear(k, n), torch.randn(m, k)
                shape = f"({m}, {k}) -> {n}"
            else:
                name, c_in, c_out, size, stride, hw = item
                layer, x = (
                    nn.Conv2d(c_in, c_out, size, stride=stride, padding=size // 2),
                    F.silu(torch.randn(2, c_in, hw, hw)),
                )
                shape = f"{c_in}->{c_out} k{size} s{stride} @{hw}"
            with torch.no_grad():
                layer.weight.normal_(0.0, layer.weight[0].numel() ** -0.5)
            w8 = _module(layer, x, PRESETS["w8a8"].weights, A8, "onednn")
            channel_ref = _module(layer, x, W4_CHANNEL, A8, None)
            g128_ref = _module(layer, x, W4_G128, A8, None)
            k8 = w8._kernel
            q8 = k8.quantize(x)
            if kind == "Linear":
                only = partial(_qlinear, q8, k8.x_scale, k8.x_zp, k8.packed, k8.w_scale, k8.w_zp, w8.bias)
                unpacked = unpack_prepack_linear(channel_ref, None)
            else:
                only = partial(_qconv, q8, k8.x_scale, k8.x_zp, k8.packed, k8.w_scale, k8.w_zp, w8.bias, k8.conv_args)
                unpacked = unpack_prepack_conv(channel_ref)
            fns = {
                "fp32": partial(layer, x),
                "w8a8 onednn": partial(w8, x),
                "w8a8 kernel only": only,
                "(a) unpack+prepack ch": partial(unpacked, x),
                "(c) widened ch": partial(_module(layer, x, W4_CHANNEL, A8, "onednn"), x),
                "(b) packed ch": partial(_module(layer, x, W4_CHANNEL, A8, "packed"), x),
                "(b) packed g128": partial(_module(layer, x, W4_G128, A8, "packed"), x),
                "(b) packed g64": partial(_module(layer, x, W4_G64, A8, "packed"), x),
            }
            if kind == "Linear":
                fns["(a) unpack+prepack g128"] = partial(unpack_prepack_linear(g128_ref, 128), x)
            with torch.no_grad():  # route (a) computes the same integers: check it before timing it
                check = fns["(a) unpack+prepack ch"]()
                assert sqnr_db(channel_ref(x).double(), check.double()) > 100
            ms = _time(fns, repeats, clock)
            rows.append((kind, name, shape, ms))
            print(f"  {kind} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    return rows


def weight_only_rows(repeats, clock):
    rows = []
    picks = [LINEARS[0], LINEARS[5], LINEARS[6], CONVS[0], CONVS[2], CONVS[3]]
    for item in picks:
        torch.manual_seed(0)
        if len(item) == 4:
            name, m, k, n = item
            layer, x = nn.Linear(k, n), torch.randn(m, k)
        else:
            name, c_in, c_out, size, stride, hw = item
            layer, x = nn.Conv2d(c_in, c_out, size, stride=stride, padding=size // 2), torch.randn(2, c_in, hw, hw)
        reference = _module(layer, x, W4_G128, None, None)
        inputs = reference.kernel_inputs()
        fp32_route = DequantizeKernel(inputs, reference._op, torch.float32)
        bf16_route = DequantizeKernel(inputs, reference._op, torch.bfloat16)
        w8 = _module(layer, x, PRESETS["w8a16"].weights, None, None)
        w8_bf16 = DequantizeKernel(w8.kernel_inputs(), w8._op, torch.bfloat16)
        fns = {
            "fp32": partial(layer, x),
            "w4a16 reference path": partial(reference, x),
            "w4a16 dequantize fp32": partial(fp32_route, x, reference.bias),
            "w4a16 dequantize bf16": partial(bf16_route, x, reference.bias),
            "w8a16 dequantize bf16": partial(w8_bf16, x, w8.bias),
        }
        with torch.no_grad():
            ref = reference(x)
            assert torch.equal(fp32_route(x, reference.bias), ref)
            agreement = sqnr_db(ref.double(), bf16_route(x, reference.bias).double())
        ms = _time(fns, repeats, clock)
        rows.append((name, ms, agreement))
        print(
            f"  weight-only {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()) + f"; bf16 {agreement:.1f} dB",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    support = packed_support()
    assert support.amx, support.reason
    load_start = os.getloadavg()[0]
    started = time.time()
    w4 = w4a8_rows(args.repeats, clock)
    wo = weight_only_rows(args.repeats, clock)
    clock_name = "thread CPU time" if args.threads == 1 else "wall-clock time"
    print(
        f"\n### {args.threads} thread(s), {clock_name}, min of {args.repeats} interleaved repeats; 1-minute load "
        f"average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; {time.time() - started:.0f} s\n"
    )
    columns = list(w4[0][3])
    print("| layer | shape | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for kind, name, shape, ms in w4:
        base = ms["w8a8 onednn"]
        cells = [f"{ms[c]:.2f} ({ms[c] / base:.2f})" if c in ms else "n/a" for c in columns]
        print(f"| {kind} {name} | {shape} | " + " | ".join(cells) + " |")
    for column in columns:
        ratios = [ms[column] / ms["w8a8 onednn"] for _, _, _, ms in w4 if column in ms]
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        total = sum(ms[column] for _, _, _, ms in w4 if column in ms)
        print(f"- {column}: geometric mean {geo:.2f}x the W8A8 time over {len(ratios)} layers; summed {total:.1f} ms")
    columns = list(wo[0][1])
    print("\n| weight-only layer | " + " | ".join(columns) + " | bf16 vs reference dB |")
    print("|---|" + "---|" * (len(columns) + 1))
    for name, ms, agreement in wo:
        base = ms["fp32"]
        print(
            f"| {name} | " + " | ".join(f"{ms[c]:.2f} ({ms[c] / base:.2f})" for c in columns) + f" | {agreement:.1f} |"
        )
    for column in columns:
        geo = math.exp(sum(math.log(ms[column] / ms["fp32"]) for _, ms, _ in wo) / len(wo))
        print(
            f"- {column}: geometric mean {geo:.2f}x the fp32 layer's time; summed {sum(ms[column] for _, ms, _ in wo):.1f} ms"
        )


if __name__ == "__main__":
    main()
