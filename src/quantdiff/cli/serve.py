"""``quantdiff serve``: the web app and HTTP API for a pipeline or quantized folder."""

from __future__ import annotations

from quantdiff.cli.options import add_execution_options
from quantdiff.errors import QuantDiffError


def add_parser(verbs) -> None:
    parser = verbs.add_parser("serve", help="web app and HTTP API for a pipeline or quantized folder")
    parser.add_argument("model", metavar="MODEL", help="diffusers pipeline folder or quantized folder")
    parser.add_argument("--compare", metavar="OTHER", help="second model: same prompt and seed, side by side")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--log", default="quantdiff-serve/requests.jsonl", help="JSON-lines request log")
    parser.add_argument("--outputs", default="quantdiff-serve/images", help="where generated PNGs are saved")
    parser.add_argument("--queue-size", type=int, default=8, help="requests waiting or running before 503")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--max-size", type=int, default=2048, help="largest width/height")
    parser.add_argument("--no-t5", action="store_true", help="SD3: drop the T5 text encoder to save memory")
    parser.add_argument(
        "--cpu-offload", action="store_true", help="with --device cuda: keep idle components on the CPU"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_execution_options(parser, "auto")
    parser.set_defaults(run=run)


def run(args) -> int:
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
