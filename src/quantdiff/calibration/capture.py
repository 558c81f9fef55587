"""Record denoiser inputs while the real pipeline runs.

A forward pre-hook (``with_kwargs=True``) on the denoiser sees every call the pipeline makes, exactly as
the pipeline makes it; no pipeline code is copied or changed, so any pipeline whose denoiser quantdiff
supports works, with its own text encoders, scheduler and classifier-free guidance.

Two modes:

* ``trajectory`` (default): run the sampler on each prompt and keep the calls of ``num_timesteps`` steps
  spread evenly over the trajectory (Q-Diffusion's timestep-aware calibration). Both guidance branches
  are kept, because the pipeline batches them into one call.
* ``noise``: run the pipeline only up to its first denoiser call (text encoding, latent preparation),
  then pair the real text conditioning with pure Gaussian latents at ``num_timesteps`` timesteps spread
  over the schedule. Much faster; the latents are less realistic than the sampler's.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from quantdiff.calibration.dataset import CalibrationRecord, CalibrationSet
from quantdiff.errors import CalibrationError
from quantdiff.pipelines.loading import config_hash, denoiser_of
from quantdiff.progress import Progress

MODES = ("trajectory", "noise")


class _FirstCallReached(Exception):
    """Raised from the hook to stop the pipeline once the first denoiser call is recorded (noise mode)."""


def spread_indices(total: int, count: int | None) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first and last included; all if ``None``."""
    if count is None or count >= total:
        return list(range(total))
    if count < 1:
        raise ValueError(f"need at least one timestep, got {count}")
    return sorted({int(i) for i in np.round(np.linspace(0, total - 1, count))})


class _InputRecorder:
    """Forward pre-hook that keeps the bound keyword arguments of selected calls."""

    def __init__(self, denoiser: nn.Module, keep: set[int] | None, stop_after_first: bool):
        self.signature = inspect.signature(denoiser.forward)
        self.keep = keep
        self.stop_after_first = stop_after_first
        self.calls = 0
        self.recorded: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self.calls
        self.calls += 1
        if self.keep is None or step in self.keep:
            self.recorded.append((step, _detached(self._bind(args, kwargs))))
        if self.stop_after_first:
            raise _FirstCallReached

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        inputs: dict[str, Any] = {}
        for name, value in bound.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(value)  # forward(**kwargs): store what was passed under its own names
            else:
                inputs[name] = value
        return inputs


def capture_calibration(
    pipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 25,
    num_timesteps: int | None = 8,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    mode: str = "trajectory",
    model_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """Run ``pipe`` on ``prompts`` and record its denoiser's inputs.

    Args:
        pipe: a loaded diffusers text-to-image pipeline.
        prompts: calibration prompts; one pipeline run (one image) per prompt.
        num_inference_steps: sampler steps per run.
        num_timesteps: steps kept per run, spread evenly over the trajectory (``None``: all).
        guidance_scale, height, width: passed to the pipeline when given; its defaults otherwise.
        seed: prompt ``i`` uses a generator seeded with ``seed + i``.
        mode: ``"trajectory"`` or ``"noise"`` (see the module docstring).
        model_path: recorded in the set's info, to name the model in error messages.
        progress: show a progress bar over prompts.
    """
    if mode not in MODES:
        raise CalibrationError(f"calibration mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CalibrationError("no calibration prompts given (the prompt file is empty?)")
    component, denoiser = denoiser_of(pipe)
    keep_steps = spread_indices(num_inference_steps, num_timesteps)
    call_kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "output_type": "latent"}
    for name, value in (("guidance_scale", guidance_scale), ("height", height), ("width", width)):
        if value is not None:
            call_kwargs[name] = value
    pipe.set_progress_bar_config(disable=True)

    records: list[CalibrationRecord] = []
    for prompt_index, prompt in enumerate(
        Progress(prompts, desc=f"calibrate ({mode})", unit="prompt", enabled=progress)
    ):
        generator = torch.Generator("cpu").manual_seed(seed + prompt_index)
        recorder = _InputRecorder(denoiser, None if mode == "noise" else set(keep_steps), mode == "noise")
        handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
        try:
            with torch.no_grad():
                pipe(prompt=prompt, generator=generator, **call_kwargs)
        except _FirstCallReached:
            pass
        finally:
            handle.remove()
        if mode == "noise":
            recorded = _noise_calls(recorder.recorded[0][1], pipe.scheduler.timesteps, keep_steps, generator)
        else:
            recorded = recorder.recorded
        if len(recorded) != len(keep_steps):
            raise CalibrationError(
                f"expected {len(keep_steps)} denoiser calls to record, got {len(recorded)}: "
                f"{type(pipe).__name__} called its {component} {recorder.calls} times for "
                f"{num_inference_steps} steps"
            )
        records.extend(
            CalibrationRecord(inputs, prompt_index, step, _timestep_value(inputs.get("timestep")))
            for step, inputs in recorded
        )

    info = {
        "model": str(model_path or getattr(pipe, "name_or_path", None) or ""),
        "pipeline_class": type(pipe).__name__,
        "denoiser_component": component,
        "denoiser_class": type(denoiser).__name__,
        "denoiser_config_hash": config_hash(denoiser.config),
        "mode": mode,
        "num_inference_steps": num_inference_steps,
        "step_indices": keep_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "seed": seed,
        "prompts": list(prompts),
    }
    return CalibrationSet(records, info)


def _noise_calls(
    first_call: dict[str, Any], schedule: Tensor, keep_steps: list[int], generator: torch.Generator
) -> list[tuple[int, dict[str, Any]]]:
    """Copies of the first call with Gaussian latents at the kept timesteps of ``schedule``."""
    sample = first_call["sample"] if "sample" in first_call else first_call["hidden_states"]
    name = "sample" if "sample" in first_call else "hidden_states"
    # (B, C, H, W); with guidance the pipeline stacks the same latents twice, so keep that structure.
    half = sample.shape[0] // 2
    guided = sample.shape[0] % 2 == 0 and torch.equal(sample[:half], sample[half:])
    shape = (half, *sample.shape[1:]) if guided else tuple(sample.shape)
    std = sample.float().std()
    calls = []
    for step in keep_steps:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32) * std
        if guided:
            noise = torch.cat([noise, noise])
        inputs = dict(first_call)
        inputs[name] = noise.to(sample.dtype)
        inputs["timestep"] = _with_timestep(first_call["timestep"], schedule[step])
        calls.append((step, inputs))
    return calls


def _with_timestep(original: Any, value: Tensor) -> Any:
    if isinstance(original, Tensor):
        return torch.full_like(original, value.item())
    return type(original)(value.item())


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else float("nan")
    return float(timestep) if timestep is not None else float("nan")


def _detached(inputs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor):
            out[name] = value.detach().to("cpu", copy=True)
        elif isinstance(value, Mapping):
            out[name] = _detached(value)
        else:
            out[name] = value
    return out
