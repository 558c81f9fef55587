"""``quantdiff inspect``: per-layer plan and sizes of a quantized folder, or the dry run of a recipe."""

from __future__ import annotations

import json

from quantdiff.errors import QuantDiffError


def add_parser(verbs) -> None:
    parser = verbs.add_parser("inspect", help="per-layer plan and denoiser size in fp32/fp16/quantized bytes")
    parser.add_argument(
        "model", metavar="MODEL", help="quantized folder, or a pipeline folder (with --recipe: dry run)"
    )
    parser.add_argument("--recipe", help="for a pipeline folder: show the plan and sizes this recipe would give")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (schema in quantdiff.report)")
    parser.add_argument("--max-layers", type=int, help="show at most N layers in the table")
    parser.add_argument(
        "--execution",
        nargs="?",
        const="auto",
        choices=("auto", "integer"),
        help="quantized folder: load it and show each layer's path on this CPU and why, with the bytes held: "
        "'auto' (the default of generate and serve; runs one denoising step so that each layer picks the faster "
        "of the int8 kernel and the float path) or 'integer' (the int8 kernels wherever they compute the layer "
        "exactly; shows which widen 4-bit weights)",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
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
