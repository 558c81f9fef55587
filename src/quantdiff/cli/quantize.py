"""``quantdiff quantize``: plan -> algorithms -> observe -> convert a pipeline's denoiser, and save it."""

from __future__ import annotations

from quantdiff.cli.options import (
    DTYPES,
    add_calibration_options,
    add_model_argument,
    add_runtime_options,
    capture,
    refuse_existing,
)
from quantdiff.errors import QuantDiffError


def add_parser(verbs) -> None:
    from quantdiff.recipe import PRESETS

    parser = verbs.add_parser("quantize", help="quantize the denoiser and save it")
    add_model_argument(parser)
    parser.add_argument(
        "--recipe", default="w8a8", help=f"preset ({', '.join(PRESETS)}) or a .json/.yaml recipe file (default w8a8)"
    )
    parser.add_argument("--calib", help="calibration folder from `quantdiff calibrate` (else calibrate on the fly)")
    parser.add_argument("--out", required=True, help="output folder for the quantized model")
    parser.add_argument(
        "--copy-components",
        action="store_true",
        help="copy the unchanged components too, for a folder that works without MODEL_DIR",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_calibration_options(parser)
    add_runtime_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from quantdiff.calibration import CalibrationSet
    from quantdiff.pipelines.loading import denoiser_of, load_pipeline, read_pipeline_folder
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import load_recipe
    from quantdiff.report import format_totals, report_quantized_folder
    from quantdiff.serialization import save_quantized

    read_pipeline_folder(args.model)
    recipe = load_recipe(args.recipe)
    refuse_existing(args.out, args.overwrite)
    if args.calib and args.prompts:
        raise QuantDiffError("give either --calib (recorded data) or --prompts (calibrate now), not both")
    calibration = CalibrationSet.load(args.calib) if args.calib else None
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=DTYPES[args.dtype])
    _, denoiser = denoiser_of(pipe)
    if calibration is not None:
        calibration.check_matches(denoiser)
    elif recipe.needs_calibration:
        calibration = capture(args, pipe, args.model)
    quantize_denoiser(denoiser, recipe, calibration, progress=not args.quiet)
    save_quantized(pipe, args.out, base_path=args.model, copy_components=args.copy_components, overwrite=args.overwrite)
    print(format_totals(report_quantized_folder(args.out)))
    print(f"saved {recipe.label} ({recipe.name}) quantized denoiser -> {args.out}")
    return 0
