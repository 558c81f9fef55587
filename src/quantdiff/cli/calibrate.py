"""``quantdiff calibrate``: run the floating-point pipeline on prompts and record its denoiser's inputs."""

from __future__ import annotations

from quantdiff.cli.options import (
    DTYPES,
    add_calibration_options,
    add_model_argument,
    add_runtime_options,
    capture,
    num_timesteps,
    refuse_existing,
)


def add_parser(verbs) -> None:
    parser = verbs.add_parser("calibrate", help="run the FP pipeline on prompts and record denoiser inputs")
    add_model_argument(parser)
    parser.add_argument("--out", required=True, help="output folder for the calibration data")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_calibration_options(parser)
    add_runtime_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from quantdiff.pipelines.loading import load_pipeline, read_pipeline_folder

    read_pipeline_folder(args.model)
    refuse_existing(args.out, args.overwrite)
    num_timesteps(args.num_timesteps)
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=DTYPES[args.dtype])
    calibration = capture(args, pipe, args.model)
    calibration.save(args.out, overwrite=args.overwrite)
    prompts = len(calibration.info["prompts"])
    print(
        f"recorded {len(calibration)} denoiser calls ({prompts} prompts x {len(calibration.info['step_indices'])} "
        f"timesteps, mode {args.mode}) -> {args.out}"
    )
    return 0
