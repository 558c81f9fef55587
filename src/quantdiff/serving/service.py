"""The generation service behind ``quantdiff serve``: one loaded model (and an optional second one to
compare with), bounded inputs, one generation at a time per model with a bounded queue, a numerics
guard, per-step timing and memory, and one JSON line per request in a log file.

The web UI and the HTTP API both call :meth:`GenerationService.generate` / :meth:`compare`, so the
limits, the log and the guard are the same whichever way a request comes in.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

from quantdiff.errors import QuantDiffError
from quantdiff.evaluation.metrics import psnr, ssim
from quantdiff.evaluation.prompt_sets import EvaluationSet, read_evaluation_set
from quantdiff.generate import describe_execution, load_any_pipeline, save_png, step_callback_kwargs
from quantdiff.nn import execution_summary
from quantdiff.pipelines.loading import denoiser_of
from quantdiff.quantize import quantization_info
from quantdiff.serialization import is_quantized_folder, read_quantized_folder
from quantdiff.serving.schedulers import DEFAULT, make_scheduler, scheduler_family

ProgressCallback = Callable[[int, int], None]
DEFAULT_STEPS = 20
"""Steps of a request that gives none, for a model whose folder does not say (``prompts/evaluation.json``)."""


def own_prompt_set(path: str | os.PathLike) -> EvaluationSet | None:
    """The prompt set and settings a model carries (``prompts/evaluation.json``), ``None`` where it has none.

    A quantized folder carries its base pipeline folder's: it is the same model, and its images are meant to
    be compared with the floating-point ones at the same settings.
    """
    folder = read_quantized_folder(path).base_path if is_quantized_folder(path) else path
    return read_evaluation_set(folder)


class RequestError(QuantDiffError):
    """The request is invalid (HTTP 400)."""


class BodyTooLargeError(RequestError):
    """The HTTP request body is over the server's limit (HTTP 413)."""


class QueueFullError(QuantDiffError):
    """Too many requests are waiting for this model (HTTP 503)."""


class NonFiniteError(QuantDiffError):
    """The model produced NaN or inf (HTTP 500), caught before it became a black image."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for, and on how many may wait."""

    max_prompt_chars: int = 1000
    max_steps: int = 100
    max_size: int = 2048
    max_batch: int = 4
    queue_size: int = 8


@dataclass(frozen=True)
class GenerationRequest:
    """One generation; ``None`` fields take the model's defaults (:meth:`ModelSlot.defaults`)."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    batch_size: int = 1
    eta: float | None = None
    shift: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> GenerationRequest:
        """Build from a JSON body, with type errors reported as :class:`RequestError`."""
        if not isinstance(data, Mapping):
            raise RequestError("the request body must be a JSON object")
        allowed = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        if "prompt" not in data:
            raise RequestError("'prompt' is required")
        kinds = {
            "prompt": str,
            "negative_prompt": str,
            "scheduler": str,
            "seed": int,
            "steps": int,
            "width": int,
            "height": int,
            "batch_size": int,
            "guidance": float,
            "eta": float,
            "shift": float,
        }
        values = {}
        for name, value in data.items():
            expected = kinds[name]
            if value is None and name not in ("prompt", "negative_prompt", "batch_size"):
                values[name] = None
            elif expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[name] = float(value)
            elif isinstance(value, expected) and not isinstance(value, bool):
                values[name] = value
            else:
                raise RequestError(f"'{name}' must be {expected.__name__}, got {value!r}")
        return cls(**values)


@dataclass
class GenerationResult:
    """Images and everything about how they were made."""

    images: list[Image.Image]
    seed: int
    seconds: float
    step_seconds: list[float]
    peak_memory_bytes: int
    parameters: dict[str, Any]
    paths: list[Path] = field(default_factory=list)


class ModelSlot:
    """One loaded pipeline with its lock, its original scheduler config and its input rules."""

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        no_t5: bool = False,
        cpu_offload: bool = False,
        execution: str = "auto",
        attention: str = "auto",
    ):
        self.path = str(path)
        # T5-XXL is ~4.7 GB of SD3's text encoders; without it SD3 uses zero T5 embeddings.
        extra = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
        if cpu_offload and not str(device).startswith("cuda"):
            raise RequestError("CPU offload moves components between GPU and CPU memory: it needs --device cuda")
        self.pipe = load_any_pipeline(
            path, device="cpu" if cpu_offload else device, execution=execution, attention=attention, **extra
        )
        self.execution = describe_execution(self.pipe)  # refreshed after each run: auto chooses at the first call
        if cpu_offload:
            self.pipe.enable_model_cpu_offload(device=device)
        self.pipe.set_progress_bar_config(disable=True)
        _, denoiser = denoiser_of(self.pipe)
        info = quantization_info(denoiser)
        self.quantization = None if info is None else f"{info.recipe.label} ({info.recipe.name})"
        self.original_scheduler = copy.deepcopy(self.pipe.scheduler)
        self.lock = threading.Lock()
        self.call_parameters = inspect.signature(self.pipe.__call__).parameters
        self.prompt_set = own_prompt_set(path)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: VAE downsampling times the denoiser's own."""
        vae_factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        _, denoiser = denoiser_of(self.pipe)
        config = denoiser.config
        if "patch_size" in config and config["patch_size"]:
            return vae_factor * int(config["patch_size"])
        return vae_factor * 2 ** (len(config["block_out_channels"]) - 1)

    def defaults(self) -> dict[str, Any]:
        """The values a request's ``None`` fields take: steps and guidance from the model's own prompt set
        where it gives them (the settings it is evaluated with), else 20 steps and the pipeline's guidance."""
        _, denoiser = denoiser_of(self.pipe)
        side = int(denoiser.config["sample_size"]) * int(getattr(self.pipe, "vae_scale_factor", 8))
        guidance = self.call_parameters.get("guidance_scale")
        own = self.prompt_set
        if own is not None and own.guidance is not None:
            default_guidance = float(own.guidance)
        else:
            default_guidance = float(guidance.default) if guidance is not None else 5.0
        return {
            "steps": int(own.steps) if own is not None and own.steps is not None else DEFAULT_STEPS,
            "guidance": default_guidance,
            "width": side,
            "height": side,
            "scheduler": DEFAULT,
        }

    def execution_layers(self) -> list[list[str]]:
        """One row ``[layer, path, reason]`` per quantized layer of the denoiser (none for a floating-point one):
        the int8 kernel, the float path or the reference, and why (auto: the timings that chose it)."""
        _, denoiser = denoiser_of(self.pipe)
        if quantization_info(denoiser) is None:
            return []
        return [[layer.name, layer.path, layer.reason] for layer in execution_summary(denoiser).layers]

    def example_prompts(self, count: int = 6) -> list[str] | None:
        """Up to ``count`` prompts from the model's own prompt set (those it was trained on, before held-out
        ones), or ``None`` when it carries none."""
        if self.prompt_set is None:
            return None
        ordered = sorted(self.prompt_set.prompts, key=lambda prompt: prompt.heldout)  # stable: file order kept
        unique = list(dict.fromkeys(prompt.text for prompt in ordered))
        return unique[:count]


class GenerationService:
    """Serves one model, or two in compare mode, under :class:`Limits`, logging every request."""

    def __init__(
        self,
        model: str,
        *,
        compare: str | None = None,
        device: str = "cpu",
        log_path: str | os.PathLike = "quantdiff-serve.jsonl",
        outputs: str | os.PathLike | None = None,
        limits: Limits = Limits(),
        no_t5: bool = False,
        cpu_offload: bool = False,
        execution: str = "auto",
        attention: str = "auto",
    ):
        self.limits = limits
        options = dict(device=device, no_t5=no_t5, cpu_offload=cpu_offload, execution=execution, attention=attention)
        self.slots = [ModelSlot(model, **options)]
        if compare is not None:
            self.slots.append(ModelSlot(compare, **options))
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.outputs = Path(outputs) if outputs is not None else None
        self._log_lock = threading.Lock()
        self._admission = threading.Lock()
        self._waiting = 0

    @property
    def main(self) -> ModelSlot:
        return self.slots[0]

    # ------------------------------------------------------------------ validation

    def resolve(self, request: GenerationRequest, slot: ModelSlot | None = None) -> dict[str, Any]:
        """Validated, complete parameters for ``request`` on ``slot``; :class:`RequestError` if out of bounds."""
        slot = slot or self.main
        limits = self.limits
        defaults = slot.defaults()
        prompt = request.prompt.strip()
        if not prompt:
            raise RequestError("the prompt is empty: describe the image you want")
        if len(prompt) > limits.max_prompt_chars or len(request.negative_prompt) > limits.max_prompt_chars:
            raise RequestError(f"prompts are limited to {limits.max_prompt_chars} characters")
        steps = min(defaults["steps"], limits.max_steps) if request.steps is None else request.steps
        if not 1 <= steps <= limits.max_steps:
            raise RequestError(f"steps must be between 1 and {limits.max_steps}, got {steps}")
        guidance = defaults["guidance"] if request.guidance is None else request.guidance
        if not 0.0 <= guidance <= 30.0:
            raise RequestError(f"guidance must be between 0 and 30, got {guidance}")
        multiple = slot.size_multiple
        size = {}
        for name in ("width", "height"):
            value = defaults[name] if getattr(request, name) is None else getattr(request, name)
            if not multiple <= value <= limits.max_size or value % multiple:
                raise RequestError(
                    f"{name} must be a multiple of {multiple} between {multiple} and {limits.max_size}, got {value}"
                )
            size[name] = value
        if not 1 <= request.batch_size <= limits.max_batch:
            raise RequestError(f"batch_size must be between 1 and {limits.max_batch}, got {request.batch_size}")
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**31)
        if not 0 <= seed < 2**63:
            raise RequestError(f"seed must be a non-negative integer below 2^63, got {seed}")
        scheduler = request.scheduler or defaults["scheduler"]
        options = {}
        if request.shift is not None:
            if scheduler_family(slot.original_scheduler) != "flow":
                raise RequestError("'shift' applies to flow-matching models only")
            options["shift"] = request.shift
        make_scheduler(slot.original_scheduler, scheduler, **options)  # raises, saying why, if incompatible
        if request.eta is not None and scheduler != "ddim":
            raise RequestError("'eta' applies to the DDIM scheduler only")
        return {
            "prompt": prompt,
            "negative_prompt": request.negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            **size,
            "scheduler": scheduler,
            "scheduler_options": options,
            "eta": request.eta,
            "batch_size": request.batch_size,
        }

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        """Generate on the main model; every outcome, success or error, is logged."""
        started = time.time()
        try:
            parameters = self.resolve(request)
            with self._admitted():
                result = self._run(self.main, parameters, progress)
        except QuantDiffError as error:
            self._log(
                {"kind": "generate", "model": self.main.path, "request": dataclasses.asdict(request)},
                started,
                error=error,
            )
            raise
        self._log(
            {"kind": "generate", "model": self.main.path, "request": dataclasses.asdict(request)},
            started,
            result=result,
        )
        return result

    def compare(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> tuple[GenerationResult, GenerationResult, dict[str, float]]:
        """The same request and seed on both models; returns both results and PSNR / SSIM between them."""
        if len(self.slots) < 2:
            raise RequestError("compare mode needs a second model: start the server with --compare DIR")
        started = time.time()
        entry = {
            "kind": "compare",
            "model": self.main.path,
            "compare": self.slots[1].path,
            "request": dataclasses.asdict(request),
        }
        try:
            parameters = self.resolve(request)
            self.resolve(dataclasses.replace(request, seed=parameters["seed"]), self.slots[1])
            with self._admitted():
                first = self._run(self.main, parameters, progress)
                second = self._run(self.slots[1], parameters, progress)
        except QuantDiffError as error:
            self._log(entry, started, error=error)
            raise
        a = np.stack([np.asarray(image) for image in first.images])
        b = np.stack([np.asarray(image) for image in second.images])
        similarity = {"psnr": psnr(a, b), "ssim": ssim(a, b)}
        self._log({**entry, "similarity": similarity, "compare_seconds": second.seconds}, started, result=first)
        return first, second, similarity

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count this request as waiting or running; refuse it when ``queue_size`` already are."""
        with self._admission:
            if self._waiting >= self.limits.queue_size:
                raise QueueFullError(
                    f"the queue is full ({self.limits.queue_size} requests waiting): try again shortly"
                )
            self._waiting += 1
        try:
            yield
        finally:
            with self._admission:
                self._waiting -= 1

    def _run(self, slot: ModelSlot, parameters: dict[str, Any], progress: ProgressCallback | None) -> GenerationResult:
        with slot.lock:
            pipe = slot.pipe
            pipe.scheduler = make_scheduler(
                slot.original_scheduler, parameters["scheduler"], **parameters["scheduler_options"]
            )
            step_times: list[float] = []
            process = psutil.Process()
            peak = [process.memory_info().rss]
            total = parameters["steps"]
            last = [time.perf_counter()]

            def on_step(step: int, latents: torch.Tensor) -> None:
                now = time.perf_counter()
                step_times.append(now - last[0])
                last[0] = now
                peak[0] = max(peak[0], process.memory_info().rss)
                if not torch.isfinite(latents).all():
                    raise NonFiniteError(
                        f"the denoiser produced NaN/inf latents at step {step + 1} of {total}: try float32 "
                        "(--dtype float32), fewer or more steps, or another scheduler"
                    )
                if progress is not None:
                    progress(step + 1, total)

            kwargs = self._call_kwargs(slot, parameters, on_step)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with torch.no_grad():
                output = pipe(**kwargs)
            seconds = time.perf_counter() - started
            slot.execution = describe_execution(pipe)  # auto execution has now chosen each layer's path
            images = np.asarray(output.images)  # (B, H, W, 3) in [0, 1]
            if not np.isfinite(images).all():
                raise NonFiniteError(
                    "the decoded image contains NaN/inf (the VAE overflowed): upcast the VAE to float32 "
                    "(--dtype float32) and retry"
                )
            if torch.cuda.is_available():
                peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
        pil_images = [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
        record = {
            **{k: v for k, v in parameters.items() if k != "scheduler_options"},
            **parameters["scheduler_options"],
            # The A1111 "Sampler" field wants the sampler itself, not our menu's "default".
            "scheduler": type(slot.pipe.scheduler).__name__
            if parameters["scheduler"] == DEFAULT
            else parameters["scheduler"],
            "width": pil_images[0].width,
            "height": pil_images[0].height,
            "model": slot.path,
            "quantization": slot.quantization,
        }
        result = GenerationResult(pil_images, parameters["seed"], seconds, step_times, peak[0], record)
        if self.outputs is not None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            for index, image in enumerate(pil_images):
                result.paths.append(save_png(image, self.outputs / f"{stamp}-{slot.name}-{index}.png", record))
        return result

    def _call_kwargs(self, slot: ModelSlot, parameters: dict[str, Any], on_step) -> dict[str, Any]:
        generator = torch.Generator("cpu").manual_seed(parameters["seed"])
        kwargs: dict[str, Any] = {
            "prompt": parameters["prompt"],
            "negative_prompt": parameters["negative_prompt"] or None,
            "num_inference_steps": parameters["steps"],
            "guidance_scale": parameters["guidance"],
            "width": parameters["width"],
            "height": parameters["height"],
            "num_images_per_prompt": parameters["batch_size"],
            "generator": generator,
            "output_type": "np",
        }
        if parameters["eta"] is not None:
            kwargs["eta"] = parameters["eta"]
        accepted = slot.call_parameters
        kwargs.update(step_callback_kwargs(slot.pipe, on_step, accepted))
        return {name: value for name, value in kwargs.items() if name in accepted}

    # ------------------------------------------------------------------ log and status

    def _log(
        self,
        entry: dict[str, Any],
        started: float,
        *,
        result: GenerationResult | None = None,
        error: Exception | None = None,
    ) -> None:
        record = {"time": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds"), **entry}
        if result is not None:
            record.update(
                status="ok",
                seed=result.seed,
                parameters=result.parameters,
                seconds=round(result.seconds, 4),
                step_seconds=[round(s, 4) for s in result.step_seconds],
                peak_memory_bytes=result.peak_memory_bytes,
            )
        else:
            record.update(status="error", error=str(error), error_type=type(error).__name__)
        line = json.dumps(record, default=str)
        with self._log_lock, self.log_path.open("a") as handle:
            handle.write(line + "\n")

    def refuse(self, error: QuantDiffError) -> None:
        """Log a request refused before it became a :class:`GenerationRequest` (bad JSON, too large, bad fields)."""
        self._log({"kind": "generate", "model": self.main.path, "request": {}}, time.time(), error=error)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last ``limit`` log entries, newest first."""
        if not self.log_path.exists():
            return []
        with self._log_lock:
            lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in reversed(lines[-limit:]) if line.strip()]

    @staticmethod
    def memory() -> dict[str, int]:
        """Memory in use now: process RSS, and CUDA allocations when a GPU is used."""
        status = {"rss_bytes": psutil.Process().memory_info().rss}
        if torch.cuda.is_available():
            status["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        return status
