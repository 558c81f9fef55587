"""``quantdiff tiny``: build a tiny random-weight pipeline of one architecture (for demos and tests)."""

from __future__ import annotations

from quantdiff.cli.options import refuse_existing


def add_parser(verbs) -> None:
    parser = verbs.add_parser("tiny", help="build a tiny random-weight pipeline (for demos and tests)")
    parser.add_argument("arch", choices=("sd15", "sdxl", "sd3", "pixart"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-t5", action="store_true", help="sd3 only: build it without the T5 text encoder")
    parser.set_defaults(run=run)


def run(args) -> int:
    from quantdiff.atomic import atomic_directory
    from quantdiff.testing.tiny import build_tiny_pipeline

    refuse_existing(args.out, False)
    with atomic_directory(args.out) as staging:
        build_tiny_pipeline(args.arch, seed=args.seed, with_t5=not args.no_t5).save_pretrained(staging)
    print(f"tiny {args.arch} pipeline (random weights) -> {args.out}")
    return 0
