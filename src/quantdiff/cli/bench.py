"""``quantdiff bench``: one denoiser step, fp32 vs quantdiff's integer paths vs int8 peers (quantdiff.bench)."""

from __future__ import annotations

import sys
from pathlib import Path

from quantdiff.errors import QuantDiffError


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "bench",
        help="time one denoiser step: fp32, quantdiff's integer / reference paths and int8 peers, in one process",
        description="Real-size denoisers (published configs, random weights), one step each, interleaved repeats; "
        "prints the table and writes a markdown report (and --json rows). Schema: quantdiff.bench.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="sd15 at 32x32, the main methods, 3 repeats: a few minutes on 2 cores"
    )
    parser.add_argument(
        "--models", help="comma-separated: sd15, sdxl, sd3 (default: all three; --quick: sd15), tiny-sd15, ..."
    )
    parser.add_argument(
        "--methods",
        help="comma-separated names or patterns (qd-*), 'default' or 'all' (default: the preset's); fp32 always runs",
    )
    parser.add_argument(
        "--latent",
        action="append",
        metavar="[MODEL=]SIZES",
        help="latent sides, e.g. sd15=32,64, or 64 for every model (repeatable; default sd15=32,64 sdxl=64 sd3=64; "
        "--quick: 32)",
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per group (default 5; --quick 3; CUDA 10)")
    parser.add_argument("--warmup", type=int, help="untimed rounds before them (default 1; CUDA 2)")
    parser.add_argument("--threads", type=int, help="torch / ONNX Runtime / OpenVINO threads (default: torch's)")
    parser.add_argument(
        "--batch", type=int, default=1, help="latents per step (default 1; 2 = classifier-free guidance)"
    )
    parser.add_argument("--calibration", type=int, default=4, help="random calibration inputs (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--group-size",
        type=int,
        help="most methods alive and timed together (default 5, CUDA: all; 0: as many as the memory budget allows)",
    )
    parser.add_argument(
        "--memory-budget", type=float, metavar="GIB", help="RSS this process may reach (default: 85%% of free)"
    )
    parser.add_argument("--no-freezing", action="store_true", help="compile without inductor freezing")
    parser.add_argument(
        "--slow-cutoff",
        type=float,
        default=3.0,
        metavar="X",
        help="a method over X times the baseline (fp32 / bf16 eager) in its first timed round is timed once "
        "(default 3; 0: never)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished cases of the --json file (same options) and measure only the others",
    )
    parser.add_argument(
        "--results",
        metavar="FILE",
        help="markdown report (default benchmarks/RESULTS.md; --quick: benchmarks/RESULTS-quick.md; "
        "CUDA: benchmarks/RESULTS-gpu.md)",
    )
    parser.add_argument("--no-results", action="store_true", help="do not write the markdown report")
    parser.add_argument(
        "--json", metavar="FILE", help="also write one JSON row per measurement (schema: quantdiff.bench)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), or a CUDA device: bf16 vs W8A8 on the int8 GEMM, eager / compiled / CUDA graphs, "
        "sdxl and sd3 at 128x128 by default -> benchmarks/RESULTS-gpu.md",
    )

    parser.set_defaults(run=run)


def _latents(entries: list[str] | None) -> dict[str, list[int]] | None:
    """``--latent sd15=32,64 --latent 64`` -> ``{"sd15": [32, 64], "*": [64]}`` (``*``: every other model)."""
    if not entries:
        return None
    latents: dict[str, list[int]] = {}
    for entry in entries:
        model, _, sizes = entry.rpartition("=")
        try:
            latents[model or "*"] = [int(size) for size in sizes.split(",") if size.strip()]
        except ValueError:
            raise QuantDiffError(f"--latent {entry!r}: expected [MODEL=]SIZES, e.g. sd15=32,64") from None
    return latents


def run(args) -> int:
    import shlex

    from quantdiff.bench import format_table, make_settings, read_json, run_benchmark, write_json, write_markdown

    settings = make_settings(
        quick=args.quick,
        models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
        methods=args.methods.split(",") if args.methods else None,
        latents=_latents(args.latent),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        batch=args.batch,
        calibration_inputs=args.calibration,
        seed=args.seed,
        group_size=args.group_size,
        memory_budget_bytes=None if args.memory_budget is None else int(args.memory_budget * 2**30),
        freezing=False if args.no_freezing else None,
        slow_cutoff=args.slow_cutoff or None,
        device=args.device,
    )
    previous = None
    if args.resume:
        if not args.json:
            raise QuantDiffError("--resume continues the run in the --json file: give --json FILE")
        if Path(args.json).exists():
            previous = read_json(args.json)
        else:
            print(f"{args.json} does not exist yet: measuring every case", file=sys.stderr)
    suffix = "-gpu" if settings.cuda else "-quick" if args.quick else ""
    results = None if args.no_results else (args.results or f"benchmarks/RESULTS{suffix}.md")
    for path in (results, args.json):  # fail now, not after an hour of measuring
        if path and Path(path).is_dir():
            raise QuantDiffError(f"'{path}' is a folder: give a file name")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def write(result) -> list[str]:
        # After every case too, so that a long run loses nothing measured if it is stopped.
        written = []
        try:
            if results:
                written.append(f"report -> {write_markdown(result, results)}")
            if args.json:
                written.append(f"rows -> {write_json(result, args.json)}")
        except OSError as error:
            raise QuantDiffError(f"cannot write the results: {error}") from None
        return written

    command = "quantdiff " + shlex.join(args.argv)
    result = run_benchmark(settings, log=None if args.quiet else log, command=command, on_case=write, previous=previous)
    print(format_table(result))
    for line in write(result):
        print(line)
    return 0
