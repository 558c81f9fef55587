"""Options and helpers shared by several verbs (calibration, runtime, execution), so each reads the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quantdiff.errors import QuantDiffError
from quantdiff.nn.attention import ATTENTION_CHOICES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_DIR", help="diffusers pipeline folder, or a bundled name (digits-sd, tiny-sd15, ...)"
    )


DEFAULT_CALIBRATION_STEPS = 25  # sampler steps per calibration prompt where the model names none


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument(
        "--steps",
        type=int,
        help=f"sampler steps per calibration prompt (default: the model's evaluation steps, else {DEFAULT_CALIBRATION_STEPS})",
    )
    group.add_argument(
        "--num-timesteps",
        default="8",
        help="steps recorded per prompt, spread evenly over the trajectory, or 'all' (default 8)",
    )
    group.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    group.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    group.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="dtype of the floating-point weights (default float32; fp16/bf16 are slow on most CPUs)",
    )


def add_execution_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--execution",
        choices=("auto", "integer", "reference"),
        default=default,
        help="quantized folders: 'auto' runs each layer the int8 kernel computes exactly on the kernel or on a "
        "float copy of its weight (same output as 'reference'), whichever is faster for its shape on this CPU, "
        "measured at its first call; 'integer' forces the int8 kernels wherever they compute the layer "
        "exactly; 'reference' the fake-quant path everywhere (default %(default)s)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="auto / integer execution: dtype of scaled-dot-product attention; auto = bf16 on CPUs with native "
        "bf16 (AMX / AVX512-BF16), else float32; int8 = QK^T and PV in int8, softmax in float32 (CPU only, off "
        "by default: 38-56 dB from float32 per call, about bf16's speed) (default auto)",
    )


def num_timesteps(text: str) -> int | None:
    """``--num-timesteps``: a positive integer, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise QuantDiffError(f"--num-timesteps must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise QuantDiffError(f"--num-timesteps must be at least 1, got {value}")
    return value


def refuse_existing(out: str, overwrite: bool) -> None:
    """Checked before any long work; the atomic writer checks again when it finishes."""
    if Path(out).exists() and not overwrite:
        raise QuantDiffError(f"output '{out}' already exists: choose another --out or pass --overwrite")


def capture(args, pipe, model: str):
    """Record calibration data with the calibration options of ``args`` (see :func:`add_calibration_options`)."""
    from quantdiff.calibration import capture_calibration, read_prompts
    from quantdiff.evaluation.prompt_sets import read_calibration_prompts, read_evaluation_set

    own = None if args.prompts else read_calibration_prompts(model)
    prompts = own or read_prompts(args.prompts)
    # calibrate at the guidance and step count the model is meant to be used with, where it says so
    evaluation = read_evaluation_set(model) if args.guidance is None or args.steps is None else None
    guidance = args.guidance if args.guidance is not None else getattr(evaluation, "guidance", None)
    steps = args.steps if args.steps is not None else getattr(evaluation, "steps", None) or DEFAULT_CALIBRATION_STEPS
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise QuantDiffError(f"--num-prompts must be at least 1, got {args.num_prompts}")
        prompts = prompts[: args.num_prompts]
    return capture_calibration(
        pipe,
        prompts,
        num_inference_steps=steps,
        num_timesteps=num_timesteps(args.num_timesteps),
        guidance_scale=guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        mode=args.mode,
        model_path=model,
        progress=not args.quiet,
    )
