"""Scheduler choice that cannot break the model.

A sampler must match what the denoiser predicts. Flow-matching models (SD3, SD3.5) predict a velocity
along a straight path from data to noise; the epsilon/v-prediction samplers (ancestral Euler, DPM++
2M, ...) integrate a different ODE and give black or broken images on them. Epsilon and v-prediction
models need samplers built on their noise schedule. So each pipeline is offered only the schedulers of
its own family, each built from the pipeline's own scheduler config (which carries its noise schedule,
prediction type and flow shift), and an incompatible choice is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import diffusers

from quantdiff.errors import QuantDiffError


class SchedulerError(QuantDiffError):
    """A scheduler that does not fit the pipeline's prediction type, or unknown options."""


@dataclass(frozen=True)
class SchedulerChoice:
    """One offered sampler.

    Attributes:
        name: the id users pick (UI dropdown, ``"scheduler"`` in the HTTP API).
        title: shown in the UI.
        family: ``"flow"`` (flow matching) or ``"noise"`` (epsilon / v-prediction).
        build: makes the scheduler from the pipeline's current scheduler config.
        only_if_current: offered only when the pipeline already uses this class (e.g. LCM, which needs an
            LCM-distilled denoiser).
    """

    name: str
    title: str
    family: str
    build: Callable[[Mapping[str, Any]], Any]
    only_if_current: str | None = None


def _from(class_name: str, **overrides: Any) -> Callable[[Mapping[str, Any]], Any]:
    def build(config: Mapping[str, Any]) -> Any:
        return getattr(diffusers, class_name).from_config(config, **overrides)

    return build


CHOICES: Mapping[str, SchedulerChoice] = MappingProxyType(
    {
        choice.name: choice
        for choice in (
            SchedulerChoice("flow-euler", "Flow matching Euler", "flow", _from("FlowMatchEulerDiscreteScheduler")),
            SchedulerChoice("flow-heun", "Flow matching Heun", "flow", _from("FlowMatchHeunDiscreteScheduler")),
            SchedulerChoice("ddim", "DDIM", "noise", _from("DDIMScheduler")),
            SchedulerChoice("euler", "Euler", "noise", _from("EulerDiscreteScheduler")),
            SchedulerChoice("euler-ancestral", "Euler ancestral", "noise", _from("EulerAncestralDiscreteScheduler")),
            SchedulerChoice(
                "dpmpp-2m", "DPM++ 2M", "noise", _from("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++")
            ),
            SchedulerChoice(
                "dpmpp-2m-karras",
                "DPM++ 2M Karras",
                "noise",
                _from("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", use_karras_sigmas=True),
            ),
            SchedulerChoice("unipc", "UniPC", "noise", _from("UniPCMultistepScheduler")),
            SchedulerChoice("lcm", "LCM", "noise", _from("LCMScheduler"), only_if_current="LCMScheduler"),
        )
    }
)


DEFAULT = "default"


def scheduler_family(scheduler: Any) -> str:
    """``"flow"`` for flow-matching schedulers, ``"noise"`` for epsilon / v-prediction ones."""
    return "flow" if type(scheduler).__name__.startswith("FlowMatch") else "noise"


def compatible_schedulers(original: Any) -> list[SchedulerChoice]:
    """The choices that fit a pipeline whose own scheduler is ``original``, in menu order."""
    family = scheduler_family(original)
    current = type(original).__name__
    return [
        choice
        for choice in CHOICES.values()
        if choice.family == family and (choice.only_if_current is None or choice.only_if_current == current)
    ]


def scheduler_names(original: Any) -> list[str]:
    """Menu ids: ``"default"`` (the pipeline's own scheduler) followed by the compatible choices."""
    return [DEFAULT] + [choice.name for choice in compatible_schedulers(original)]


def make_scheduler(original: Any, name: str, **options: Any) -> Any:
    """Build scheduler ``name`` for a pipeline whose own scheduler is ``original``.

    The new scheduler inherits ``original``'s config (noise schedule, prediction type, flow shift), so
    switching back and forth never accumulates changes. Raises :class:`SchedulerError` saying why when
    ``name`` does not fit the model.

    Args:
        original: the scheduler the pipeline was loaded with.
        name: ``"default"`` (``original``'s class) or a key of :data:`CHOICES`.
        **options: config values to change, e.g. ``shift=3.0`` for flow matching.
    """
    config = dict(original.config)
    unknown = sorted(set(options) - set(config))
    if unknown:
        raise SchedulerError(f"scheduler {name!r} has no option(s) {unknown}")
    config.update(options)
    if name == DEFAULT:
        return type(original).from_config(config)
    names = ", ".join(scheduler_names(original))
    if name not in CHOICES:
        raise SchedulerError(f"unknown scheduler {name!r}: use one of {names}")
    choice = CHOICES[name]
    family = scheduler_family(original)
    if choice.family != family:
        if family == "flow":
            why = (
                f"this model is trained with flow matching ({type(original).__name__}) and predicts a velocity; "
                f"{choice.title} integrates an epsilon/v-prediction noise schedule and gives broken or black images"
            )
        else:
            why = (
                f"this model predicts noise ({config.get('prediction_type', 'epsilon')}); "
                f"{choice.title} is for flow-matching (velocity) models"
            )
        raise SchedulerError(f"scheduler {name!r} cannot be used: {why}; use one of {names}")
    if choice.only_if_current and type(original).__name__ != choice.only_if_current:
        raise SchedulerError(
            f"scheduler {name!r} needs a model distilled for it (this pipeline uses {type(original).__name__}); "
            f"use one of {names}"
        )
    return choice.build(config)
