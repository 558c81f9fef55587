"""int8 attention vs fp32 and bf16 SDPA, per call: error and time at SD1.5 shapes, error on the bundled digits
models' own attention inputs (benchmarks/KERNELS.md, section 7).

    OMP_NUM_THREADS=1 python benchmarks/attention_probe.py [--repeats 5] [--skip-digits] [--batch 2] [--threads 1]

Inputs are laid out as diffusers hands them over ((B, T, heads, d) transposed to (B, heads, T, d)); timings are
interleaved in one process, median of ``--repeats``, ``--threads`` threads (1).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quantdiff.nn.int8_attention import int8_attention_support, int8_sdpa
from quantdiff.primitives import sqnr_db

# (B, heads, T_q, T_k, d) of SD1.5 at a 64x64 latent, batch 2 (CFG), and how many calls a UNet step makes of it
SD15_CALLS = {
    (2, 8, 4096, 4096, 40): 5,
    (2, 8, 4096, 77, 40): 5,
    (2, 8, 1024, 1024, 40): 0,  # the 1024-token size at SD1.5's first head dimension, for comparison
    (2, 8, 1024, 77, 40): 0,
    (2, 8, 1024, 1024, 80): 5,
    (2, 8, 1024, 77, 80): 5,
    (2, 8, 256, 256, 160): 5,
    (2, 8, 256, 77, 160): 5,
    (2, 8, 64, 64, 160): 1,
    (2, 8, 64, 77, 160): 1,
}


def _bf16(query, key, value):
    return F.scaled_dot_product_attention(query.bfloat16(), key.bfloat16(), value.bfloat16()).float()


PATHS = {"fp32": F.scaled_dot_product_attention, "bf16": _bf16, "int8": int8_sdpa}


def shapes_table(repeats: int, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    step = dict.fromkeys(PATHS, 0.0)
    print(
        "| shape (B x heads x T_q x T_k x d) | fp32 ms | bf16 ms | int8 ms | int8 / bf16 | int8 / fp32 | bf16 dB | int8 dB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (_, heads, queries, keys, dim), calls in SD15_CALLS.items():
        shape = (batch_size, heads, queries, keys, dim)
        query, key, value = (
            torch.randn(batch_size, tokens, heads, dim, generator=generator).transpose(1, 2)
            for tokens in (queries, keys, keys)
        )
        reference = F.scaled_dot_product_attention(query, key, value)
        quality = {name: sqnr_db(reference, PATHS[name](query, key, value)) for name in ("bf16", "int8")}
        times = {name: [] for name in PATHS}
        for _ in range(repeats):
            for name, path in PATHS.items():
                start = time.perf_counter()
                path(query, key, value)
                times[name].append(time.perf_counter() - start)
        ms = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        for name in PATHS:
            step[name] += calls * ms[name]
        print(
            f"| {'x'.join(map(str, shape))} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | {ms['int8']:.1f} | "
            f"{ms['int8'] / ms['bf16']:.2f} | {ms['int8'] / ms['fp32']:.2f} | {quality['bf16']:.1f} | "
            f"{quality['int8']:.1f} |",
            flush=True,
        )
    print(
        f"SD1.5 64x64 latent, batch {batch_size}: attention per UNet step (the calls above, summed): "
        + ", ".join(f"{name} {total:.0f} ms" for name, total in step.items())
        + f"; int8 / bf16 {step['int8'] / step['bf16']:.2f}"
    )


class _Capture(TorchFunctionMode):
    """Keeps the query / key / value of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(tuple(t.clone() for t in args[:3]))
        return func(*args, **(kwargs or {}))


def digits_calls(model: str) -> None:
    from quantdiff.pipelines.bundled import resolve_model
    from quantdiff.pipelines.loading import denoiser_of, load_pipeline

    pipe = load_pipeline(resolve_model(model))
    _, unet = denoiser_of(pipe)
    capture = _Capture()
    forward = unet.forward

    def captured(*args, **kwargs):
        with capture:
            return forward(*args, **kwargs)

    unet.forward = captured
    with torch.no_grad():
        pipe(
            ["a handwritten digit 3", "the digit 7"],
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    for name in ("bf16", "int8"):
        values = [sqnr_db(F.scaled_dot_product_attention(*call), PATHS[name](*call)) for call in capture.calls]
        print(
            f"{model}'s own attention inputs ({len(values)} calls: 10 steps, 2 prompts, CFG): {name} mean "
            f"{sum(values) / len(values):.1f} dB, min {min(values):.1f}, max {max(values):.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2, help="2: CFG as in generation; 1: the bench's batch")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{int8_attention_support().describe()}; {args.threads} thread(s); load average {os.getloadavg()}")
    shapes_table(args.repeats, args.batch)
    if not args.skip_digits:
        for model in ("digits-sd", "digits-sd3"):
            digits_calls(model)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
