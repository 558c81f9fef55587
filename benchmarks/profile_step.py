"""Where a denoiser step's time goes: fp32 vs quantdiff W8A8 integer mode, profiled by op.

python benchmarks/profile_step.py [--model sd15] [--latent 32] [--threads 2] [--repeats 3] [--out benchmarks/PROFILE.md]

Builds the benchmark's real-size denoiser (random weights from the published config, as ``quantdiff
bench``), quantizes a second copy with the W8A8 preset this CPU's int8 kernels compute exactly
(``w8a8``, or ``w8a8-int`` on AVX2) on the bench's calibration inputs, switches it to integer mode
(attention in bf16 where the CPU computes bf16 natively), and runs ``torch.profiler`` over ``--repeats``
eager steps of each (after one warm-up). Every ATen op's self CPU time is put in one category (int8 conv / linear kernels, the input
quantization in front of them, attention, normalisation, ...), so the table says which share of the
step each category takes in fp32 and in W8A8, and how much each one gained. Prints the table and writes
it with the machine description to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from quantdiff.bench import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    bench_calibration,
    build_denoiser,
    denoiser_inputs,
)
from quantdiff.bench.builds import integer_w8a8_recipe
from quantdiff.nn import use_integer_kernels
from quantdiff.quantize import quantize_denoiser

# First matching pattern wins; patterns are substrings of ATen / oneDNN op names.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("int8 conv (oneDNN)", ("qconv",)),
    ("int8 linear (oneDNN)", ("qlinear",)),
    ("fp32 conv", ("convolution", "conv2d", "mkldnn_convolution", "thnn_conv")),
    ("attention (sdpa / bmm / softmax)", ("scaled_dot_product", "flash_attention", "bmm", "baddbmm", "softmax")),
    ("fp32 linear (addmm / mm)", ("addmm", "aten::mm", "aten::linear", "matmul")),
    (
        "quantize input + copies (div, round_, add_, clamp_, to, copy_)",
        ("aten::div", "aten::round", "aten::clamp", "aten::add_", "aten::_to_copy", "aten::to", "aten::copy_"),
    ),
    ("normalisation (group / layer norm)", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("activations (silu, gelu)", ("silu", "gelu")),
    (
        "elementwise (add, mul, cat, ...)",
        ("aten::add", "aten::mul", "aten::cat", "aten::sub", "aten::neg", "aten::exp", "aten::sin", "aten::cos"),
    ),
    (
        "layout (contiguous, view, permute, reshape)",
        (
            "contiguous",
            "clone",
            "permute",
            "transpose",
            "view",
            "reshape",
            "empty",
            "as_strided",
            "unsqueeze",
            "squeeze",
            "expand",
            "chunk",
            "split",
            "slice",
            "select",
        ),
    ),
)


def categorize(op_name: str) -> str:
    for category, patterns in CATEGORIES:
        if any(pattern in op_name for pattern in patterns):
            return category
    return "other"


def profile_step(
    model: torch.nn.Module, inputs: dict, repeats: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """Self CPU seconds per category and per op for one step (averaged over ``repeats``), and the step time."""
    with torch.no_grad():
        model(**inputs)  # warm-up: prepacks, allocator
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(**inputs)
        step = (time.perf_counter() - started) / repeats
    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / repeats
        by_category[categorize(event.key)] += seconds
        by_op[event.key] += seconds
    return dict(by_category), dict(by_op), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=sorted(DENOISERS))
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("PROFILE.md")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = DENOISERS[args.model]
    fp32 = build_denoiser(spec)
    calibration = bench_calibration(spec, fp32, args.latent, 1, 4, 0)
    inputs = denoiser_inputs(spec, args.latent, 1, EVAL_TIMESTEP, EVAL_SEED_OFFSET)
    quantized = build_denoiser(spec)
    quantize_denoiser(quantized, integer_w8a8_recipe(), calibration, progress=True)
    summary = use_integer_kernels(quantized)
    print(summary.format(max_layers=0))
    fp32_categories, fp32_ops, fp32_step = profile_step(fp32, inputs, args.repeats)
    del fp32
    q_categories, q_ops, q_step = profile_step(quantized, inputs, args.repeats)

    order = sorted(set(fp32_categories) | set(q_categories), key=lambda c: -(q_categories.get(c, 0.0)))
    fp32_total, q_total = sum(fp32_categories.values()), sum(q_categories.values())
    lines = [
        f"# Profile of one {spec.title} step, {args.latent}x{args.latent} latent, batch 1",
        "",
        f"`python benchmarks/profile_step.py --model {args.model} --latent {args.latent} --threads {args.threads} "
        f"--repeats {args.repeats}`; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {summary.support.describe() if summary.support else ''}.",
        "",
        f"Step (wall, under the profiler): fp32 eager {fp32_step:.3f} s, W8A8 integer {q_step:.3f} s "
        f"({fp32_step / q_step:.2f}x). Self CPU time summed over ops: fp32 {fp32_total:.3f} s, W8A8 {q_total:.3f} s "
        "(with 2 threads an op's self time is its wall time, not core-seconds).",
        "",
        "| category | fp32 s | fp32 share | W8A8 s | W8A8 share | gain |",
        "|---|---|---|---|---|---|",
    ]
    for category in order:
        f, q = fp32_categories.get(category, 0.0), q_categories.get(category, 0.0)
        gain = f"{f / q:.2f}x" if f and q else ""
        lines.append(f"| {category} | {f:.3f} | {f / fp32_total:.0%} | {q:.3f} | {q / q_total:.0%} | {gain} |")
    lines += ["", "Top 15 ops of the W8A8 step (self CPU seconds per step):", "", "| op | s | share |", "|---|---|---|"]
    for op, seconds in sorted(q_ops.items(), key=lambda item: -item[1])[:15]:
        lines.append(f"| `{op}` | {seconds:.3f} | {seconds / q_total:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
