"""What each weight / activation algorithm costs to *run* (quantize time and peak memory) on a real-size denoiser.

python benchmarks/quantize_cost.py [--model sd15] [--latent 32] [--calibration 8] [--threads 2]
    [--algorithms naive,mse,smoothquant,gptq,lowrank,adaround] [--adaround-iterations 10,30] [--out FILE]

The benchmark's denoiser (published config, random weights: ``quantdiff bench``'s builder) and its random
calibration inputs; for each algorithm a fresh weight-sharing copy is quantized with W4A8 (per-channel
4-bit weights, static 8-bit inputs) plus that algorithm, and ``quantize_denoiser`` is timed end to end
(observing, the algorithm, packing). Quality is not measured here: random weights have none to lose
(``quantdiff eval`` on the bundled models gives it; README, "Where weights break").

AdaRound at its default 1000 iterations per block would take days here, so it runs at two small iteration
counts and the time is extrapolated linearly to 1000 (setup = the intercept: caching block inputs through
the already-quantized blocks; per iteration = the slope); the minibatch is the calibration size (rows per
step), stated in the output beside the default's 32.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import torch

from quantdiff.algorithms.adaround import AdaRound
from quantdiff.algorithms.gptq import GPTQ
from quantdiff.algorithms.lowrank import LowRank
from quantdiff.algorithms.smoothquant import SmoothQuant
from quantdiff.bench import DENOISERS, bench_calibration, build_denoiser
from quantdiff.bench.builds import share_weights_copy
from quantdiff.bench.results import machine_info
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import Recipe, TensorSpec

BASE_WEIGHTS = TensorSpec(bits=4, symmetric=True, granularity="channel", observer="minmax")
INPUTS = TensorSpec(bits=8, symmetric=False, granularity="tensor", observer="minmax")


def recipe_for(algorithm: str, adaround_iterations: int = 0) -> Recipe:
    weights = dataclasses.replace(BASE_WEIGHTS, observer="mse") if algorithm == "mse" else BASE_WEIGHTS
    algorithms = {
        "naive": lambda: (),
        "mse": lambda: (),
        "smoothquant": lambda: (SmoothQuant(),),
        "gptq": lambda: (GPTQ(),),
        "lowrank": lambda: (SmoothQuant(), LowRank()),
        "adaround": lambda: (AdaRound(iterations=adaround_iterations),),
    }[algorithm]()
    return Recipe(f"w4a8-{algorithm}", weights, INPUTS, algorithms=algorithms)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); elsewhere the peak is the run's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_quantize(reference, recipe: Recipe, calibration) -> tuple[float, float]:
    """Seconds to quantize a weight-sharing copy of ``reference``, and the peak RSS (GiB) meanwhile."""
    model = share_weights_copy(reference)
    reset_peak_rss()
    started = time.perf_counter()
    quantize_denoiser(model, recipe, calibration, progress=True)
    seconds = time.perf_counter() - started
    del model
    return seconds, peak_rss_gib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(DENOISERS))
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=8, help="random calibration inputs (batch 1 each)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--algorithms", default="naive,mse,smoothquant,gptq,lowrank,adaround")
    parser.add_argument("--adaround-iterations", default="10,30", help="two small counts to extrapolate from")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = DENOISERS[args.model]
    reference = build_denoiser(spec)
    calibration = bench_calibration(spec, reference, args.latent, 1, args.calibration, seed=0)
    params = sum(p.numel() for p in reference.parameters())
    algorithms = args.algorithms.split(",")
    machine = machine_info()
    amx = "AMX-INT8" if machine.flags["amx_int8"] else "AVX-512 VNNI" if machine.flags["avx512_vnni"] else "AVX2"
    header = (
        f"`python benchmarks/quantize_cost.py {' '.join(sys.argv[1:])}`: {spec.title}, {params / 1e6:.0f}M "
        f"parameters, random weights, latent {args.latent}x{args.latent}, {args.calibration} calibration inputs, "
        f"{args.threads} thread(s), torch {torch.__version__}, {machine.cpu} ({amx}); peak RSS while quantizing "
        "(the fp32 reference included)"
    )
    rows: list[tuple[str, str, str, str]] = []

    def report() -> str:
        """The table so far, written after every row so that a stopped run keeps what it measured."""
        lines = [header, "", "| W4A8 + | quantize seconds | peak RSS (GiB) | detail |", "|---|---|---|---|"]
        lines += [f"| {name} | {seconds} | {peak} | {detail} |" for name, seconds, peak, detail in rows]
        if len(rows) < len(algorithms):
            lines += ["", f"(in progress: {len(rows)} of {len(algorithms)} rows)"]
        text = "\n".join(lines)
        if args.out:
            args.out.write_text(text + "\n")
        return text

    for algorithm in algorithms:
        if algorithm != "adaround":
            seconds, peak = timed_quantize(reference, recipe_for(algorithm), calibration)
            rows.append((algorithm, f"{seconds:.0f}", f"{peak:.1f}", ""))
            print(f"{algorithm}: {seconds:.1f} s, peak RSS {peak:.1f} GiB", flush=True)
            report()
            continue
        low, high = (int(n) for n in args.adaround_iterations.split(","))
        t_low, peak_low = timed_quantize(reference, recipe_for(algorithm, low), calibration)
        t_high, peak_high = timed_quantize(reference, recipe_for(algorithm, high), calibration)
        per_iteration = (t_high - t_low) / (high - low)
        setup = t_low - low * per_iteration
        full = setup + 1000 * per_iteration
        rows.append(
            (
                "adaround (1000 iterations, extrapolated)",
                f"{full:.0f} ({full / 3600:.1f} h)",
                f"{max(peak_low, peak_high):.1f}",
                f"{low} it: {t_low:.0f} s, {high} it: {t_high:.0f} s; setup {setup:.0f} s + {per_iteration:.1f} s "
                f"per iteration over all blocks, minibatch {min(32, args.calibration)} rows (default 32)",
            )
        )
        print(rows[-1], flush=True)
        report()
    print(report())


if __name__ == "__main__":
    main()
