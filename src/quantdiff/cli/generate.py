"""``quantdiff generate``: one image from a pipeline folder or a quantized folder."""

from __future__ import annotations

import sys

from quantdiff.cli.options import DTYPES, add_execution_options, add_runtime_options


def add_parser(verbs) -> None:
    parser = verbs.add_parser("generate", help="generate an image with a pipeline or quantized folder")
    parser.add_argument("model", metavar="MODEL", help="diffusers pipeline folder or quantized folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="image.png", help="PNG path (default image.png)")
    add_runtime_options(parser)
    add_execution_options(parser, "auto")
    parser.set_defaults(run=run)


def run(args) -> int:
    from quantdiff.generate import describe_execution, generate, load_any_pipeline, save_png

    pipe = load_any_pipeline(
        args.model,
        device=args.device,
        torch_dtype=DTYPES[args.dtype],
        execution=args.execution,
        attention=args.attention,
    )
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
    execution = describe_execution(pipe)  # after the run: auto execution chooses each layer's path at its first call
    if execution is not None and not args.quiet:
        print(execution, file=sys.stderr)
    save_png(image, args.out, parameters)
    kind = parameters["quantization"] or "floating point"
    print(f"{image.width}x{image.height} image, seed {args.seed}, {kind} -> {args.out}")
    return 0
