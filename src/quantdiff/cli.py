"""The ``quantdiff`` command line: calibrate, quantize, generate, inspect, eval, serve, bench (and ``tiny`` for demos).

Every verb is a thin layer over the public Python API; user errors print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from quantdiff.errors import QuantDiffError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument(
        "--prompts",
        help="prompt file, one per line (default: the model's own set, else the 64 shipped with quantdiff)",
    )
    group.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    group.add_argument(
        "--mode",
        choices=("trajectory", "noise"),
        default="trajectory",
        help="run the sampler (trajectory) or pair real text conditioning with Gaussian latents (noise)",
    )
    group.add_argument("--steps", type=int, default=25, help="sampler steps per calibration prompt (default 25)")
    group.add_argument(
        "--num-timesteps",
        default="8",
        help="steps recorded per prompt, spread evenly over the trajectory, or 'all' (default 8)",
    )
    group.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    group.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    group.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default="float32",
        help="dtype of the floating-point weights (default float32; fp16/bf16 are slow on most CPUs)",
    )


def _execution_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--execution",
        choices=("integer", "reference"),
        default=default,
        help="quantized folders: 'integer' runs the quantized layers on this CPU's int8 kernels where they "
        "compute them exactly, 'reference' the fake-quant path (default %(default)s)",
    )
    parser.add_argument(
        "--attention",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="integer execution: dtype of scaled-dot-product attention; auto = bf16 on CPUs with native bf16 "
        "(AMX / AVX512-BF16), else float32 (default auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    from quantdiff.recipe import PRESETS
    from quantdiff.version import __version__

    parser = argparse.ArgumentParser(
        prog="quantdiff", description="Post-training quantization of diffusers text-to-image pipelines."
    )
    parser.add_argument("--version", action="version", version=f"quantdiff {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    calibrate = verbs.add_parser("calibrate", help="run the FP pipeline on prompts and record denoiser inputs")
    calibrate.add_argument(
        "model", metavar="MODEL_DIR", help="diffusers pipeline folder, or a bundled name (tiny-sd15, ...)"
    )
    calibrate.add_argument("--out", required=True, help="output folder for the calibration data")
    calibrate.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _calibration_options(calibrate)
    _runtime_options(calibrate)

    quantize = verbs.add_parser("quantize", help="quantize the denoiser and save it")
    quantize.add_argument(
        "model", metavar="MODEL_DIR", help="diffusers pipeline folder, or a bundled name (tiny-sd15, ...)"
    )
    quantize.add_argument(
        "--recipe", default="w8a8", help=f"preset ({', '.join(PRESETS)}) or a .json/.yaml recipe file (default w8a8)"
    )
    quantize.add_argument("--calib", help="calibration folder from `quantdiff calibrate` (else calibrate on the fly)")
    quantize.add_argument("--out", required=True, help="output folder for the quantized model")
    quantize.add_argument(
        "--copy-components",
        action="store_true",
        help="copy the unchanged components too, for a folder that works without MODEL_DIR",
    )
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _calibration_options(quantize)
    _runtime_options(quantize)

    generate = verbs.add_parser("generate", help="generate an image with a pipeline or quantized folder")
    generate.add_argument("model", metavar="MODEL", help="diffusers pipeline folder or quantized folder")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    generate.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    generate.add_argument("--height", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", default="image.png", help="PNG path (default image.png)")
    _runtime_options(generate)
    _execution_options(generate, "integer")

    inspect = verbs.add_parser("inspect", help="per-layer plan and denoiser size in fp32/fp16/quantized bytes")
    inspect.add_argument(
        "model", metavar="MODEL", help="quantized folder, or a pipeline folder (with --recipe: dry run)"
    )
    inspect.add_argument("--recipe", help="for a pipeline folder: show the plan and sizes this recipe would give")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON (schema in quantdiff.report)")
    inspect.add_argument("--max-layers", type=int, help="show at most N layers in the table")
    inspect.add_argument(
        "--execution",
        action="store_true",
        help="quantized folder: load it and show which layers run on this CPU's int8 kernels (and which widen "
        "4-bit weights), with the bytes held in integer mode",
    )

    serve = verbs.add_parser("serve", help="web app and HTTP API for a pipeline or quantized folder")
    serve.add_argument("model", metavar="MODEL", help="diffusers pipeline folder or quantized folder")
    serve.add_argument("--compare", metavar="OTHER", help="second model: same prompt and seed, side by side")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--log", default="quantdiff-serve/requests.jsonl", help="JSON-lines request log")
    serve.add_argument("--outputs", default="quantdiff-serve/images", help="where generated PNGs are saved")
    serve.add_argument("--queue-size", type=int, default=8, help="requests waiting or running before 503")
    serve.add_argument("--max-steps", type=int, default=100)
    serve.add_argument("--max-size", type=int, default=2048, help="largest width/height")
    serve.add_argument("--no-t5", action="store_true", help="SD3: drop the T5 text encoder to save memory")
    serve.add_argument("--cpu-offload", action="store_true", help="with --device cuda: keep idle components on the CPU")
    serve.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _execution_options(serve, "integer")

    evaluate = verbs.add_parser(
        "eval", help="generate with the FP model and quantized folders on the same seeds; score and compare"
    )
    evaluate.add_argument(
        "model", metavar="MODEL", help="floating-point pipeline folder, or a bundled name (digits-sd)"
    )
    evaluate.add_argument("quantized", metavar="QUANTIZED_DIR", nargs="*", help="quantized folders of MODEL")
    evaluate.add_argument("--out", required=True, help="folder for report.json, report.md and grid.png")
    evaluate.add_argument("--num-images", type=int, default=100, help="images per model (default 100)")
    evaluate.add_argument("--prompts", help="prompt file, one per line (default: the model's own evaluation set)")
    evaluate.add_argument("--steps", type=int, help="denoising steps (default: the evaluation set's, or pipeline's)")
    evaluate.add_argument(
        "--guidance", type=float, help="guidance scale (default: the evaluation set's, or pipeline's)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    evaluate.add_argument("--batch-size", type=int, default=50, help="images per pipeline call (default 50)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    real = evaluate.add_argument_group("real-model metrics (local weights only)")
    real.add_argument("--inception-weights", metavar="FILE", help="FID Inception weights (.safetensors): FID vs FP")
    real.add_argument("--clip-model", metavar="DIR", help="local CLIP folder (transformers): CLIPScore")
    real.add_argument("--image-reward", metavar="FILE", help="ImageReward checkpoint (needs the image-reward package)")
    real.add_argument("--image-reward-config", metavar="FILE", help="ImageReward med_config.json")
    evaluate.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _execution_options(evaluate, "reference")

    bench = verbs.add_parser(
        "bench",
        help="time one denoiser step: fp32, quantdiff's integer / reference paths and int8 peers, in one process",
        description="Real-size denoisers (published configs, random weights), one step each, interleaved repeats; "
        "prints the table and writes a markdown report (and --json rows). Schema: quantdiff.bench.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="sd15 at 32x32, the main methods, 3 repeats: a few minutes on 2 cores"
    )
    bench.add_argument(
        "--models", help="comma-separated: sd15, sdxl, sd3 (default: all three; --quick: sd15), tiny-sd15, ..."
    )
    bench.add_argument(
        "--methods",
        help="comma-separated names or patterns (qd-*), 'default' or 'all' (default: the preset's); fp32 always runs",
    )
    bench.add_argument(
        "--latent",
        action="append",
        metavar="[MODEL=]SIZES",
        help="latent sides, e.g. sd15=32,64, or 64 for every model (repeatable; default sd15=32,64 sdxl=64 sd3=64; "
        "--quick: 32)",
    )
    bench.add_argument("--repeats", type=int, help="timed rounds per group (default 5; --quick 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
    bench.add_argument("--threads", type=int, help="torch / ONNX Runtime threads (default: torch's)")
    bench.add_argument(
        "--batch", type=int, default=1, help="latents per step (default 1; 2 = classifier-free guidance)"
    )
    bench.add_argument("--calibration", type=int, default=4, help="random calibration inputs (default 4)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--group-size",
        type=int,
        help="most methods alive and timed together (default 5; 0: as many as the memory budget allows)",
    )
    bench.add_argument(
        "--memory-budget", type=float, metavar="GIB", help="RSS this process may reach (default: 85%% of free)"
    )
    bench.add_argument("--no-freezing", action="store_true", help="compile without inductor freezing")
    bench.add_argument(
        "--slow-cutoff",
        type=float,
        default=3.0,
        metavar="X",
        help="a method over X times fp32 eager in its first timed round is timed once (default 3; 0: never)",
    )
    bench.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished cases of the --json file (same options) and measure only the others",
    )
    bench.add_argument(
        "--results",
        metavar="FILE",
        help="markdown report (default benchmarks/RESULTS.md; --quick: benchmarks/RESULTS-quick.md)",
    )
    bench.add_argument("--no-results", action="store_true", help="do not write the markdown report")
    bench.add_argument(
        "--json", metavar="FILE", help="also write one JSON row per measurement (schema: quantdiff.bench)"
    )
    bench.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), or a CUDA device: bf16 vs W8A8 on the int8 GEMM, eager / compiled / CUDA graphs, "
        "sdxl and sd3 at 128x128 by default (quantdiff.bench.gpu) -> benchmarks/RESULTS-gpu.md",
    )

    tiny = verbs.add_parser("tiny", help="build a tiny random-weight pipeline (for demos and tests)")
    tiny.add_argument("arch", choices=("sd15", "sdxl", "sd3", "pixart"))
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--no-t5", action="store_true", help="sd3 only: build it without the T5 text encoder")
    return parser


def _num_timesteps(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise QuantDiffError(f"--num-timesteps must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise QuantDiffError(f"--num-timesteps must be at least 1, got {value}")
    return value


def _capture(args, pipe, model: str):
    from quantdiff.calibration import capture_calibration, read_prompts
    from quantdiff.evaluation.prompt_sets import read_calibration_prompts, read_evaluation_set

    own = None if args.prompts else read_calibration_prompts(model)
    prompts = own or read_prompts(args.prompts)
    guidance = args.guidance
    if guidance is None:  # calibrate at the guidance the model is meant to be used with, where it says so
        evaluation = read_evaluation_set(model)
        guidance = None if evaluation is None else evaluation.guidance
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise QuantDiffError(f"--num-prompts must be at least 1, got {args.num_prompts}")
        prompts = prompts[: args.num_prompts]
    return capture_calibration(
        pipe,
        prompts,
        num_inference_steps=args.steps,
        num_timesteps=_num_timesteps(args.num_timesteps),
        guidance_scale=guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        mode=args.mode,
        model_path=model,
        progress=not args.quiet,
    )


def _refuse_existing(out: str, overwrite: bool) -> None:
    # Checked before any long work; the atomic writer checks again when it finishes.
    if Path(out).exists() and not overwrite:
        raise QuantDiffError(f"output '{out}' already exists: choose another --out or pass --overwrite")


def _cmd_calibrate(args) -> int:
    from quantdiff.pipelines.loading import load_pipeline, read_pipeline_folder

    read_pipeline_folder(args.model)
    _refuse_existing(args.out, args.overwrite)
    _num_timesteps(args.num_timesteps)
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=_DTYPES[args.dtype])
    calibration = _capture(args, pipe, args.model)
    calibration.save(args.out, overwrite=args.overwrite)
    prompts = len(calibration.info["prompts"])
    print(
        f"recorded {len(calibration)} denoiser calls ({prompts} prompts x {len(calibration.info['step_indices'])} "
        f"timesteps, mode {args.mode}) -> {args.out}"
    )
    return 0


def _cmd_quantize(args) -> int:
    from quantdiff.calibration import CalibrationSet
    from quantdiff.pipelines.loading import denoiser_of, load_pipeline, read_pipeline_folder
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import load_recipe
    from quantdiff.report import format_totals, report_quantized_folder
    from quantdiff.serialization import save_quantized

    read_pipeline_folder(args.model)
    recipe = load_recipe(args.recipe)
    _refuse_existing(args.out, args.overwrite)
    if args.calib and args.prompts:
        raise QuantDiffError("give either --calib (recorded data) or --prompts (calibrate now), not both")
    calibration = CalibrationSet.load(args.calib) if args.calib else None
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=_DTYPES[args.dtype])
    _, denoiser = denoiser_of(pipe)
    if calibration is not None:
        calibration.check_matches(denoiser)
    elif recipe.activations is not None:
        calibration = _capture(args, pipe, args.model)
    quantize_denoiser(denoiser, recipe, calibration, progress=not args.quiet)
    save_quantized(pipe, args.out, base_path=args.model, copy_components=args.copy_components, overwrite=args.overwrite)
    print(format_totals(report_quantized_folder(args.out)))
    print(f"saved {recipe.label} ({recipe.name}) quantized denoiser -> {args.out}")
    return 0


def _cmd_generate(args) -> int:
    from quantdiff.generate import describe_execution, generate, load_any_pipeline, save_png

    pipe = load_any_pipeline(
        args.model,
        device=args.device,
        torch_dtype=_DTYPES[args.dtype],
        execution=args.execution,
        attention=args.attention,
    )
    execution = describe_execution(pipe)
    if execution is not None and not args.quiet:
        print(execution, file=sys.stderr)
    image, parameters = generate(
        pipe,
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        progress=not args.quiet,
    )
    save_png(image, args.out, parameters)
    kind = parameters["quantization"] or "floating point"
    print(f"{image.width}x{image.height} image, seed {args.seed}, {kind} -> {args.out}")
    return 0


def _cmd_inspect(args) -> int:
    from quantdiff.report import format_report, report_pipeline_folder, report_quantized_folder
    from quantdiff.serialization import is_quantized_folder

    if is_quantized_folder(args.model):
        if args.recipe:
            raise QuantDiffError("--recipe applies to pipeline folders; this folder is already quantized")
        report = report_quantized_folder(args.model, execution=args.execution)
    else:
        if args.execution:
            raise QuantDiffError("--execution needs a quantized folder: run quantize first, then inspect its output")
        report = report_pipeline_folder(args.model, args.recipe)
    print(json.dumps(report, indent=1) if args.json else format_report(report, max_layers=args.max_layers))
    return 0


def _cmd_serve(args) -> int:
    from quantdiff.serving.app import serve
    from quantdiff.serving.service import GenerationService, Limits

    for name in ("queue_size", "max_steps", "max_size"):
        if getattr(args, name) < 1:
            raise QuantDiffError(f"--{name.replace('_', '-')} must be at least 1")
    service = GenerationService(
        args.model,
        compare=args.compare,
        device=args.device,
        log_path=args.log,
        outputs=args.outputs,
        limits=Limits(queue_size=args.queue_size, max_steps=args.max_steps, max_size=args.max_size),
        no_t5=args.no_t5,
        cpu_offload=args.cpu_offload,
        execution=args.execution,
        attention=args.attention,
    )
    print(f"serving {args.model} on http://{args.host}:{args.port} (log: {args.log})")
    serve(service, host=args.host, port=args.port)
    return 0


def _cmd_tiny(args) -> int:
    from quantdiff.atomic import atomic_directory
    from quantdiff.pipelines.tiny import build_tiny_pipeline

    _refuse_existing(args.out, False)
    with atomic_directory(args.out) as staging:
        build_tiny_pipeline(args.arch, seed=args.seed, with_t5=not args.no_t5).save_pretrained(staging)
    print(f"tiny {args.arch} pipeline (random weights) -> {args.out}")
    return 0


def _cmd_eval(args) -> int:
    from quantdiff.calibration.prompts import read_prompts
    from quantdiff.evaluate import EvalSettings, RealMetricWeights, evaluate, format_table, write_report

    if (Path(args.out) / "report.json").exists() and not args.overwrite:
        raise QuantDiffError(f"'{args.out}' already holds a report: choose another --out or pass --overwrite")
    settings = EvalSettings(
        num_images=args.num_images, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size
    )
    weights = RealMetricWeights(args.inception_weights, args.clip_model, args.image_reward, args.image_reward_config)
    prompts = read_prompts(args.prompts) if args.prompts else None
    report, images = evaluate(
        args.model,
        args.quantized,
        settings=settings,
        prompts=prompts,
        real_weights=weights,
        device=args.device,
        progress=not args.quiet,
        execution=args.execution,
        attention=args.attention,
    )
    folder = write_report(report, images, args.out)
    print(format_table(report))
    floor = report.reference.get("fid_digits_floor")
    if floor is not None:
        print(f"FID-digits floor (second real set): {floor:.2f}")
    print(f"report.json, report.md, grid.png -> {folder}")
    return 0


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


def _cmd_bench_gpu(args) -> int:
    from quantdiff.bench.gpu import GPU_LATENTS, GpuBenchSettings, parse_methods, run_gpu_benchmark, write_gpu_results

    if args.quick or args.resume:
        raise QuantDiffError("--quick and --resume apply to the CPU benchmark; on a GPU choose --models and --latent")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else ("sdxl", "sd3")
    latents = _latents(args.latent) or {}
    settings = GpuBenchSettings(
        models=models,
        latents={m: tuple(latents.get(m, latents.get("*", GPU_LATENTS.get(m, (128,))))) for m in models},
        methods=tuple(parse_methods(args.methods)),
        repeats=args.repeats or 10,
        warmup=max(args.warmup, 2),
        batch=args.batch,
        calibration_inputs=args.calibration,
        seed=args.seed,
        device=args.device,
    )
    results = None if args.no_results else (args.results or "benchmarks/RESULTS-gpu.md")

    def write(result) -> None:  # after every case too: a run cut short keeps what it measured
        write_gpu_results(result, results, args.json)

    result = run_gpu_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True), on_case=write)
    write(result)
    print(f"report -> {results}" if results else "", f"rows -> {args.json}" if args.json else "")
    return 0


def _cmd_bench(args) -> int:
    import shlex

    from quantdiff.bench import format_table, make_settings, read_json, run_benchmark, write_json, write_markdown
    from quantdiff.bench.settings import DEFAULT_GROUP_SIZE

    if args.device != "cpu":
        return _cmd_bench_gpu(args)
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
        group_size=DEFAULT_GROUP_SIZE if args.group_size is None else (args.group_size or None),
        memory_budget_bytes=None if args.memory_budget is None else int(args.memory_budget * 2**30),
        freezing=not args.no_freezing,
        slow_cutoff=args.slow_cutoff or None,
    )
    previous = None
    if args.resume:
        if not args.json:
            raise QuantDiffError("--resume continues the run in the --json file: give --json FILE")
        if Path(args.json).exists():
            previous = read_json(args.json)
        else:
            print(f"{args.json} does not exist yet: measuring every case", file=sys.stderr)
    results = None if args.no_results else (args.results or f"benchmarks/RESULTS{'-quick' if args.quick else ''}.md")
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


_COMMANDS = {
    "calibrate": _cmd_calibrate,
    "quantize": _cmd_quantize,
    "generate": _cmd_generate,
    "inspect": _cmd_inspect,
    "serve": _cmd_serve,
    "tiny": _cmd_tiny,
    "eval": _cmd_eval,
    "bench": _cmd_bench,
}


def _quiet_libraries(progress: bool) -> None:
    # transformers warns on every import that torchvision is missing; quantdiff never needs it.
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    if not progress:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by bench in its report
    _quiet_libraries(progress=not args.quiet)
    if hasattr(args, "model"):
        from quantdiff.pipelines.bundled import resolve_model

        args.model = resolve_model(args.model)
        if getattr(args, "compare", None):
            args.compare = resolve_model(args.compare)
    try:
        return _COMMANDS[args.verb](args)
    except QuantDiffError as error:
        print(f"quantdiff {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantdiff {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
