"""NCHW vs channels-last activations on the packed AMX kernels, side by side in one process (KERNELS.md, section 8).

OMP_NUM_THREADS=1 python benchmarks/layout_probe.py --part layers [--rounds 30]
OMP_NUM_THREADS=1 python benchmarks/layout_probe.py --part step [--latent 32] [--rounds 10] [--compile]

``layers``: SD1.5 convolution shapes (32x32 latent, batch 1, W8A8 per channel): the packed op with an NCHW
input and an NCHW output (``nn.Conv2d``'s layout, before), an NCHW input and its channels-last output, a
channels-last input and output (now), and a uint8 channels-last input (the quantization done before the op:
what fusing it into the op before could at most save). All four give the same values (checked).

``step``: the bench's random-weight SD1.5 UNet, quantized once with the W8A8 preset on the bench's calibration
inputs, copied, one copy with ``layout="nchw"`` and one with ``layout="channels_last"``; eager (and with
``--compile`` inductor with freezing, as the bench) steps timed in interleaved rounds of random order.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantdiff.bench import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    bench_calibration,
    build_denoiser,
    denoiser_inputs,
)
from quantdiff.bench.builds import integer_w8a8_recipe
from quantdiff.bench.compiling import compile_settings
from quantdiff.nn import use_integer_kernels
from quantdiff.primitives import quantize
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quantized_layers import quantized_like  # noqa: E402

LAYERS = {  # SD1.5 at a 32x32 latent, batch 1: (C_in, C_out, kernel, H = W)
    "conv 320->320 3x3 @32": (320, 320, 3, 32),
    "conv 640->640 3x3 @16": (640, 640, 3, 16),
    "conv 1280->1280 3x3 @8": (1280, 1280, 3, 8),
    "proj 320->320 1x1 @32": (320, 320, 1, 32),
    "conv 960->320 1x1 @32 (shortcut)": (960, 320, 1, 32),
}


def timed_rounds(calls: dict, rounds: int, per_round: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each entry, ``rounds`` rounds in a fresh random order each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(calls)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(per_round):
                calls[name]()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def layers_part(rounds: int) -> None:
    columns = (
        "NCHW in, NCHW out (before)",
        "NCHW in, channels-last out",
        "channels-last in and out (now)",
        "uint8 channels-last in",
    )
    print("| layer | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, (c_in, c_out, kernel, hw) in LAYERS.items():
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2).eval()
        x = F.silu(1.5 * torch.randn(1, c_in, hw, hw))  # (N, C, H, W)
        layer = quantized_like(conv, x, PRESETS["w8a8"])
        layer.set_execution("integer")
        op, bias = layer._kernel, layer.bias
        x_cl = x.contiguous(memory_format=torch.channels_last)
        x_u8 = quantize(x_cl, layer.input_scale, layer.input_zero_point, 8, False).to(torch.uint8)
        x_u8 = x_u8.contiguous(memory_format=torch.channels_last)
        calls = dict(
            zip(
                columns,
                (
                    functools.partial(op, x, bias),
                    functools.partial(op, x, bias, channels_last=True),
                    functools.partial(op, x_cl, bias),
                    functools.partial(op, x_u8, bias),
                ),
                strict=True,
            )
        )
        with torch.no_grad():
            outputs = [call() for call in calls.values()]
            assert all(torch.equal(outputs[0], out) for out in outputs[1:]), name
            times = timed_rounds(calls, rounds, per_round=5)
        base = median(times[columns[0]])
        cells = [f"{median(times[c]) * 1e3:.3f} ({median(times[c]) / base:.2f}x)" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def step_part(latent: int, rounds: int, compiled: bool) -> None:
    spec = DENOISERS["sd15"]
    fp32 = build_denoiser(spec)
    calibration = bench_calibration(spec, fp32, latent, 1, 4, 0)
    inputs = denoiser_inputs(spec, latent, 1, EVAL_TIMESTEP, EVAL_SEED_OFFSET)
    del fp32
    quantized = build_denoiser(spec)
    quantize_denoiser(quantized, integer_w8a8_recipe(), calibration, progress=False)
    calls = {}
    with torch.no_grad():
        for layout in ("nchw", "channels_last"):
            model = copy.deepcopy(quantized)
            print(layout, use_integer_kernels(model, layout=layout).layout_reason or "-", flush=True)
            calls[f"eager {layout}"] = lambda model=model: model(**inputs)[0]
            if compiled:
                compiled_model = torch.compile(model, dynamic=False)

                def run(compiled_model=compiled_model):
                    with compile_settings({}, True):
                        return compiled_model(**inputs)[0]

                start = time.perf_counter()
                run()
                print(f"compiled {layout}: first call {time.perf_counter() - start:.1f} s", flush=True)
                calls[f"compiled {layout}"] = run
        for call in calls.values():
            call()  # warm-up
        times = timed_rounds(calls, rounds)
    for name, values in times.items():
        print(f"{name:24s} median {median(values):.4f} s  min {min(values):.4f} s")
    for kind in ("eager", "compiled") if compiled else ("eager",):
        after, before = times[f"{kind} channels_last"], times[f"{kind} nchw"]
        print(
            f"{kind}: channels_last / nchw = {median(after) / median(before):.3f} (median), "
            f"{min(after) / min(before):.3f} (min)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("layers", "step"), default="layers")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None, help="default: 30 (layers), 10 (step)")
    parser.add_argument("--compile", action="store_true", help="step: also time inductor-compiled copies")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    if args.part == "layers":
        layers_part(args.rounds or 30)
    else:
        step_part(args.latent, args.rounds or 10, args.compile)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
