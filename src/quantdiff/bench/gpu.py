"""One denoiser step on a CUDA GPU: bf16 against quantdiff W8A8 on ``torch._int_mm``, eager and compiled.

Why a separate runner: on a GPU the baseline a user deploys is bf16, not fp32, the memory that matters is
the GPU's, and time must be read with CUDA events; the CPU runner's RSS accounting and peers do not apply.
Same denoisers (published configs, random weights), inputs and calibration as ``quantdiff bench``.

Rows (``method``):

* ``bf16`` / ``bf16-compile`` / ``bf16-graphs``: the model in bf16, eager, ``torch.compile`` (inductor,
  default mode), and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
* ``qd-w8a8`` / ``qd-w8a8-compile`` / ``qd-w8a8-graphs``: preset ``w8a8`` calibrated on the GPU in fp32,
  then cast to bf16 and switched to integer mode: Linear and 1x1 Conv2d on the int8 GEMM
  (:mod:`quantdiff.nn.int_mm`); 3x3 convolutions keep the reference path (bf16 convolution of the
  dequantized weight), which ``path_detail`` counts.

Each round calls every method once in a fresh random order (``warmup`` untimed rounds first); ``median_s``
is the median of its rounds, timed with CUDA events around the call. ``speedup_vs_bf16`` divides bf16
eager's median by the method's; ``speedup_vs_best_bf16`` divides the fastest bf16 row's. ``sqnr_db`` is
against the fp32 model's output on the evaluation input. ``weight_bytes``: the tensors the model holds on
the GPU (the int8 GEMM weights included); ``peak_bytes``: ``torch.cuda.max_memory_allocated`` over one step.

On a machine without CUDA the same code runs on the CPU (``device="cpu"``, tiny models, no compile): that
is how the tests check it; its timings mean nothing there.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantdiff.bench.denoisers import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    bench_calibration,
    build_denoiser,
    denoiser_inputs,
)
from quantdiff.calibration.dataset import denoiser_output
from quantdiff.errors import QuantDiffError
from quantdiff.primitives import sqnr_db

# method -> (build, how it is called): eager, torch.compile (default mode), torch.compile with CUDA graphs
_METHODS = {
    "bf16": ("bf16", "eager"),
    "bf16-compile": ("bf16", "compile"),
    "bf16-graphs": ("bf16", "graphs"),
    "qd-w8a8": ("qd-w8a8", "eager"),
    "qd-w8a8-compile": ("qd-w8a8", "compile"),
    "qd-w8a8-graphs": ("qd-w8a8", "graphs"),
}
GPU_METHODS = tuple(_METHODS)
GPU_LATENTS = {"sdxl": (128,), "sd3": (128,)}  # 1024 px, both models' native size
FORMAT_NAME = "quantdiff-bench-gpu"


@dataclass(frozen=True)
class GpuBenchSettings:
    """What :func:`run_gpu_benchmark` measures (validated; ``to_dict`` goes into the JSON)."""

    models: tuple[str, ...] = ("sdxl", "sd3")
    latents: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(GPU_LATENTS))
    methods: tuple[str, ...] = GPU_METHODS
    repeats: int = 10
    warmup: int = 2
    batch: int = 1
    calibration_inputs: int = 4
    seed: int = 0
    device: str = "cuda"

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in DENOISERS]
        if unknown:
            raise QuantDiffError(f"unknown model(s) {', '.join(unknown)}: use {', '.join(DENOISERS)}")
        bad = [m for m in self.methods if m not in GPU_METHODS]
        if bad:
            raise QuantDiffError(f"unknown GPU method(s) {', '.join(bad)}: use {', '.join(GPU_METHODS)}")
        if self.repeats < 1 or self.warmup < 0 or self.batch < 1 or self.calibration_inputs < 1:
            raise QuantDiffError("repeats, batch and calibration inputs must be at least 1, warmup at least 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise QuantDiffError("no CUDA GPU is visible to torch: the GPU benchmark needs one (CUDA_VISIBLE_DEVICES?)")
        for model in self.models:
            for side in self.latents.get(model, ()):
                DENOISERS[model].check_latent(side)

    def latents_of(self, model: str) -> tuple[int, ...]:
        return tuple(self.latents.get(model, (16,) if model.startswith("tiny") else (128,)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latents"] = {m: list(self.latents_of(m)) for m in self.models}
        return data


def _to(value: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device, dtype) for key, item in value.items()}
    return value


def _model_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model holds, each once, the integer kernels' own weight copies included."""
    from quantdiff.nn import QuantizedLayer

    seen, total = set(), 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total + sum(m.kernel_bytes for m in model.modules() if isinstance(m, QuantizedLayer))


class _Timer:
    """CUDA events around a call on a GPU, the wall clock elsewhere."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, call: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _peak_step(call: Callable[[], Tensor], device: str) -> tuple[Tensor, int | None]:
    if not device.startswith("cuda"):
        return call(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    output = call()
    torch.cuda.synchronize()
    return output, torch.cuda.max_memory_allocated()


def run_gpu_benchmark(
    settings: GpuBenchSettings, log: Callable[[str], None] = print, on_case: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Measure every (model, latent, method) of ``settings``; returns ``{"settings", "machine", "rows"}``.

    ``on_case`` gets the result so far after each (model, latent), so a run cut short keeps its cases.
    """
    s, started = settings, time.perf_counter()
    result = {"format": FORMAT_NAME, "version": 1, "settings": s.to_dict(), "machine": _machine(s.device), "rows": []}

    def stamp(line: str) -> None:
        log(f"[{time.perf_counter() - started:7.1f}s] {line}")

    for model_name in s.models:
        spec = DENOISERS[model_name]
        fp32 = build_denoiser(spec, s.seed).to(s.device)
        stamp(f"{spec.title}: built on {s.device}")
        for latent in s.latents_of(model_name):
            result["rows"] += _measure_case(spec, fp32, latent, s, stamp)
            torch._dynamo.reset()
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if on_case is not None:
                on_case(result)
        del fp32
    return result


def _build(build: str, spec, fp32: nn.Module, latent: int, s: GpuBenchSettings) -> tuple[nn.Module, dict[str, Any]]:
    """One method's bf16 model and what its rows say about it (setup time, path)."""
    from quantdiff.nn import use_integer_kernels
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import PRESETS

    if build == "bf16":
        return copy.deepcopy(fp32).to(torch.bfloat16), {"setup_s": 0.0, "path": "bf16"}
    begin = time.perf_counter()
    quantized = copy.deepcopy(fp32)
    calibration = bench_calibration(spec, fp32, latent, s.batch, s.calibration_inputs, s.seed)
    quantize_denoiser(quantized, PRESETS["w8a8"], calibration, progress=False)  # observed in fp32
    quantized = quantized.to(torch.bfloat16)
    summary = use_integer_kernels(quantized, backend="int_mm", attention="float32")
    _Timer(s.device).synchronize()
    reasons: dict[str, int] = {}
    for layer in summary.layers:
        reasons[layer.reason] = reasons.get(layer.reason, 0) + 1
    detail = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return quantized, {"setup_s": time.perf_counter() - begin, "path": "int8 GEMM", "path_detail": detail}


def _measure_case(spec, fp32: nn.Module, latent: int, s: GpuBenchSettings, stamp) -> list[dict[str, Any]]:
    """Build, first-call and time every method at one latent size, interleaved; returns their rows."""
    raw = denoiser_inputs(spec, latent, s.batch, EVAL_TIMESTEP, s.seed + EVAL_SEED_OFFSET)
    fp32_inputs = _to(raw, s.device, torch.float32)
    inputs = _to(fp32_inputs, s.device, torch.bfloat16)
    with torch.no_grad():
        reference = denoiser_output(fp32(**fp32_inputs)).float()
    builds = {build: _build(build, spec, fp32, latent, s) for build in dict.fromkeys(_METHODS[m][0] for m in s.methods)}
    members: dict[str, Callable[[], Tensor]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for method in s.methods:
        build, mode = _METHODS[method]
        module, info = builds[build]
        row = rows[method] = {
            "model": spec.name,
            "latent": latent,
            "method": method,
            "status": "ok",
            "reason": "",
            "compiled": mode != "eager",
            "weight_bytes": _model_bytes(module),
            **info,
        }
        if mode != "eager":
            module = torch.compile(module, mode="reduce-overhead" if mode == "graphs" else None, dynamic=False)

        def call(module=module) -> Tensor:
            with torch.no_grad():
                return denoiser_output(module(**inputs))

        try:
            begin = time.perf_counter()
            call()
            _Timer(s.device).synchronize()
            row["first_call_s"] = time.perf_counter() - begin
            output, row["peak_bytes"] = _peak_step(call, s.device)
            quality = sqnr_db(reference, output.float())
            row["sqnr_db"] = quality if math.isfinite(quality) else None  # JSON has no infinity
            members[method] = call
            stamp(f"  {method}: first call {row['first_call_s']:.1f} s, SQNR {quality:.1f} dB")
        except Exception as error:  # a failed compile is a row, not the end of the run
            row.update(status="failed", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            stamp(f"  {method}: failed: {row['reason']}")
    times = _interleaved(members, _Timer(s.device), s, latent)
    medians = {name: statistics.median(values) for name, values in times.items()}
    bf16_eager = medians.get("bf16")
    best_bf16 = min((median for name, median in medians.items() if name.startswith("bf16")), default=None)
    for method, median in medians.items():
        rows[method].update(
            median_s=median,
            times_s=times[method],
            speedup_vs_bf16=None if bf16_eager is None else bf16_eager / median,
            speedup_vs_best_bf16=None if best_bf16 is None else best_bf16 / median,
        )
    stamp(f"  {spec.name} {latent}x{latent}: timed {len(members)} methods x {s.repeats} rounds")
    return list(rows.values())


def _interleaved(members: dict[str, Callable[[], Tensor]], timer: _Timer, s: GpuBenchSettings, latent: int):
    order = list(members)
    rng = random.Random(s.seed * 1_000_003 + latent)
    times: dict[str, list[float]] = {name: [] for name in members}
    for round_index in range(s.warmup + s.repeats):
        rng.shuffle(order)
        for name in order:
            elapsed = timer(members[name])
            if round_index >= s.warmup:
                times[name].append(elapsed)
    return times


def _machine(device: str) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory, cuda=torch.version.cuda)
    return info


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def render_gpu_markdown(result: dict[str, Any]) -> str:
    """The result as ``RESULTS-gpu.md``: machine, settings, one table per (model, latent)."""
    machine, s = result["machine"], result["settings"]
    lines = [
        "# quantdiff GPU bench results",
        "",
        f"- device: {machine.get('gpu', machine['device'])}"
        + (f" ({machine['gpu_memory_bytes'] / 2**30:.0f} GiB), CUDA {machine.get('cuda')}" if "gpu" in machine else "")
        + f"; torch {machine['torch']}; {machine['cpus']} CPUs",
        f"- batch {s['batch']}; {s['warmup']} warm-up + {s['repeats']} timed rounds, every method once per round in "
        "a fresh random order; median; CUDA events around each call",
        f"- W8A8: preset w8a8 calibrated on {s['calibration_inputs']} random inputs (as `quantdiff bench`), bf16 "
        "elsewhere; SQNR vs the fp32 model on the evaluation input",
    ]
    keys = list(dict.fromkeys((r["model"], r["latent"]) for r in result["rows"]))
    for model, latent in keys:
        lines += ["", f"## {DENOISERS[model].title}, latent {latent}x{latent}", ""]
        lines += [
            "| method | status | s / step (median) | vs bf16 eager | vs best bf16 | weights MiB | peak MiB | SQNR dB | first call s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        notes = []
        for r in (r for r in result["rows"] if (r["model"], r["latent"]) == (model, latent)):
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['status']} | | | | | | | |")
                notes.append(f"- {r['method']}: {r['reason']}")
                continue
            cells = [
                r["method"],
                "ok",
                f"{r['median_s']:.4f}",
                _ratio(r.get("speedup_vs_bf16")),
                _ratio(r.get("speedup_vs_best_bf16")),
                _mib(r["weight_bytes"]),
                _mib(r.get("peak_bytes")),
                "" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}",
                f"{r['first_call_s']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
            if r.get("path_detail") and r["method"] == "qd-w8a8":
                notes.append(f"- qd-w8a8: {r['path_detail']}")
        lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def write_gpu_results(
    result: dict[str, Any], markdown: str | os.PathLike | None, json_path: str | os.PathLike | None
) -> None:
    """Write the markdown report and / or the JSON rows (parents created)."""
    if markdown is not None:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(render_gpu_markdown(result))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, allow_nan=False))


def parse_methods(text: str | None) -> Sequence[str]:
    return GPU_METHODS if not text else tuple(m.strip() for m in text.split(",") if m.strip())
