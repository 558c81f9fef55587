"""The ``quantdiff`` command line: one module per verb, each a thin layer over the public Python API.

A verb module has ``add_parser(verbs)`` (its options; ``set_defaults(run=run)``) and ``run(args) -> int``.
User errors (:class:`~quantdiff.errors.QuantDiffError`) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import sys

from quantdiff.cli import analyze, bench, calibrate, eval, generate, inspect, quantize, search, serve, tiny
from quantdiff.errors import QuantDiffError

VERBS = (calibrate, quantize, generate, inspect, analyze, search, serve, eval, bench, tiny)


def build_parser() -> argparse.ArgumentParser:
    from quantdiff.version import __version__

    parser = argparse.ArgumentParser(
        prog="quantdiff", description="Post-training quantization of diffusers text-to-image pipelines."
    )
    parser.add_argument("--version", action="version", version=f"quantdiff {__version__}")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress: no bars on a terminal, no step summary lines in a log"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(verbs)
    return parser


def _quiet_libraries(progress: bool) -> None:
    # transformers warns on every import that torchvision is missing; quantdiff never needs it.
    import diffusers
    import transformers

    from quantdiff.progress import bars_wanted

    transformers.logging.set_verbosity_error()
    # The libraries' own bars (loading components and weights) have no summary mode: terminal only.
    if not bars_wanted(progress):
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by bench in its report
    _quiet_libraries(progress=not args.quiet)
    try:
        if hasattr(args, "model"):
            from quantdiff.pipelines.bundled import resolve_model

            args.model = resolve_model(args.model)
            if getattr(args, "compare", None):
                args.compare = resolve_model(args.compare)
        return args.run(args)
    except QuantDiffError as error:
        print(f"quantdiff {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantdiff {args.verb}: interrupted", file=sys.stderr)
        return 130
