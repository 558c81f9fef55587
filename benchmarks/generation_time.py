"""Whole generations of a bundled digits model, FP against a quantized folder in the default (auto) execution,
interleaved, at the model's evaluation settings (25 steps, guidance 5): the "quantized is not slower than
floating point in the demo" check of the first-ten-minutes issue.

    quantdiff calibrate digits-sd --out runs/calib-digits
    quantdiff quantize digits-sd --calib runs/calib-digits --recipe w8a8 --out runs/digits-w8a8
    python benchmarks/generation_time.py runs/digits-w8a8 [--model digits-sd] [--repeats 5]
"""

import argparse
import os
import time

import torch

from quantdiff.generate import generate, load_any_pipeline
from quantdiff.pipelines.bundled import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("folder", help="quantized folder of --model")
parser.add_argument("--model", default="digits-sd")
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()
pipes = {
    "fp": load_any_pipeline(resolve_model(args.model)),
    "quantized-auto": load_any_pipeline(args.folder, execution="auto"),
}
times: dict[str, list[float]] = {name: [] for name in pipes}
for round_index in range(args.repeats + 1):  # round 0 warms up (auto execution chooses each layer's path there)
    for name, pipe in pipes.items():
        start = time.perf_counter()
        generate(pipe, "a red 3 on a blue background", steps=25, guidance=5.0, seed=round_index, progress=False)
        if round_index:
            times[name].append(time.perf_counter() - start)
print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
for name, seconds in times.items():
    print(f"{name:>15}: min {min(seconds):.3f} s, median {sorted(seconds)[len(seconds) // 2]:.3f} s per image")
