"""Whole SD1.5 UNet (random weights, 32x32 latent, batch 2) with the winning int8 path of kernel_probe.py.

Every Linear / Conv2d except conv_in, conv_out and time_embedding.* becomes ``OnednnInt8`` (oneDNN
qlinear/qconv with a prepacked int8 weight, uint8 input with a static scale, fp32 output), built from
quantdiff's own ``QuantizedLinear`` / ``QuantizedConv2d`` (min-max per-channel weight scales, min-max static
input scales from two calibration passes of random inputs, timestep 500).

Parts (each prints a markdown block and appends it to benchmarks/UNET.md):

* ``accuracy``: for W8A8, W8pA8 (pair-safe int8 weights), W8A7 (7-bit activations) and W7A8: output SQNR of
  the fake-quant reference vs fp32 and of the oneDNN path vs the fake-quant reference (eager, one step).
* ``speed``: one UNet step, fp32 eager / fp32 compiled (freezing) / int8 eager / int8 compiled (freezing: the
  qlinear lowering of torch 2.13 asserts that the packed weight is a graph constant), interleaved repeats,
  medians; compile times.
* ``memory``: one subprocess per variant; resident memory after setup (+compile) and two steps, and peak.

Usage::

    .venv/bin/python benchmarks/unet_probe.py --part accuracy
    .venv/bin/python benchmarks/unet_probe.py --part speed --repeats 5
    .venv/bin/python benchmarks/unet_probe.py --part memory
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kernel_probe as kp  # noqa: E402  (OnednnInt8, pair_safe_quantize)
import torch._inductor.config as inductor_config  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from quantdiff.nn.quantized import QUANTIZED_CLASSES, QuantizedConv2d, QuantizedLinear  # noqa: E402
from quantdiff.pipelines.reference_configs import SD15_UNET  # noqa: E402
from quantdiff.plan import LayerPlan  # noqa: E402
from quantdiff.primitives import compute_qparams, sqnr_db  # noqa: E402
from quantdiff.recipe import TensorSpec  # noqa: E402

EXCLUDE = ("conv_in", "conv_out", "time_embedding.")
VARIANTS = {"W8A8": (8, 8, False), "W8pA8": (8, 8, True), "W8A7": (8, 7, False), "W7A8": (7, 8, False)}


def trim() -> None:
    """gc + glibc malloc_trim: give freed heap pages back so RSS shows what is really held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_gb() -> tuple[float, float]:
    """(current resident GB, peak resident GB) of this process."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["VmRSS"].split()[0]) / 2**20, int(status["VmHWM"].split()[0]) / 2**20


def build_unet(init: str) -> nn.Module:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(SD15_UNET)).eval().requires_grad_(False)
    if init == "normal":  # bell-shaped weights (see kernel_probe: like trained weights, unlike kaiming-uniform)
        for m in unet.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5)
    return unet


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 32, 32, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, 768, generator=g),
        return_dict=False,
    )


def targets(unet: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not name.startswith(EXCLUDE)
    }


def calibrate(unet: nn.Module, seeds=(1, 2)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer input min / max over a few forward passes of random inputs (timestep 500)."""
    ranges: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in targets(unet).items():

        def hook(_m, args, name=name):
            x = args[0].detach()
            lo, hi = x.min(), x.max()
            if name in ranges:
                ranges[name] = [torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)]
            else:
                ranges[name] = [lo, hi]

        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in seeds:
            unet(**inputs(s))
    for h in hooks:
        h.remove()
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def reference_layer(m: nn.Module, lo, hi, wbits: int, abits: int, safe: bool):
    wspec = TensorSpec(bits=wbits, symmetric=True, granularity="channel")
    aspec = TensorSpec(bits=abits, symmetric=False, granularity="tensor")
    kind = type(m).__name__
    plan = LayerPlan("probe", kind, tuple(m.weight.shape), m.bias is not None, wspec, aspec, "probe")
    q = QUANTIZED_CLASSES[kind].like(m, plan)
    if safe:
        q.weight_q, q.weight_scale, _ = kp.pair_safe_quantize(m.weight, steps=6)
    else:
        q.set_weight(m.weight)
    if m.bias is not None:
        q.bias.data.copy_(m.bias)
    q.set_input_qparams(*compute_qparams(lo, hi, abits, symmetric=False))
    return q.eval()


def quantize_unet(unet: nn.Module, ranges, variant: str) -> nn.Module:
    """In place: fp32 Linear/Conv2d -> quantdiff fake-quant modules (the reference)."""
    for name, m in targets(unet).items():
        set_module(unet, name, reference_layer(m, *ranges[name], *VARIANTS[variant]))
    return unet


def to_int8(unet: nn.Module) -> nn.Module:
    """In place: quantdiff fake-quant modules -> OnednnInt8 (their int8 buffers are dropped afterwards)."""
    for name, m in list(unet.named_modules()):
        if isinstance(m, (QuantizedLinear, QuantizedConv2d)):
            set_module(unet, name, kp.OnednnInt8(m))
    return unet


def run(unet, seed=3):
    with torch.no_grad():
        return unet(**inputs(seed))[0]


def emit(text: str) -> None:
    print(text, flush=True)
    with open(HERE / "UNET.md", "a") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------------------------------- parts
def teacher_forced(ref_model: nn.Module, seed: int = 3) -> list[float]:
    """Per-layer SQNR of OnednnInt8 vs the fake-quant module, each fed the reference's own input."""
    out: list[float] = []

    def hook(mod, args, y):
        out.append(sqnr_db(y, kp.OnednnInt8(mod)(args[0])))

    hooks = [
        m.register_forward_hook(hook) for m in ref_model.modules() if isinstance(m, (QuantizedLinear, QuantizedConv2d))
    ]
    run(ref_model, seed)
    for h in hooks:
        h.remove()
    return out


def part_accuracy(args) -> None:
    fp32 = build_unet(args.init)
    t0 = time.perf_counter()
    ranges = calibrate(fp32)
    t_cal = time.perf_counter() - t0
    y32 = run(fp32)
    lines = [
        f"### UNet accuracy ({args.init}-init weights), `python benchmarks/unet_probe.py --part accuracy "
        f"--init {args.init}`\n",
        f"Calibration: 2 forward passes, {t_cal:.1f} s. Evaluation input: a third random latent / text embedding. "
        "SQNR in dB. 'per layer' = every int8 layer fed the fake-quant model's own input (teacher forcing), "
        "min / median over the 278 layers. 'ref 1 vs 2 threads' = the fake-quant model against ITSELF run "
        "with 1 instead of 2 threads (only float summation order differs).\n",
        "| variant | fake-quant ref vs fp32 | int8 per layer vs ref (min / median) | int8 end-to-end vs ref "
        "| ref 1 vs 2 threads | int8 end-to-end vs fp32 | convert s (quantize + prepack) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in args.variants:
        t0 = time.perf_counter()
        ref = quantize_unet(copy.deepcopy(fp32), ranges, variant)
        t_q = time.perf_counter() - t0
        y_ref = run(ref)
        torch.set_num_threads(1)
        y_ref1 = run(ref)
        torch.set_num_threads(args.threads)
        per_layer = teacher_forced(ref)
        t0 = time.perf_counter()
        int8 = to_int8(ref)
        t_p = time.perf_counter() - t0
        y8 = run(int8)
        lines.append(
            f"| {variant} | {sqnr_db(y32, y_ref):.1f} | {min(per_layer):.1f} / {statistics.median(per_layer):.1f} "
            f"| {sqnr_db(y_ref, y8):.1f} | {sqnr_db(y_ref, y_ref1):.1f} | {sqnr_db(y32, y8):.1f} "
            f"| {t_q:.1f} + {t_p:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
        del ref, int8
        gc.collect()
    emit("\n".join(lines) + "\n")


def compile_first_call(model, freezing: bool):
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with inductor_config.patch(freezing=freezing, fx_graph_cache=False):
        run(compiled)
    return compiled, time.perf_counter() - t0


def part_speed(args) -> None:
    fp32 = build_unet(args.init)
    ranges = calibrate(fp32)
    y32 = run(fp32)
    t0 = time.perf_counter()
    int8 = to_int8(quantize_unet(copy.deepcopy(fp32), ranges, args.variant))
    t_convert = time.perf_counter() - t0
    gc.collect()
    fp32c, t_c32 = compile_first_call(fp32, freezing=True)
    int8c, t_c8 = compile_first_call(int8, freezing=True)
    models = {
        "fp32 eager": fp32,
        "fp32 compiled (freezing)": fp32c,
        f"int8 {args.variant} eager": int8,
        f"int8 {args.variant} compiled": int8c,
    }
    outs = {k: run(m) for k, m in models.items()}
    times = {k: [] for k in models}
    keys = list(models)
    import random

    rng = random.Random(0)
    for k in keys:  # warm-up
        run(models[k])
    for _ in range(args.repeats):
        rng.shuffle(keys)
        for k in keys:
            t0 = time.perf_counter()
            run(models[k])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    base, basec = med["fp32 eager"], med["fp32 compiled (freezing)"]
    lines = [
        f"### UNet speed ({args.init}-init weights, {args.variant}), `python benchmarks/unet_probe.py --part speed "
        f"--variant {args.variant} --repeats {args.repeats} --init {args.init}`\n",
        f"torch threads {torch.get_num_threads()}; {args.repeats} interleaved repeats (random order), median "
        f"(min in brackets); load average {os.getloadavg()[0]:.2f} at end. Convert (quantize + prepack) "
        f"{t_convert:.1f} s; first call incl. compile: fp32 {t_c32:.0f} s, int8 {t_c8:.0f} s.\n",
        "| variant | s / step (min) | vs fp32 eager | vs fp32 compiled | output SQNR vs fp32 eager (dB) |",
        "|---|---|---|---|---|",
    ]
    for k in models:
        lines.append(
            f"| {k} | {med[k]:.2f} ({mins[k]:.2f}) | {base / med[k]:.2f}x | {basec / med[k]:.2f}x | "
            f"{'ref' if k == 'fp32 eager' else f'{sqnr_db(y32, outs[k]):.1f}'} |"
        )
    emit("\n".join(lines) + "\n")


def part_memory_child(args) -> None:
    """One variant in a fresh process: prints a JSON line with RSS figures."""
    torch.set_num_threads(args.threads)
    fp32 = build_unet(args.init)
    res = {"variant": args.mem_variant}
    if args.mem_variant.startswith("int8"):
        ranges = calibrate(fp32)
        model = quantize_unet(fp32, ranges, args.variant)  # in place: the fp32 weights are released
        model = to_int8(model)
        del fp32
    else:
        model = fp32
    trim()
    res["after_setup_gb"] = rss_gb()[0]
    if args.mem_variant.endswith("compiled"):
        model, res["compile_s"] = compile_first_call(model, freezing=True)
    run(model)
    run(model)
    trim()
    res["after_steps_gb"], res["peak_gb"] = rss_gb()
    print("RESULT " + json.dumps(res), flush=True)


def part_memory(args) -> None:
    rows = []
    for v in ("fp32 eager", "fp32 compiled", "int8 eager", "int8 compiled"):
        cmd = [
            sys.executable,
            __file__,
            "--part",
            "memory-child",
            "--mem-variant",
            v,
            "--variant",
            args.variant,
            "--init",
            args.init,
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        rows.append(json.loads(line[-1][7:]) if line else {"variant": v, "error": out[-500:]})
        print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        f"### UNet memory ({args.variant}), `python benchmarks/unet_probe.py --part memory --variant {args.variant}`\n",
        "Fresh process per row. int8 rows build the fp32 UNet first and convert it in place, so their peak "
        "includes the fp32 model; 'after' figures are taken after gc + malloc_trim (the serving footprint).\n",
        "| variant | RSS after setup (GB) | RSS after compile + 2 steps (GB) | peak RSS (GB) | compile s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['after_setup_gb']:.2f} | {r['after_steps_gb']:.2f} | {r['peak_gb']:.2f} | "
            f"{r.get('compile_s', float('nan')):.0f} |"
        )
    emit("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["accuracy", "speed", "memory", "memory-child"], required=True)
    parser.add_argument("--variant", default="W8pA8", choices=list(VARIANTS), help="for speed / memory")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="for accuracy")
    parser.add_argument(
        "--init",
        default="default",
        choices=["default", "normal"],
        help="default: diffusers/PyTorch init (kaiming-uniform); normal: N(0, 1/fan_in)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-variant", default="fp32 eager")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    {"accuracy": part_accuracy, "speed": part_speed, "memory": part_memory, "memory-child": part_memory_child}[
        args.part
    ](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
