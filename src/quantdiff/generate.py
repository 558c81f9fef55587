"""Generate images from a plain pipeline folder or a quantized folder, reproducibly from a seed.

The same seed drives the same initial latents in the floating-point and the quantized pipeline (the
generator lives on the CPU whatever the device), so their images can be compared pixel by pixel.
"""

from __future__ import annotations

import inspect
import io
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from quantdiff.errors import QuantDiffError
from quantdiff.nn import ATTENTION_CHOICES, EXECUTION_MODES, execution_summary, use_execution
from quantdiff.nn.attention import describe_attention
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.progress import bars_wanted
from quantdiff.quantize import quantization_info
from quantdiff.serialization import is_quantized_folder, load_quantized_pipeline

EXECUTIONS = EXECUTION_MODES


def load_any_pipeline(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    execution: str = "reference",
    attention: str = "auto",
    **components: Any,
):
    """A pipeline from a diffusers pipeline folder (floating point) or a quantdiff folder (quantized).

    Args:
        execution: for a quantized folder, ``"integer"`` runs each quantized layer on this CPU's int8 kernel
            where it computes it exactly (the others keep the reference path; ``execution_summary`` of the
            denoiser says which and why); ``"auto"`` runs each such layer on the faster of the kernel and the
            float path (the reference math on a cached fp32 weight), measured at its first call (see
            :func:`quantdiff.nn.use_execution`); ``"reference"`` the fake-quant path everywhere. Ignored for
            floating-point folders.
        attention: in integer and auto execution, the dtype of scaled-dot-product attention: ``"auto"`` (bf16
            on CPUs with native bf16), ``"float32"``, ``"bfloat16"`` or ``"int8"`` (QK^T and PV in int8, CPU
            only; see :mod:`quantdiff.nn.attention`).
    """
    if execution not in EXECUTIONS:
        raise QuantDiffError(f"execution {execution!r} is unknown: use one of {', '.join(EXECUTIONS)}")
    if attention not in ATTENTION_CHOICES:
        raise QuantDiffError(f"attention {attention!r} is unknown: use one of {', '.join(ATTENTION_CHOICES)}")
    if not is_quantized_folder(path):
        return load_pipeline(path, device=device, **components)
    refuse_inert_attention(attention, execution)
    pipe = load_quantized_pipeline(path, device=device, **components)
    if execution != "reference":
        _, denoiser = denoiser_of(pipe)
        try:
            use_execution(denoiser, execution, attention=attention)
        except ValueError as error:  # e.g. int8 attention asked of a model on a GPU
            raise QuantDiffError(f"--attention {attention}: {error}") from None
    return pipe


def refuse_inert_attention(attention: str, execution: str) -> None:
    """Refuse int8 attention with the reference execution of a quantized folder, which keeps fp32 attention:
    saying nothing would let an int8-attention measurement silently measure fp32 attention."""
    if attention == "int8" and execution == "reference":
        raise QuantDiffError(
            "attention 'int8' (--attention int8) takes effect in integer or auto execution only: add "
            "--execution integer (or auto)"
        )


def describe_execution(pipe) -> str | None:
    """One line on how the pipeline's quantized denoiser runs (None for a floating-point denoiser)."""
    _, denoiser = denoiser_of(pipe)
    if quantization_info(denoiser) is None:
        return None
    summary = execution_summary(denoiser)
    if summary.mode == "reference":
        return "reference (fake-quant) execution"
    if summary.mode == "integer":
        counts = f"{len(summary.integer)} of {len(summary.layers)} quantized layers on int8 kernels"
    else:  # auto: what each layer chose at its first call (faster on this CPU)
        counts = f"{len(summary.integer)} of {len(summary.layers)} quantized layers on int8 kernels" + (
            f", {len(summary.floating)} on the float path (faster here for their shapes; "
            f"+{sum(layer.float_bytes for layer in summary.layers) / 2**20:.2f} MiB fp32 weight copies)"
            if summary.floating
            else ""
        )
        counts += f", {len(summary.pending)} chosen at their first call" if summary.pending else ""
        counts += f", {len(summary.reference)} on the reference path" if summary.reference else ""
    attention = f", attention in {describe_attention(summary.attention)}" if summary.attention else ""
    if summary.attention == "int8":
        from quantdiff.nn.int8_attention import int8_attention_support

        attention += f" ({int8_attention_support().describe()})"
    return f"{summary.mode} execution: {counts}{attention}"


def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Image.Image, dict[str, Any]]:
    """One image and the parameters that made it.

    Args:
        pipe: a loaded pipeline (floating point or quantized).
        prompt, negative_prompt: text conditioning.
        steps, guidance, height, width: the pipeline's defaults where ``None``.
        seed: seed of the CPU generator that draws the initial latents.
        progress: show the pipeline's per-step progress bar (on a terminal only, see :mod:`quantdiff.progress`).

    Returns:
        ``(image, parameters)``; ``parameters`` holds every setting, the size actually produced, the
        scheduler, and the quantization recipe (``None`` for a floating-point denoiser).
    """
    kwargs: dict[str, Any] = {"prompt": prompt, "generator": torch.Generator("cpu").manual_seed(seed)}
    for name, value in (
        ("negative_prompt", negative_prompt),
        ("num_inference_steps", steps),
        ("guidance_scale", guidance),
        ("height", height),
        ("width", width),
    ):
        if value is not None:
            kwargs[name] = value
    pipe.set_progress_bar_config(disable=not bars_wanted(progress))
    with torch.no_grad():
        image = pipe(**kwargs).images[0]
    _, denoiser = denoiser_of(pipe)
    info = quantization_info(denoiser)
    parameters = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "width": image.width,
        "height": image.height,
        "scheduler": type(pipe.scheduler).__name__,
        "model": str(getattr(pipe, "name_or_path", "") or ""),
        "quantization": None if info is None else f"{info.recipe.label} ({info.recipe.name})",
    }
    return image, parameters


def step_callback_kwargs(
    pipe, on_step: Callable[[int, torch.Tensor], None], accepted: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Pipeline call arguments that make it call ``on_step(step, latents)`` after every denoising step.

    Current pipelines take ``callback_on_step_end``; older ones (PixArt) the legacy ``callback``. The
    latents of the last call are the final latents, before the VAE decodes them.
    """
    accepted = inspect.signature(pipe.__call__).parameters if accepted is None else accepted
    if "callback_on_step_end" in accepted:

        def step_end(pipe, step, timestep, callback_kwargs):
            on_step(step, callback_kwargs["latents"])
            return callback_kwargs

        return {"callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
    if "callback" in accepted:
        return {"callback": lambda step, timestep, latents: on_step(step, latents), "callback_steps": 1}
    return {}


def a1111_parameters(parameters: dict[str, Any]) -> str:
    """The settings as the A1111 ``parameters`` PNG text, which most diffusion tools read."""
    lines = [parameters["prompt"]]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    fields = [
        ("Steps", parameters.get("steps")),
        ("Sampler", parameters.get("scheduler")),
        ("CFG scale", parameters.get("guidance")),
        ("Seed", parameters.get("seed")),
        ("Size", f"{parameters['width']}x{parameters['height']}"),
        ("Model", Path(parameters["model"]).name if parameters.get("model") else None),
        ("Quantization", parameters.get("quantization")),
    ]
    lines.append(", ".join(f"{key}: {value}" for key, value in fields if value is not None))
    return "\n".join(lines)


_FIELD = re.compile(r"([A-Z][\w ]*): ")


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read back :func:`a1111_parameters` text: ``prompt``, ``negative_prompt`` and the ``Key: value`` fields.

    Linear in the text's length whatever it holds (no backtracking regex over the whole line): the fields
    line is split at ", " and a piece that starts with ``Key: `` starts a field; any other piece belongs to
    the value before it.
    """
    lines = text.split("\n")
    fields_line = lines.pop() if len(lines) > 1 else ""
    parsed: dict[str, str] = {}
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")]
    if negative:
        parsed["negative_prompt"] = "\n".join(lines[negative[0] :])[len("Negative prompt: ") :]
        lines = lines[: negative[0]]
    parsed["prompt"] = "\n".join(lines)
    key = None
    for piece in fields_line.split(", "):
        match = _FIELD.match(piece)
        if match:
            key = match.group(1)
            parsed[key] = piece[match.end() :]
        elif key is not None:
            parsed[key] += ", " + piece
    return parsed


def read_png_parameters(source: str | os.PathLike | bytes) -> dict[str, str]:
    """The settings stored in a PNG's ``parameters`` text chunk (by :func:`save_png` or A1111), parsed.

    ``source`` is a path or the file's bytes. A file that is not a PNG, or has no such chunk, raises
    :class:`QuantDiffError`; PIL's own limits bound what a hostile file can make it decompress.
    """
    where = "the image" if isinstance(source, bytes) else f"'{source}'"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.format != "PNG":
                raise QuantDiffError(f"{where} is a {image.format} image, not a PNG: pass a PNG saved by quantdiff")
            text = getattr(image, "text", {}).get("parameters")
    except QuantDiffError:
        raise
    except Exception as error:  # PIL raises many kinds on hostile bytes (SyntaxError, struct.error, ...)
        raise QuantDiffError(
            f"{where} is not a readable PNG ({type(error).__name__}): pass a PNG saved by quantdiff"
        ) from None
    if not isinstance(text, str):
        raise QuantDiffError(f"{where} has no 'parameters' text chunk: it was not saved by quantdiff or A1111")
    return parse_a1111_parameters(text)


def png_bytes(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """``image`` encoded as PNG with its settings in a ``parameters`` text chunk."""
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", a1111_parameters(parameters))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict[str, Any]) -> Path:
    """Save ``image`` as PNG with its settings in a ``parameters`` text chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, parameters))
    return path
