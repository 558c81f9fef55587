"""What a ``quantdiff bench`` run measures: the presets (the CPU's quick and full, the GPU's), :class:`BenchSettings`
and :func:`make_settings` (validation), and method name resolution.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

import torch

from quantdiff.bench.denoisers import DENOISERS
from quantdiff.bench.methods import BASELINES, METHODS
from quantdiff.errors import QuantDiffError

# The quick preset skips the peers whose setup takes minutes (PT2E export + calibration + compile, ONNX export
# + quantize_static, further compiles): two compiles (fp32 and quantdiff W8A8, the headline comparison) remain.
QUICK_METHODS = ("fp32", "fp32-compile", "bf16", "qd-w8a8", "qd-w8a8-compile", "qd-w8a16", "ao-dynamic", "torchao-w8")
# Everything but: the exact 4-bit presets (their MSE weight search takes tens of minutes per SD1.5 UNet; the
# default 4-bit rows use min-max ranges, same format and speed); torchao's dynamic W8A8 (eager 6x slower
# than fp32 on AVX2; compiled it lowers to the reference _int_mm kernel, 25-60x slower); quanto's
# weight-only row. Add them with --methods.
_NOT_DEFAULT = ("qd-w4a8-mse", "qd-w4a16-mse", "torchao-w8a8", "torchao-w8a8-compile", "quanto-w8")
FULL_METHODS = tuple(name for name, m in METHODS.items() if "fp32" in m.baselines and name not in _NOT_DEFAULT)
QUICK_MODELS = ("sd15",)
FULL_MODELS = ("sd15", "sdxl", "sd3")
QUICK_LATENTS: Mapping[str, tuple[int, ...]] = MappingProxyType({"sd15": (32,), "sdxl": (32,), "sd3": (32,)})
FULL_LATENTS: Mapping[str, tuple[int, ...]] = MappingProxyType({"sd15": (32, 64), "sdxl": (64,), "sd3": (64,)})
# The GPU preset (bf16 baseline): every method of its suite, SDXL and SD3 at their native 128x128 (1024 px).
GPU_METHODS = tuple(name for name, m in METHODS.items() if "bf16" in m.baselines)
GPU_MODELS = ("sdxl", "sd3")
GPU_LATENT = 128
TINY_LATENT = 16
DEFAULT_GROUP_SIZE = 5  # methods alive and timed together (besides the baseline): see BenchSettings.group_size


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how; build with :func:`make_settings` (validated, with the presets' defaults).

    Attributes:
        models: denoiser names (:data:`DENOISERS`), in run order.
        latents: model -> latent sides to measure.
        methods: method names (:data:`METHODS`); the baseline's eager method is always included.
        repeats: timed rounds per group.
        warmup: untimed rounds before them (each method also ran twice when it was built).
        threads: torch (and ONNX Runtime, OpenVINO) threads; ``None`` keeps torch's setting.
        batch: latents per call (1; 2 = classifier-free guidance).
        calibration_inputs: random calibration inputs for quantdiff and PT2E.
        seed: weights, inputs and the random round order.
        group_size: most methods alive (and timed together) besides the baseline; a build's eager and compiled
            rows stay in one group. ``None``: as many as the memory budget allows. CPU default
            :data:`DEFAULT_GROUP_SIZE`, because many live models slow the one being timed: on a 24 GB
            machine, with 12 methods (16 GB) alive a compiled W8A8 SD1.5 UNet ran 1.37x slower than with 3,
            with 7 (12 GB) 1.13x; 12 GB of idle tensors alone cost it 1.10x.
        memory_budget_bytes: RSS this process may reach; ``None``: 85% of (available + own) memory at the
            start of each case. Not applied on CUDA, where the models live in device memory.
        freezing: compile with inductor's ``freezing`` (weights as constants, prepacked).
        slow_cutoff: a method slower than this many times the baseline in its first timed round is timed in
            that round only (a peer at 5x fp32 costs minutes per round at real sizes, and more rounds would
            not change its place); ``None``: every method runs every round.
        quick: the quick preset was used (reported).
        device: ``cpu`` or a CUDA device (``cuda``, ``cuda:1``): where the models run.
        baseline: ``fp32`` (the CPU suite) or ``bf16`` (the GPU suite; on the CPU it checks that suite's code).
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
    device: str = "cpu"
    baseline: str = "fp32"

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        latents = {model: list(sides) for model, sides in self.latents.items()}
        data.update(models=list(self.models), methods=list(self.methods), latents=latents)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchSettings:
        """Inverse of :meth:`to_dict` (as written in a result's JSON; older results lack device and baseline)."""
        values = dict(data)
        values["latents"] = MappingProxyType({k: tuple(v) for k, v in values["latents"].items()})
        values["models"], values["methods"] = tuple(values["models"]), tuple(values["methods"])
        return cls(**values)

    def matches_preset(self) -> bool:
        """Whether the models, latent sizes and methods are those of the preset these settings started from."""
        preset = make_settings(quick=self.quick, baseline=self.baseline)
        return (self.models, dict(self.latents), self.methods) == (preset.models, dict(preset.latents), preset.methods)


def make_settings(
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    latents: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    batch: int = 1,
    calibration_inputs: int = 4,
    seed: int = 0,
    group_size: int | None = None,
    memory_budget_bytes: int | None = None,
    freezing: bool | None = None,
    slow_cutoff: float | None = 3.0,
    device: str = "cpu",
    baseline: str | None = None,
) -> BenchSettings:
    """Validated :class:`BenchSettings`; anything not given (``None``) comes from the preset.

    Presets: on the CPU (baseline ``fp32``), quick = ``sd15`` at 32x32, :data:`QUICK_METHODS` (no slow
    peers), 3 repeats; full = ``sd15`` at 32x32 and 64x64, ``sdxl`` at 64x64 (512 px; its native 128x128 is
    ~4x slower per step), ``sd3`` at 64x64, :data:`FULL_METHODS`, 5 repeats; both 1 warm-up round, groups of
    :data:`DEFAULT_GROUP_SIZE`, freezing. On CUDA (baseline ``bf16``, no quick preset): ``sdxl`` and ``sd3``
    at 128x128, :data:`GPU_METHODS`, 10 repeats, 2 warm-up rounds, one group, no freezing.

    ``methods`` entries may be names, shell patterns (``qd-*``), ``default`` (the preset's) or ``all``.
    ``latents`` is a mapping model -> sides, or sides for every model; tiny models default to 16x16.
    ``group_size`` 0: as many methods as the memory budget allows. ``baseline`` ``bf16`` with ``device``
    ``cpu`` runs the GPU suite's code on the CPU (tests). User errors raise :class:`QuantDiffError`.
    """
    try:
        on_cuda = torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):  # not a device torch knows
        on_cuda = None
    if on_cuda is None or (not on_cuda and device != "cpu"):
        raise QuantDiffError(f"device {device!r}: use cpu, cuda or cuda:N")
    if on_cuda and not torch.cuda.is_available():
        raise QuantDiffError("no CUDA GPU is visible to torch: the GPU benchmark needs one (CUDA_VISIBLE_DEVICES?)")
    baseline = baseline or ("bf16" if on_cuda else "fp32")
    if baseline not in BASELINES:
        raise QuantDiffError(f"baseline {baseline!r}: use {' or '.join(BASELINES)}")
    gpu = baseline == "bf16"
    if on_cuda and not gpu:
        raise QuantDiffError(
            "the fp32 suite (its int8 peers) runs on the CPU: use device cpu, or baseline bf16 on CUDA"
        )
    if gpu and quick:
        raise QuantDiffError("--quick is the CPU's preset: on a GPU choose --models and --latent")
    models = tuple(models) if models else (GPU_MODELS if gpu else QUICK_MODELS if quick else FULL_MODELS)
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
        sides = tuple(given) if given is not None else _default_latents(name, quick, gpu)
        if not sides:
            raise QuantDiffError(f"{name}: no latent size given")
        for side in sides:
            if isinstance(side, bool) or not isinstance(side, int):
                raise QuantDiffError(f"{name}: latent size {side!r} is not an integer")
            DENOISERS[name].check_latent(side)
        chosen[name] = sides
    resolved = resolve_methods(methods, quick, baseline)
    for label, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("batch", batch, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise QuantDiffError(f"{label} must be an integer >= {low}, got {value!r}")
    if calibration_inputs < 1:
        raise QuantDiffError(f"calibration inputs must be at least 1, got {calibration_inputs}")
    if threads is not None and threads < 1:
        raise QuantDiffError(f"threads must be at least 1, got {threads}")
    if group_size is not None and group_size < 0:
        raise QuantDiffError(f"group size must be at least 1 (0: no limit), got {group_size}")
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise QuantDiffError("the memory budget must be positive")
    if slow_cutoff is not None and not slow_cutoff > 1.0:
        raise QuantDiffError(f"the slow cutoff must be above 1 (times the baseline), got {slow_cutoff!r}")
    if group_size is None:
        group_size = None if gpu else DEFAULT_GROUP_SIZE
    return BenchSettings(
        models=models,
        latents=MappingProxyType(chosen),
        methods=resolved,
        repeats=repeats if repeats is not None else (10 if gpu else 3 if quick else 5),
        warmup=warmup if warmup is not None else (2 if gpu else 1),
        threads=threads,
        batch=batch,
        calibration_inputs=calibration_inputs,
        seed=seed,
        group_size=group_size or None,
        memory_budget_bytes=memory_budget_bytes,
        freezing=freezing if freezing is not None else not gpu,
        slow_cutoff=slow_cutoff,
        quick=quick,
        device=device,
        baseline=baseline,
    )


def _default_latents(model: str, quick: bool, gpu: bool) -> tuple[int, ...]:
    """The preset's latent sides for ``model`` (tiny models: 16x16)."""
    if model.startswith("tiny"):
        return (TINY_LATENT,)
    return (GPU_LATENT,) if gpu else (QUICK_LATENTS if quick else FULL_LATENTS)[model]


def resolve_methods(methods: Sequence[str] | None, quick: bool = False, baseline: str = "fp32") -> tuple[str, ...]:
    """Method names of the ``baseline``'s suite in :data:`METHODS` order, from names, patterns, ``default`` or
    ``all``; the baseline itself always first."""
    suite = [name for name, method in METHODS.items() if baseline in method.baselines]
    preset = GPU_METHODS if baseline == "bf16" else QUICK_METHODS if quick else FULL_METHODS
    wanted: set[str] = {baseline}
    for entry in methods or ("default",):
        entry = entry.strip()
        if not entry:
            continue
        if entry in ("default", "all"):
            wanted.update(preset if entry == "default" else suite)
            continue
        matched = [name for name in suite if fnmatch.fnmatchcase(name, entry)]
        if not matched:
            which = "GPU method" if baseline == "bf16" else "method"
            raise QuantDiffError(f"unknown {which} {entry!r}: use {', '.join(suite)}, a pattern, 'default' or 'all'")
        wanted.update(matched)
    return tuple(name for name in suite if name in wanted)
