"""``quantdiff analyze``: where a denoiser's activations break under per-tensor quantization, before choosing a
recipe (report.json, report.md and plots)."""

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
    parser = verbs.add_parser(
        "analyze",
        help="per-layer input ranges, outlier channels / tokens and per-tensor 8/4-bit SQNR of the FP denoiser",
    )
    add_model_argument(parser)
    parser.add_argument("--calib", help="calibration folder from `quantdiff calibrate` (else calibrate on the fly)")
    parser.add_argument("--out", required=True, help="output folder: report.json, report.md and PNG plots")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--timestep-groups",
        type=int,
        default=4,
        help="groups of equal numbers of calibration timesteps for the input ranges (default 4)",
    )
    parser.add_argument(
        "--percentile", type=float, default=99.9, help="high percentile of abs(x) reported per call (default 99.9)"
    )
    parser.add_argument("--top-k", type=int, default=8, help="outlier channels / token positions listed per layer")
    parser.add_argument(
        "--rank-by",
        choices=("median-channel", "tensor"),
        default="median-channel",
        help="rank layers by the median channel's 4-bit SQNR (default; sees outlier channels) or the whole "
        "tensor's (energy-weighted: one huge channel makes it look good)",
    )
    parser.add_argument("--worst", type=int, default=10, help="layers shown in the tables and plots (default 10)")
    add_calibration_options(parser)
    add_runtime_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from quantdiff.analysis import analyze_denoiser, check_settings, format_worst_layers, write_analysis
    from quantdiff.calibration import CalibrationSet
    from quantdiff.pipelines.loading import denoiser_of, load_pipeline, read_pipeline_folder

    read_pipeline_folder(args.model)
    refuse_existing(args.out, args.overwrite)
    if args.calib and args.prompts:
        raise QuantDiffError("give either --calib (recorded data) or --prompts (calibrate now), not both")
    if args.worst < 1:
        raise QuantDiffError(f"--worst must be at least 1, got {args.worst}")
    rank_by = args.rank_by.replace("-", "_")
    check_settings(timestep_groups=args.timestep_groups, percentile=args.percentile, top_k=args.top_k, rank_by=rank_by)
    calibration = CalibrationSet.load(args.calib) if args.calib else None
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=DTYPES[args.dtype])
    _, denoiser = denoiser_of(pipe)
    if calibration is not None:
        calibration.check_matches(denoiser)
    else:
        calibration = capture(args, pipe, args.model)
    report = analyze_denoiser(
        denoiser,
        calibration,
        timestep_groups=args.timestep_groups,
        percentile=args.percentile,
        top_k=args.top_k,
        rank_by=rank_by,
        progress=not args.quiet,
    )
    write_analysis(report, args.out, overwrite=args.overwrite, worst=args.worst, title=args.model)
    print(format_worst_layers(report, count=args.worst))
    print(f"analysed {len(report.layers)} layers in {report.seconds:.1f} s -> {args.out} (report.md, report.json)")
    return 0
