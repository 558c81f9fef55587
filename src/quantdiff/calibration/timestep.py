"""The current denoising step, published by a forward pre-hook on the denoiser.

Per-timestep quantization parameters (a table of input scales per group of timesteps) need to know, inside
a layer, which step the denoiser is computing. The denoiser's own ``timestep`` argument says it: a
:class:`StepClock` reads it in a forward pre-hook (``with_kwargs``, bound by name, so it works for the UNet's
``forward(sample, timestep, ...)`` and the DiTs' ``forward(hidden_states, ..., timestep=...)``), and every
quantized layer that needs it holds the same clock. No pipeline or scheduler code is involved, so any
scheduler and step count work: the layer maps the timestep value to its group.

At inference the clock lives as long as the model: :func:`attach_step_clock` installs it (``convert`` and
the loader do, for plans whose layers need it) and :func:`detach_step_clock` removes it. For calibration,
:func:`step_clock` is a context manager that removes its hook on exit.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

CLOCK_ATTRIBUTE = "quantdiff_step_clock"


class StepClock:
    """The timestep of the denoiser call in progress (``None`` before the first call).

    Attributes:
        timestep: the call's timestep value (the first element of a batched timestep tensor).
        calls: denoiser calls seen so far.
    """

    def __init__(self, denoiser: nn.Module):
        self.timestep: float | None = None
        self.calls = 0
        self._signature = inspect.signature(denoiser.forward)
        self._handle = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        timestep = bound.get("timestep", bound.get("kwargs", {}).get("timestep"))
        if isinstance(timestep, Tensor):
            timestep = float(timestep.flatten()[0]) if timestep.numel() else None
        self.timestep = None if timestep is None else float(timestep)
        self.calls += 1

    def install(self, denoiser: nn.Module) -> None:
        self._handle = denoiser.register_forward_pre_hook(self, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _layers_needing_a_clock(denoiser: nn.Module) -> list[nn.Module]:
    from quantdiff.nn.quantized import QuantizedLayer

    return [m for m in denoiser.modules() if isinstance(m, QuantizedLayer) and m.layer_plan.needs_timestep]


def attach_step_clock(denoiser: nn.Module, *, layers: list[nn.Module] | None = None) -> StepClock:
    """Install (once) the denoiser's clock and hand it to its quantized layers that read the timestep
    (or to ``layers``). Returns the clock."""
    clock = getattr(denoiser, CLOCK_ATTRIBUTE, None)
    if clock is None:
        clock = StepClock(denoiser)
        clock.install(denoiser)
        setattr(denoiser, CLOCK_ATTRIBUTE, clock)
    for layer in _layers_needing_a_clock(denoiser) if layers is None else layers:
        layer.step_clock = clock
    return clock


def detach_step_clock(denoiser: nn.Module) -> None:
    """Remove the denoiser's clock (its hook) and take it from every layer that holds it."""
    clock = getattr(denoiser, CLOCK_ATTRIBUTE, None)
    if clock is None:
        return
    clock.remove()
    delattr(denoiser, CLOCK_ATTRIBUTE)
    for module in denoiser.modules():
        if getattr(module, "step_clock", None) is clock:
            module.step_clock = None


@contextmanager
def step_clock(denoiser: nn.Module) -> Iterator[StepClock]:
    """A clock for the duration of a block (calibration replay): its hook is removed on exit, and a clock the
    model already had is used as it is."""
    existing = getattr(denoiser, CLOCK_ATTRIBUTE, None)
    if existing is not None:
        yield existing
        return
    clock = StepClock(denoiser)
    clock.install(denoiser)
    try:
        yield clock
    finally:
        clock.remove()
