"""Where a denoiser step's time goes: fp32 vs quantdiff W8A8 integer mode, profiled by op.

python benchmarks/profile_step.py [--model sd15] [--latent 32] [--threads 2] [--repeats 3] [--out benchmarks/PROFILE.md]

Builds the benchmark's real-size denoiser (random weights from the published config, as ``quantdiff
bench``), quantizes a second copy with the W8A8 preset this CPU's int8 kernels compute exactly
(``w8a8``, or ``w8a8-int`` on AVX2) on the bench's calibration inputs, switches it to integer mode
(``use_integer_kernels`` with its defaults: on AMX CPUs the packed kernels, which quantize the fp32 input
inside the op, attention in bf16 where the CPU computes bf16 natively), and runs ``torch.profiler`` over
``--repeats`` eager steps of fp32, of W8A8 with NCHW activations (``layout="nchw"``: what every convolution
returned before the activations were kept channels-last) and of W8A8 as it runs by default, after one
warm-up each. Every op's self CPU time is put in one category (int8 conv / linear kernels, attention,
normalisation, layout copies, dtype conversions, ...; a copy goes to the op that asked for it: a cast, a
``contiguous()``), so the table says which share of the step each category takes. Prints the table and the
top ops, and writes them with the machine description and load to ``--out``.
"""

from __future__ import annotations

import argparse
import os
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

# First matching pattern wins; patterns are substrings of ATen / oneDNN / quantdiff op names. A copy
# (``aten::copy_``) is put in the category of the op that asked for it (see ``categorize``).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("int8 conv, packed AMX (input quantized inside)", ("quantdiff_packed::packed_conv2d",)),
    ("int8 linear, packed AMX (input quantized inside)", ("quantdiff_packed::packed_linear",)),
    ("int8 attention (AMX)", ("quantdiff_attention",)),
    ("fake-quantize / dequantize (float and weight-only paths)", ("quantdiff_packed::",)),
    ("int8 conv (oneDNN)", ("qconv",)),
    ("int8 linear (oneDNN)", ("qlinear",)),
    ("fp32 conv", ("convolution", "conv2d", "mkldnn_convolution", "thnn_conv")),
    ("attention (sdpa / bmm / softmax)", ("scaled_dot_product", "flash_attention", "bmm", "baddbmm", "softmax")),
    ("fp32 linear (addmm / mm)", ("addmm", "aten::mm", "aten::linear", "matmul")),
    ("dtype conversions (to, _to_copy)", ("aten::_to_copy", "aten::to")),
    ("layout copies (contiguous, clone, copy_)", ("aten::copy_", "contiguous", "clone")),
    ("input quantization as ATen ops (div, round_, clamp_)", ("aten::div", "aten::round", "aten::clamp")),
    ("normalisation (group / layer norm)", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("activations (silu, gelu)", ("silu", "gelu")),
    (
        "elementwise (add, mul, cat, ...)",
        ("aten::add", "aten::mul", "aten::cat", "aten::sub", "aten::neg", "aten::exp", "aten::sin", "aten::cos"),
    ),
    (
        "views and allocation (view, permute, reshape, empty)",
        (
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
            "resize",
        ),
    ),
)
# Categories that are neither int8 math, float math nor attention: the "glue" of issue 18.
GLUE = (
    "dtype conversions (to, _to_copy)",
    "layout copies (contiguous, clone, copy_)",
    "input quantization as ATen ops (div, round_, clamp_)",
    "views and allocation (view, permute, reshape, empty)",
    "other",
)
# Ops whose copies belong to them rather than to the op below: a cast's copy is a dtype conversion, a
# contiguous() / clone() copy a layout copy, an in-place op's copy_ the op's own (e.g. an elementwise add).
_COPY_OWNERS = ("aten::_to_copy", "aten::to", "aten::contiguous", "aten::clone")


def categorize(op_name: str) -> str:
    for category, patterns in CATEGORIES:
        if any(pattern in op_name for pattern in patterns):
            return category
    return "other"


def _owner(event) -> str:
    """The name a copy's time is filed under: the nearest ancestor that owns copies (a cast, contiguous,
    clone), else the copy itself."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in _COPY_OWNERS:
            return parent.name
        parent = parent.cpu_parent
    return event.name


def profile_step(
    model: torch.nn.Module, inputs: dict, repeats: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """Self CPU seconds per category and per op for one step (averaged over ``repeats``), and the step time.
    Per op, a copy is named with its owner (``aten::copy_ <- aten::_to_copy``) and the input shapes."""
    with torch.no_grad():
        model(**inputs)  # warm-up: prepacks, allocator
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(repeats):
                model(**inputs)
        step = (time.perf_counter() - started) / repeats
    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.events():
        seconds = event.self_cpu_time_total / 1e6 / repeats
        name = event.name
        if name == "aten::copy_":
            owner = _owner(event)
            by_category[categorize(owner)] += seconds
            name = f"{name} <- {owner}" if owner != name else name
        else:
            by_category[categorize(name)] += seconds
        shapes = ", ".join("x".join(map(str, shape)) for shape in (event.input_shapes or [])[:2] if shape)
        by_op[f"{name} [{shapes}]" if shapes else name] += seconds
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
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    spec = DENOISERS[args.model]
    fp32 = build_denoiser(spec)
    calibration = bench_calibration(spec, fp32, args.latent, 1, 4, 0)
    inputs = denoiser_inputs(spec, args.latent, 1, EVAL_TIMESTEP, EVAL_SEED_OFFSET)
    quantized = build_denoiser(spec)
    quantize_denoiser(quantized, integer_w8a8_recipe(), calibration, progress=True)
    columns: dict[str, tuple[dict[str, float], dict[str, float], float]] = {}
    columns["fp32"] = profile_step(fp32, inputs, args.repeats)
    del fp32
    # the same quantized model with nn.Conv2d's layout (NCHW out of every convolution), then the default
    summary = use_integer_kernels(quantized, layout="nchw")
    columns["W8A8 NCHW"] = profile_step(quantized, inputs, args.repeats)
    summary = use_integer_kernels(quantized)
    print(summary.format(max_layers=0))
    default = f"W8A8 {summary.layout or 'default'}".replace("channels_last", "channels-last")
    columns[default] = profile_step(quantized, inputs, args.repeats)

    names = list(columns)
    totals = {name: sum(columns[name][0].values()) for name in names}
    order = sorted({c for name in names for c in columns[name][0]}, key=lambda c: -columns[default][0].get(c, 0.0))
    steps = ", ".join(f"{name} {columns[name][2]:.3f} s" for name in names)
    sums = ", ".join(f"{name} {totals[name]:.3f} s" for name in names)
    glue = ", ".join(f"{name} {sum(columns[name][0].get(c, 0.0) for c in GLUE) / totals[name]:.0%}" for name in names)
    lines = [
        f"# Profile of one {spec.title} step, {args.latent}x{args.latent} latent, batch 1",
        "",
        f"`python benchmarks/profile_step.py --model {args.model} --latent {args.latent} --threads {args.threads} "
        f"--repeats {args.repeats}`; {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"thread(s), torch {torch.__version__}; {summary.describe_kernels()}; {summary.headline()}; attention "
        f"{summary.attention}; eager, torch.profiler over {args.repeats} steps after one warm-up.",
        "",
        f"Step (wall, under the profiler): {steps}. Self CPU time summed over ops: {sums}; the rest of the wall "
        "time is Python (module calls, hooks) and the profiler's own cost.",
        f"Load average before the run: {load_before}; after: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
        "(other jobs on the machine: compare shares and columns of this run, not seconds across runs).",
        "",
        f"Glue (neither int8 math, float math, attention, norms nor activations: {', '.join(GLUE)}): {glue} "
        "of the op time. The packed kernels quantize their fp32 input inside the op: that share is in their rows.",
        "",
        "| category | " + " | ".join(f"{name} s | share" for name in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for category in order:
        cells = []
        for name in names:
            seconds = columns[name][0].get(category, 0.0)
            cells.append(f"{seconds:.3f} | {seconds / totals[name]:.0%}")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    for name in names[1:]:
        ops, total = columns[name][1], totals[name]
        lines += [
            "",
            f"Top 25 ops of the {name} step (self CPU seconds per step; a copy is named with the op that asked "
            "for it; shapes of the first two inputs):",
            "",
            "| op | s | share |",
            "|---|---|---|",
        ]
        for op, seconds in sorted(ops.items(), key=lambda item: -item[1])[:25]:
            lines.append(f"| `{op}` | {seconds:.3f} | {seconds / total:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
