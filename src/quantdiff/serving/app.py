"""The ``quantdiff serve`` web app: a gradio UI at ``/`` and a plain HTTP API under ``/api``.

Both call the same :class:`~quantdiff.serving.service.GenerationService`, so limits, queue, numerics
guard and request log are shared. HTTP API::

    POST /api/generate  {"prompt": str, "negative_prompt"?, "seed"?, "steps"?, "guidance"?, "width"?,
                         "height"?, "scheduler"?, "batch_size"?, "eta"?, "shift"?}
      200 {"image_png_base64", "images_png_base64", "seed", "seconds", "parameters"}
      400 {"error"}  bad input or incompatible scheduler     503 {"error"}  queue full
      413 {"error"}  body over MAX_BODY_BYTES                 500 {"error"}  NaN/inf caught by the numerics guard
    GET  /api/health    200 {"status": "ok", "model", "quantization", "execution", "compare", "memory"}
"""

from __future__ import annotations

import base64
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from quantdiff.errors import QuantDiffError
from quantdiff.generate import png_bytes
from quantdiff.jsonfile import parse_json
from quantdiff.serving.schedulers import scheduler_names
from quantdiff.serving.service import (
    BodyTooLargeError,
    GenerationRequest,
    GenerationService,
    NonFiniteError,
    QueueFullError,
    RequestError,
)

MAX_BODY_BYTES = 64 * 2**10
"""Largest /api/generate body: a request at every limit (two 1000-character prompts) is about 2 kB of JSON."""
MAX_OTHER_BODY_BYTES = 2**20
"""Largest declared body on every other route (the gradio UI's calls; it takes no uploads)."""

# For models that carry no prompt set of their own (prompts/evaluation.json supplies examples and defaults).
EXAMPLE_PROMPTS = [
    "a red fox sitting in fresh snow at dawn",
    "a watercolor painting of a lighthouse on a rocky coast",
    'a neon sign that says "OPEN LATE" above a rainy street',
]
HISTORY_COLUMNS = ["time", "status", "prompt", "seed", "steps", "scheduler", "seconds", "model", "error"]
EXECUTION_COLUMNS = ["model", "layer", "path", "why"]


def _status(error: Exception) -> int:
    if isinstance(error, QueueFullError):
        return 503
    if isinstance(error, NonFiniteError):
        return 500
    if isinstance(error, BodyTooLargeError):
        return 413
    return 400


async def _read_body(request: Request) -> Any:
    """The JSON body, read up to :data:`MAX_BODY_BYTES` whatever the client declares (chunked included)."""
    declared = request.headers.get("content-length", "")
    too_large = BodyTooLargeError(
        f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB: send a shorter request"
    )
    if declared and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        return parse_json(bytes(body))
    except ValueError as error:  # bad JSON, bad UTF-8, deep nesting, huge integers
        raise RequestError(f"the request body is not valid JSON ({error})") from None


def build_app(service: GenerationService) -> FastAPI:
    """FastAPI app with the HTTP API, and the gradio UI mounted at ``/``."""
    app = FastAPI(title="quantdiff serve")

    @app.middleware("http")
    async def limit_bodies(request: Request, call_next):
        declared = request.headers.get("content-length", "")
        if (
            request.url.path != "/api/generate"
            and declared
            and (not declared.isdigit() or int(declared) > MAX_OTHER_BODY_BYTES)
        ):
            return JSONResponse({"error": "the request body is too large"}, status_code=413)
        return await call_next(request)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.main.path,
            "quantization": service.main.quantization,
            "execution": service.main.execution,
            "compare": service.slots[1].path if len(service.slots) > 1 else None,
            "memory": service.memory(),
        }

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        try:
            try:
                generation = GenerationRequest.from_json(await _read_body(request))
            except RequestError as error:
                service.refuse(error)  # logged like every other answer
                raise
            result = await run_in_threadpool(service.generate, generation)
        except QuantDiffError as error:
            return JSONResponse({"error": str(error)}, status_code=_status(error))
        encoded = [base64.b64encode(png_bytes(image, result.parameters)).decode() for image in result.images]
        return JSONResponse(
            {
                "image_png_base64": encoded[0],
                "images_png_base64": encoded,
                "seed": result.seed,
                "seconds": round(result.seconds, 4),
                "parameters": result.parameters,
            }
        )

    demo = build_ui(service)
    demo.queue(max_size=service.limits.queue_size, default_concurrency_limit=1)
    return gr.mount_gradio_app(app, demo, path="/")


def _history_rows(service: GenerationService) -> list[list[Any]]:
    rows = []
    for entry in service.history():
        request = entry.get("request", {})
        parameters = entry.get("parameters", {})
        rows.append(
            [
                entry.get("time", ""),
                entry.get("status", ""),
                request.get("prompt", ""),
                entry.get("seed", ""),
                parameters.get("steps", request.get("steps", "")),
                parameters.get("scheduler", request.get("scheduler", "")),
                entry.get("seconds", ""),
                entry.get("kind", "") + " " + entry.get("model", "").rsplit("/", 1)[-1],
                entry.get("error", ""),
            ]
        )
    return rows


def _execution_text(service: GenerationService) -> str:
    """How each quantized model's layers run (auto execution: chosen at the first image, faster path per shape)."""
    lines = [f"**{slot.name}** · {slot.execution}" for slot in service.slots if slot.execution is not None]
    return "\n\n".join(lines) or "Floating point: no quantized layers."


def _execution_rows(service: GenerationService) -> list[list[str]]:
    return [[slot.name, *row] for slot in service.slots for row in slot.execution_layers()]


def _memory_text(service: GenerationService) -> str:
    memory = service.memory()
    text = f"Memory in use: {memory['rss_bytes'] / 2**20:.0f} MiB (process RSS)"
    if "cuda_allocated_bytes" in memory:
        text += f", {memory['cuda_allocated_bytes'] / 2**20:.0f} MiB on the GPU"
    return text


def _describe(result, label: str) -> str:
    p = result.parameters
    steps = result.step_seconds
    per_step = f", {sum(steps) / len(steps):.3f} s/step" if steps else ""
    return (
        f"**{label}** · seed **{result.seed}** · {p['steps']} steps · guidance {p['guidance']} · "
        f"{p['width']}x{p['height']} · {p['scheduler']} · {result.seconds:.2f} s{per_step} · "
        f"peak {result.peak_memory_bytes / 2**20:.0f} MiB"
    )


def _defaults_text(slot, defaults: dict[str, Any]) -> str:
    own = slot.prompt_set
    if own is None:
        return f"Examples are generic; defaults: {defaults['steps']} steps, guidance {defaults['guidance']:g}."
    return (
        f"Examples and defaults ({defaults['steps']} steps, guidance {defaults['guidance']:g}) come from "
        f"the model's own prompt set ({len(own.prompts)} prompts, prompts/evaluation.json)."
    )


def build_ui(service: GenerationService) -> gr.Blocks:
    """The gradio page: generate (and compare) tab, history tab."""
    slot = service.main
    defaults = slot.defaults()
    limits = service.limits
    multiple = slot.size_multiple
    comparing = len(service.slots) > 1
    title = f"{slot.name} ({slot.quantization or 'floating point'})"
    if comparing:
        other = service.slots[1]
        title += f" vs {other.name} ({other.quantization or 'floating point'})"

    with gr.Blocks(title="quantdiff serve") as demo:
        gr.Markdown(f"## quantdiff serve · {title}")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                        randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                    steps = gr.Slider(
                        1, limits.max_steps, value=defaults["steps"], step=1, label="Steps", elem_id="steps"
                    )
                    guidance = gr.Slider(
                        0, 20, value=defaults["guidance"], step=0.5, label="Guidance", elem_id="guidance"
                    )
                    top = max(multiple, min(limits.max_size, 1024))
                    width = gr.Slider(multiple, top, value=defaults["width"], step=multiple, label="Width")
                    height = gr.Slider(multiple, top, value=defaults["height"], step=multiple, label="Height")
                    scheduler = gr.Dropdown(
                        scheduler_names(slot.original_scheduler), value=defaults["scheduler"], label="Scheduler"
                    )
                    batch = gr.Slider(1, limits.max_batch, value=1, step=1, label="Batch size")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    gr.Examples(slot.example_prompts() or EXAMPLE_PROMPTS, inputs=[prompt], elem_id="examples")
                    gr.Markdown(_defaults_text(slot, defaults), elem_id="defaults")
                with gr.Column():
                    error = gr.Markdown(elem_id="error")
                    images = gr.Gallery(label=slot.name, elem_id="images", columns=2, height="auto")
                    info = gr.Markdown(elem_id="info")
                    if comparing:
                        other_images = gr.Gallery(label=service.slots[1].name, elem_id="compare-images", columns=2)
                        other_info = gr.Markdown(elem_id="compare-info")
                        similarity = gr.Markdown(elem_id="similarity")
                    memory = gr.Markdown(_memory_text(service), elem_id="memory")
                    execution = gr.Markdown(_execution_text(service), elem_id="execution")
                    with gr.Accordion("Execution per layer (path and why)", open=False):
                        execution_layers = gr.Dataframe(
                            value=_execution_rows(service) or None,
                            headers=EXECUTION_COLUMNS,
                            elem_id="execution-layers",
                            interactive=False,
                        )
        with gr.Tab("History"):
            refresh = gr.Button("Refresh", elem_id="refresh-history")
            history = gr.Dataframe(
                value=_history_rows(service) or None, headers=HISTORY_COLUMNS, elem_id="history", interactive=False
            )

        def status_outputs() -> list[Any]:  # execution (auto settles at the first image), history
            return [_execution_text(service), _execution_rows(service) or None, _history_rows(service)]

        def run(
            prompt_text,
            negative_text,
            seed_value,
            randomize_seed,
            steps_value,
            guidance_value,
            width_value,
            height_value,
            scheduler_name,
            batch_size,
            progress=gr.Progress(),  # noqa: B008 - gradio injects progress through this default
        ):
            request = GenerationRequest(
                prompt=prompt_text or "",
                negative_prompt=negative_text or "",
                seed=None if randomize_seed else int(seed_value or 0),
                steps=int(steps_value),
                guidance=float(guidance_value),
                width=int(width_value),
                height=int(height_value),
                scheduler=scheduler_name,
                batch_size=int(batch_size),
            )

            def report(step: int, total: int) -> None:
                progress((step, total), desc="denoising")

            empty = [None, ""] + ([None, "", ""] if comparing else [])
            try:
                if comparing:
                    first, second, scores = service.compare(request, report)
                    outputs = [
                        first.images,
                        _describe(first, slot.name),
                        second.images,
                        _describe(second, service.slots[1].name),
                        f"PSNR {scores['psnr']:.2f} dB · SSIM {scores['ssim']:.4f} between the two",
                    ]
                    used_seed = first.seed
                else:
                    first = service.generate(request, report)
                    outputs = [first.images, _describe(first, slot.name)]
                    used_seed = first.seed
            except QuantDiffError as failure:
                gr.Warning(str(failure))
                return [f"**Error:** {failure}", *empty, gr.update(), _memory_text(service), *status_outputs()]
            return ["", *outputs, used_seed, _memory_text(service), *status_outputs()]

        outputs = [error, images, info] + ([other_images, other_info, similarity] if comparing else [])
        outputs += [seed, memory, execution, execution_layers, history]
        button.click(
            run,
            inputs=[prompt, negative, seed, randomize, steps, guidance, width, height, scheduler, batch],
            outputs=outputs,
            api_name=False,
        )
        refresh.click(lambda: _history_rows(service), outputs=[history], api_name=False)
    return demo


def serve(service: GenerationService, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(build_app(service), host=host, port=port, log_level="warning")
