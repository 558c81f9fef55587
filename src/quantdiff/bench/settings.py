"""What a ``quantdiff bench`` run measures: the quick and full presets, :class:`BenchSettings` and
:func:`make_settings` (validation), and method name resolution.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from quantdiff.bench.denoisers import DENOISERS
from quantdiff.bench.methods import METHODS
from quantdiff.bench.results import _plain
from quantdiff.errors import QuantDiffError

# The quick preset skips the peers whose setup takes minutes (PT2E export + calibration + compile, ONNX export
# + quantize_static, further compiles): two compiles (fp32 and quantdiff W8A8, the headline comparison) remain.
QUICK_METHODS = ("fp32", "fp32-compile", "bf16", "qd-w8a8", "qd-w8a8-compile", "qd-w8a16", "ao-dynamic", "torchao-w8")
# Everything but: the exact 4-bit presets (their MSE weight search takes tens of minutes per SD1.5 UNet; the
# default 4-bit rows use min-max ranges, same format and speed); torchao's dynamic W8A8 (eager 6x slower
# than fp32 on AVX2; compiled it lowers to the reference _int_mm kernel, 25-60x slower); quanto's
# weight-only row. Add them with --methods.
_NOT_DEFAULT = ("qd-w4a8-mse", "qd-w4a16-mse", "torchao-w8a8", "torchao-w8a8-compile", "quanto-w8")
FULL_METHODS = tuple(m for m in METHODS if m not in _NOT_DEFAULT)
QUICK_MODELS = ("sd15",)
FULL_MODELS = ("sd15", "sdxl", "sd3")
QUICK_LATENTS: Mapping[str, tuple[int, ...]] = MappingProxyType({"sd15": (32,), "sdxl": (32,), "sd3": (32,)})
FULL_LATENTS: Mapping[str, tuple[int, ...]] = MappingProxyType({"sd15": (32, 64), "sdxl": (64,), "sd3": (64,)})
TINY_LATENT = 16
DEFAULT_GROUP_SIZE = 5  # methods alive and timed together (besides fp32 eager): see BenchSettings.group_size


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how; build with :func:`make_settings` (validated, with the presets' defaults).

    Attributes:
        models: denoiser names (:data:`DENOISERS`), in run order.
        latents: model -> latent sides to measure.
        methods: method names (:data:`METHODS`); ``fp32`` is always included.
        repeats: timed rounds per group.
        warmup: untimed rounds before them (each method also ran twice when it was built).
        threads: torch (and ONNX Runtime) threads; ``None`` keeps torch's setting.
        batch: latents per call (1; 2 = classifier-free guidance).
        calibration_inputs: random calibration inputs for quantdiff and PT2E.
        seed: weights, inputs and the random round order.
        group_size: most methods alive (and timed together) besides fp32 eager; a build's eager and compiled
            rows stay in one group. ``None``: as many as the memory budget allows. Default
            :data:`DEFAULT_GROUP_SIZE`, because many live models slow the one being timed: on a 24 GB
            machine, with 12 methods (16 GB) alive a compiled W8A8 SD1.5 UNet ran 1.37x slower than with 3,
            with 7 (12 GB) 1.13x; 12 GB of idle tensors alone cost it 1.10x.
        memory_budget_bytes: RSS this process may reach; ``None``: 85% of (available + own) memory at the
            start of each case.
        freezing: compile with inductor's ``freezing`` (weights as constants, prepacked).
        slow_cutoff: a method slower than this many times fp32 eager in its first timed round is timed in
            that round only (a peer at 5x fp32 costs minutes per round at real sizes, and more rounds would
            not change its place); ``None``: every method runs every round.
        quick: the quick preset was used (reported).
    """

    models: tuple[str, ...]
    latents: Mapping[str, tuple[int, ...]]
    methods: tuple[str, ...]
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    batch: int = 1
    calibration_inputs: int = 4
    seed: int = 0
    group_size: int | None = DEFAULT_GROUP_SIZE
    memory_budget_bytes: int | None = None
    freezing: bool = True
    slow_cutoff: float | None = 3.0
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchSettings:
        """Inverse of :meth:`to_dict` (as written in a result's JSON)."""
        values = dict(data)
        values["latents"] = MappingProxyType({k: tuple(v) for k, v in values["latents"].items()})
        values["models"], values["methods"] = tuple(values["models"]), tuple(values["methods"])
        return cls(**values)


def make_settings(
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    latents: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    repeats: int | None = None,
    warmup: int = 1,
    threads: int | None = None,
    batch: int = 1,
    calibration_inputs: int = 4,
    seed: int = 0,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    memory_budget_bytes: int | None = None,
    freezing: bool = True,
    slow_cutoff: float | None = 3.0,
) -> BenchSettings:
    """Validated :class:`BenchSettings`; anything not given comes from the quick or the full preset.

    Presets: quick = ``sd15`` at 32x32, :data:`QUICK_METHODS` (no slow peers), 3 repeats; full = ``sd15``
    at 32x32 and 64x64, ``sdxl`` at 64x64 (512 px; its native 128x128 is ~4x slower per step), ``sd3`` at
    64x64, :data:`FULL_METHODS`, 5 repeats. ``methods`` entries may be names, shell patterns (``qd-*``),
    ``default`` (the preset's) or ``all``. ``latents`` is a mapping model -> sides, or sides for every
    model; with ``quick`` every real model defaults to 32x32, tiny models to 16x16. User errors raise
    :class:`QuantDiffError`.
    """
    models = tuple(models) if models else (QUICK_MODELS if quick else FULL_MODELS)
    unknown = [name for name in models if name not in DENOISERS]
    if unknown:
        raise QuantDiffError(f"unknown model(s) {', '.join(unknown)}: use {', '.join(DENOISERS)}")
    if latents is not None and not isinstance(latents, Mapping):
        latents = {"*": tuple(latents)}
    if latents is not None:
        extra = sorted(set(latents) - set(models) - {"*"})
        if extra:
            raise QuantDiffError(f"latent sizes given for {', '.join(extra)}, which is not among the models")
    chosen: dict[str, tuple[int, ...]] = {}
    for name in models:
        given = None if latents is None else (latents.get(name) or latents.get("*"))
        sides = tuple(given) if given is not None else _default_latents(name, quick)
        if not sides:
            raise QuantDiffError(f"{name}: no latent size given")
        for side in sides:
            if isinstance(side, bool) or not isinstance(side, int):
                raise QuantDiffError(f"{name}: latent size {side!r} is not an integer")
            DENOISERS[name].check_latent(side)
        chosen[name] = sides
    resolved = resolve_methods(methods, quick)
    for label, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("batch", batch, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise QuantDiffError(f"{label} must be an integer >= {low}, got {value!r}")
    if calibration_inputs < 1:
        raise QuantDiffError(f"calibration inputs must be at least 1, got {calibration_inputs}")
    if threads is not None and threads < 1:
        raise QuantDiffError(f"threads must be at least 1, got {threads}")
    if group_size is not None and group_size < 1:
        raise QuantDiffError(f"group size must be at least 1, got {group_size}")
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise QuantDiffError("the memory budget must be positive")
    if slow_cutoff is not None and not slow_cutoff > 1.0:
        raise QuantDiffError(f"the slow cutoff must be above 1 (times fp32 eager), got {slow_cutoff!r}")
    return BenchSettings(
        models=models,
        latents=MappingProxyType(chosen),
        methods=resolved,
        repeats=repeats if repeats is not None else (3 if quick else 5),
        warmup=warmup,
        threads=threads,
        batch=batch,
        calibration_inputs=calibration_inputs,
        seed=seed,
        group_size=group_size,
        memory_budget_bytes=memory_budget_bytes,
        freezing=freezing,
        slow_cutoff=slow_cutoff,
        quick=quick,
    )


def _default_latents(model: str, quick: bool) -> tuple[int, ...]:
    """The preset's latent sides for ``model`` (quick: 32x32 for the real models); tiny models: 16x16."""
    return (QUICK_LATENTS if quick else FULL_LATENTS).get(model, (TINY_LATENT,))


def resolve_methods(methods: Sequence[str] | None, quick: bool = False) -> tuple[str, ...]:
    """Method names in :data:`METHODS` order from names, patterns, ``default`` or ``all``; fp32 always first."""
    wanted: set[str] = {"fp32"}
    for entry in methods or ("default",):
        entry = entry.strip()
        if not entry:
            continue
        if entry == "default":
            wanted.update(QUICK_METHODS if quick else FULL_METHODS)
        elif entry == "all":
            wanted.update(METHODS)
        else:
            matched = [name for name in METHODS if fnmatch.fnmatchcase(name, entry)]
            if not matched:
                raise QuantDiffError(
                    f"unknown method {entry!r}: use {', '.join(METHODS)}, a pattern, 'default' or 'all'"
                )
            wanted.update(matched)
    return tuple(name for name in METHODS if name in wanted)
