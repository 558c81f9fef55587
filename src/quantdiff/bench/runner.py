"""The ``quantdiff bench`` runner, for the CPU and for CUDA: one (model, latent) case at a time, methods built into
groups that are timed in interleaved rounds against the baseline (the procedure is described in the
``quantdiff.bench`` package docstring).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil
import torch
from torch import Tensor, nn

from quantdiff.bench.builds import BuildContext, Built, MethodUnavailable, call_denoiser, one_line
from quantdiff.bench.compiling import (
    compile_settings,
    compiled_graph_count,
    free_compiled,
    private_inductor_cache,
    record_inductor_changes,
)
from quantdiff.bench.denoisers import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    DenoiserSpec,
    bench_calibration,
    build_denoiser,
    cast_inputs,
    denoiser_inputs,
    parameter_count,
)
from quantdiff.bench.memory import PeakWatch, exit_diagnosis, settled_rss, weight_bytes
from quantdiff.bench.methods import BUILD_ORDER, BUILDERS, METHODS, ORT_CHILD_FACTOR, import_optional, memory_estimate
from quantdiff.bench.ort import quantize_in_child
from quantdiff.bench.results import BenchResult, BenchRow, MachineInfo, machine_info
from quantdiff.bench.settings import TINY_LATENT, BenchSettings
from quantdiff.errors import QuantDiffError
from quantdiff.primitives import sqnr_db

# A pause before each timed call on the CPU: ONNX Runtime's worker threads spin for a while after a run and would
# take the cores from whichever method is called next. Not on a GPU, whose clocks would drop while it waits.
_PAUSE_S = 0.05
_NOT_TIMED = "not timed"  # reason of a row that was built but never timed


class _Device:
    """What differs between the CPU and a CUDA device: how a call is timed and the device memory it peaks at."""

    def __init__(self, name: str):
        self.name = name
        self.cuda = torch.device(name).type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.name)

    def wall(self, call: Callable[[], Any]) -> tuple[Any, float]:
        """(output, seconds) of one call on the wall clock, with its GPU work finished."""
        start = time.perf_counter()
        output = call()
        self.synchronize()
        return output, time.perf_counter() - start

    def timed(self, call: Callable[[], Any]) -> float:
        """Seconds of one timed call: CUDA events around it on a GPU (no host overhead after the launch), the
        wall clock elsewhere."""
        if not self.cuda:
            return self.wall(call)[1]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        torch.cuda.synchronize(self.name)
        return begin.elapsed_time(end) / 1e3

    def peak(self, call: Callable[[], Tensor]) -> tuple[Tensor, int | None]:
        """(output, ``torch.cuda.max_memory_allocated`` over the call); ``None`` on the CPU, which has no such
        counter (its peak is read as RSS around the call)."""
        if not self.cuda:
            return call(), None
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.name)
        output = call()
        self.synchronize()
        return output, torch.cuda.max_memory_allocated(self.name)


@dataclass
class _Member:
    """A live row of the current group: how to call it and what its row says so far."""

    name: str
    call: Callable[[], Tensor]
    row: dict[str, Any]
    times: list[float] = field(default_factory=list)
    recompiled: int = 0  # timed rounds in which dynamo compiled something
    retired: bool = False  # slower than the slow cutoff in its first timed round: not called again


def _new_row(spec: DenoiserSpec, latent: int, settings: BenchSettings, name: str) -> dict[str, Any]:
    """What a row of ``name`` says before anything is measured."""
    method = METHODS[name]
    return {
        "model": spec.name,
        "latent": latent,
        "latent_shape": (settings.batch, int(spec.config["in_channels"]), latent, latent),
        "batch": settings.batch,
        "method": name,
        "label": method.label,
        "kind": method.kind,
        "compiled": method.compiled,
        "status": "ok",
        "notes": [],
    }


class _CaseRunner:
    """Measures one (model, latent) case; see the package docstring for the procedure."""

    def __init__(
        self,
        spec: DenoiserSpec,
        latent: int,
        settings: BenchSettings,
        available: Mapping[str, tuple[bool, str]],
        log: Callable[[str], None],
        clock: Callable[[], float],
        process_base: int,
        checkpoint: Callable[[list[BenchRow]], None] | None = None,
    ):
        self.spec, self.latent, self.settings = spec, latent, settings
        self.baseline, self.device = settings.baseline, _Device(settings.device)
        self.available = available  # build -> (its packages import, why not)
        self.log, self.clock = log, clock
        self.process_base = process_base  # RSS of the process before its first case: the base of every peak figure
        self.checkpoint = checkpoint  # receives the rows so far after each timed group
        self.rows: dict[str, dict[str, Any]] = {}
        self.group: list[_Member] = []
        self.group_index = 0
        self.builds: list[Built] = []  # alive in the current group
        self.anchor: _Member | None = None  # the baseline's eager row, timed in every round of every group
        self.baseline_built: Built | None = None  # its model, alive for the whole case
        self.anchor_times: dict[int, list[float]] = {}
        self.notes: list[str] = []
        self.ort_setup_s = 0.0

    # -- rows
    def _row(self, name: str, **values) -> dict[str, Any]:
        row = self.rows.setdefault(name, _new_row(self.spec, self.latent, self.settings, name))
        row.update(values)
        return row

    def _fail(self, names: Sequence[str], status: str, reason: str) -> None:
        for name in names:
            self._row(name, status=status, reason=reason)
        self.log(f"  {', '.join(names)}: {status}: {reason}")

    def _names(self, build: str) -> list[str]:
        return [m for m in self.settings.methods if METHODS[m].build == build]

    # -- the case
    def run(self) -> tuple[list[BenchRow], dict[str, Any]]:
        with private_inductor_cache():
            return self._measure()

    def _measure(self) -> tuple[list[BenchRow], dict[str, Any]]:
        s, spec, device = self.settings, self.spec, self.device
        # The contenders first, so that they share the first timing group (see BUILD_ORDER).
        builds = sorted(dict.fromkeys(METHODS[m].build for m in s.methods), key=BUILD_ORDER.index)
        self.base_rss = settled_rss()
        # On CUDA the models live in device memory: the budget, on host RSS, does not apply there.
        free = psutil.virtual_memory().available + self.base_rss
        budget = None if device.cuda else (s.memory_budget_bytes or int(0.85 * free))
        case: dict[str, Any] = {
            "model": spec.name,
            "latent": self.latent,
            "budget_bytes": budget,
            "pid": os.getpid(),  # several cases: each in its own process
        }
        threads = torch.get_num_threads()
        self.workdir = tempfile.TemporaryDirectory(prefix="quantdiff-bench-")
        try:
            # ONNX Runtime first: its child peaks at several times the model, so it runs before anything is held.
            ort_model = self._prepare_ort(threads) if "ort" in builds else None
            with PeakWatch() as watch:
                start = time.perf_counter()
                reference = build_denoiser(spec, s.seed).to(s.device)
                build_s = time.perf_counter() - start
                raw = denoiser_inputs(spec, self.latent, s.batch, EVAL_TIMESTEP, s.seed + EVAL_SEED_OFFSET)
                fp32_inputs = cast_inputs(raw, s.device)
                y_ref, first_s = device.wall(lambda: call_denoiser(reference, fp32_inputs))
            self.fp32_bytes = weight_bytes(reference)
            self.fp32_held = settled_rss() - self.base_rss
            params = sum(p.numel() for p in reference.parameters())
            linear = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.Linear))
            self.linear_share = linear / max(1, params)
            self.reference, self.y_ref = reference, y_ref
            self.inputs = fp32_inputs if self.baseline == "fp32" else cast_inputs(fp32_inputs, dtype=torch.bfloat16)
            self.log(
                f"[{self.clock():7.1f}s] {spec.name} {self.latent}x{self.latent}: fp32 built ({params / 1e6:.0f}M "
                f"parameters, {self.fp32_bytes / 2**20:.0f} MiB) in {build_s:.1f} s, one step {first_s:.2f} s"
            )
            calibration = bench_calibration(spec, reference, self.latent, s.batch, s.calibration_inputs, s.seed)
            ctx = BuildContext(spec, reference, self.inputs, calibration, threads, self.baseline, ort_model)
            if self.baseline == "fp32":
                self._start_fp32(watch.extra, build_s, first_s)
            else:  # built like any method; its eager row becomes the anchor (_add_eager)
                self.baseline_built = self._build(self.baseline, ctx, self._names(self.baseline))
                if self.baseline_built is not None:
                    self._add_eager(self.baseline, self.baseline_built)
            for build in builds:
                self._add_build(build, ctx, budget)
            if self.group or self.group_index == 0:
                self._flush()
            y_again = call_denoiser(reference, fp32_inputs)
            if not torch.equal(y_again, y_ref):
                self.notes.append(
                    f"fp32 eager output changed during the run ({sqnr_db(y_ref, y_again):.1f} dB vs its first call): "
                    "a method modified shared weights, or the kernels are not deterministic"
                )
            case.update(
                fp32_weight_bytes=self.fp32_bytes,
                parameters=params,
                linear_share=self.linear_share,
                base_rss_bytes=self.process_base,
                case_start_rss_bytes=self.base_rss,
                groups=self.group_index,
                calibration=len(calibration),
                notes=self.notes,
            )
        finally:
            self.group, self.builds = [], []
            self.reference = self.inputs = self.anchor = self.baseline_built = None
            free_compiled()
            self.workdir.cleanup()
            settled_rss()
        return self._finish(), case

    def _start_fp32(self, build_peak_extra: int, build_s: float, first_s: float) -> None:
        """The fp32 baseline: the reference itself, which needs no build; its eager row is the anchor."""
        reference, inputs = self.reference, self.inputs
        with PeakWatch() as step:
            call_denoiser(reference, inputs)
        row = self._row(
            "fp32",
            weight_bytes=self.fp32_bytes,
            weight_ratio_vs_fp32=1.0,
            held_bytes=self.fp32_held,
            peak_rss_bytes=self.process_base + self.fp32_held + step.extra,
            setup_peak_rss_bytes=self.process_base + build_peak_extra,
            step_peak_extra_bytes=step.extra,
            setup_s=build_s,
            first_call_s=first_s,
            one_time_s=build_s + first_s,
            sqnr_db=math.inf,
            identical_to_fp32=True,
            path="fp32",
            path_detail="eager fp32 (ATen / oneDNN fp32 kernels)",
        )
        self.baseline_built = Built(call=None, module=reference, path="fp32", weight_bytes=self.fp32_bytes)
        self.anchor = _Member("fp32", lambda: call_denoiser(reference, inputs), row)

    def _prepare_ort(self, threads: int) -> Path | None:
        """Export and quantize the model for ONNX Runtime in a child process; its file, or None (rows say why)."""
        names = self._names("ort")
        ok, reason = self.available["ort"]
        if not ok:
            self._fail(names, "not installed" if "not installed" in reason else "failed", reason)
            return None
        need = ORT_CHILD_FACTOR * 4 * parameter_count(self.spec)
        available = psutil.virtual_memory().available
        if need > available:
            self._fail(
                names,
                "skipped",
                f"ONNX export + quantize_static need about {need / 2**30:.0f} GiB ({ORT_CHILD_FACTOR:.0f}x the fp32 "
                f"weights); {available / 2**30:.0f} GiB available",
            )
            return None
        self.log(f"[{self.clock():7.1f}s]   ort-qdq: exporting and quantizing in a child process")
        s = self.settings
        result = quantize_in_child(
            self.spec, self.latent, s.batch, s.seed, s.calibration_inputs, threads, Path(self.workdir.name)
        )
        for name in names:
            self._row(name, setup_peak_rss_bytes=result.get("peak_rss_bytes"))
        if result["status"] != "ok":
            self._fail(names, "failed", result["reason"])
            return None
        self.ort_setup_s = result["child_s"]
        for name in names:
            self._row(name)["notes"].append(
                f"{result['exporter']} ONNX export {result['export_s']:.1f} s, "
                f"quantize_static {result['quantize_s']:.1f} s "
                "(in a child process; setup peak is the child's)"
            )
        return Path(result["model_path"])

    # -- builds and groups
    def _over_budget(self, need: float, budget: int | None) -> bool:
        return budget is not None and settled_rss() + need > budget

    def _add_build(self, build: str, ctx: BuildContext, budget: int | None) -> None:
        s = self.settings
        names = [m for m in self._names(build) if m != self.baseline]
        if not names or all(self.rows.get(n, {}).get("status", "ok") != "ok" for n in names):
            return
        ok, reason = self.available[build]
        if not ok:
            self._fail(names, "not installed" if "not installed" in reason else "failed", reason)
            return
        compiled = any(METHODS[n].compiled for n in names)
        need = memory_estimate(build, self.linear_share, compiled) * self.fp32_bytes
        group_full = s.group_size is not None and len(self.group) + len(names) > s.group_size
        if self.group and (group_full or self._over_budget(need, budget)):
            self._flush()
        freezing = s.freezing
        if self._over_budget(need, budget):
            if build == "fp32" and freezing and not self._over_budget(0.2 * self.fp32_bytes, budget):
                freezing = False  # compile without freezing: no second weight copy
                self._row("fp32-compile")["notes"].append(
                    "compiled without freezing: the frozen weight copy would not fit in the memory budget"
                )
            else:
                self._fail(
                    names,
                    "skipped",
                    f"needs about {need / 2**30:.1f} GiB more; budget {budget / 2**30:.1f} GiB, "
                    f"{settled_rss() / 2**30:.1f} GiB held (set a larger --memory-budget or fewer methods)",
                )
                return
        self.log(f"[{self.clock():7.1f}s]   {build}: building")
        if build == self.baseline:  # made at the start of the case; what its compiled rows add starts from here
            built = self.baseline_built
            if built is None:
                return
            built.start_rss = built.setup_peak = settled_rss()
        else:
            built = self._build(build, ctx, names)
            if built is None:
                return
            self.builds.append(built)
        for name in names:
            if METHODS[name].compiled:
                self._add_compiled(name, built, freezing)
            elif built.call is not None:
                self._add_eager(name, built)

    def _build(self, build: str, ctx: BuildContext, names: list[str]) -> Built | None:
        changes: dict[str, Any] = {}
        try:
            with PeakWatch() as watch, record_inductor_changes(changes):
                built, setup_s = self.device.wall(lambda: BUILDERS[build](ctx))
            built.setup_s = setup_s + (self.ort_setup_s if build == "ort" else 0.0)
            built.inductor_changes = changes
            built.start_rss, built.setup_peak = watch.start, watch.peak
            built.held = max(0, settled_rss() - watch.start)
            if built.weight_bytes is None and built.module is not None:
                built.weight_bytes = weight_bytes(built.module)
        except MethodUnavailable as error:
            self._fail(names, "skipped", str(error))
            return None
        except Exception as error:
            self._fail(names, "failed", one_line(error))
            settled_rss()
            return None
        return built

    def _common(self, built: Built) -> dict[str, Any]:
        return {
            "path": built.path,
            "path_detail": built.path_detail,
            "stored_bytes": built.stored_bytes,
            "kernel_bytes": built.kernel_bytes,
            "weight_bytes": built.weight_bytes,
            "weight_ratio_vs_fp32": None if built.weight_bytes is None else built.weight_bytes / self.fp32_bytes,
            "setup_s": built.setup_s,
            **built.counts,
        }

    def _first_calls(self, call: Callable[[], Tensor]) -> tuple[Tensor, float, PeakWatch, int, int | None]:
        """(the second call's output, first-call seconds, the first call's watch, the second call's transient
        bytes, its device memory peak). The second call's output: CUDA graphs overwrite the first's."""
        with PeakWatch() as first:
            _, seconds = self.device.wall(call)
        with PeakWatch() as step:
            output, device_peak = self.device.peak(call)
        return output, seconds, first, step.extra, device_peak

    def _add_eager(self, name: str, built: Built) -> None:
        row = self._row(name, **self._common(built))
        row["notes"] += built.notes
        try:
            output, seconds, first, step_extra, device_peak = self._first_calls(built.call)
        except Exception as error:
            self._fail([name], "failed", one_line(error))
            return
        built.held += max(0, settled_rss() - first.start)
        built.setup_peak = max(built.setup_peak, first.peak)
        setup_extra = built.setup_peak - built.start_rss
        self._finish_first(name, row, output, seconds, built.held, setup_extra, step_extra, device_peak)
        member = _Member(name, built.call, row)
        if name == self.baseline:
            self.anchor = member
        else:
            self.group.append(member)

    def _add_compiled(self, name: str, built: Built, freezing: bool) -> None:
        row = self._row(name, **self._common(built))
        row["notes"] += built.notes
        if built.module is None:
            self._fail([name], "failed", "this method has no module to compile")
            return
        mode = METHODS[name].compile_mode
        compiled = torch.compile(built.module, mode=mode, dynamic=False)  # static shapes, as a first compile would be
        inputs, changes = self.inputs, built.inductor_changes

        def call() -> Tensor:
            with compile_settings(changes, freezing):
                return call_denoiser(compiled, inputs)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inductor's own UserWarnings, one per lowered layer
                output, seconds, first, step_extra, device_peak = self._first_calls(call)
        except Exception as error:
            # no dynamo reset here: it would drop the compiled code of the group's other members
            hint = "" if freezing else " (inductor's int8 linear lowering wants freezing: drop --no-freezing)"
            self._fail([name], "failed", f"torch.compile: {one_line(error)}{hint}")
            return
        added = max(0, settled_rss() - first.start)
        row["compile_added_bytes"] = added
        how = "inductor with freezing" if freezing else "inductor without freezing"
        how += ", CUDA graphs" if mode == "reduce-overhead" else ""
        if built.path == "fp32":
            row["path"], row["path_detail"] = "inductor", f"{how}, fp32"
        else:
            row["path_detail"] = f"{row['path_detail']}; {how}" if row["path_detail"] else how
        setup_extra = max(built.setup_peak, first.peak) - built.start_rss
        self._finish_first(name, row, output, seconds, built.held + added, setup_extra, step_extra, device_peak)
        self.group.append(_Member(name, call, row))

    def _finish_first(self, name, row, output, first, held, setup_extra, step_extra, device_peak) -> None:
        try:
            sqnr = sqnr_db(self.y_ref, output.float())
        except ValueError as error:
            sqnr, row["reason"] = None, f"output not comparable: {error}"
        row.update(
            first_call_s=first,
            one_time_s=(row.get("setup_s") or 0.0) + first,
            sqnr_db=sqnr,
            identical_to_fp32=sqnr == math.inf,
            held_bytes=held,
            peak_rss_bytes=self.process_base + held + step_extra,
            setup_peak_rss_bytes=row.get("setup_peak_rss_bytes") or (self.process_base + self.fp32_held + setup_extra),
            step_peak_extra_bytes=step_extra,
            device_peak_bytes=device_peak,
        )
        quality = "n/a" if sqnr is None else f"{sqnr:.1f} dB"
        self.log(
            f"[{self.clock():7.1f}s]   {name}: setup {row.get('setup_s') or 0:.1f} s, first call {first:.2f} s, "
            f"SQNR {quality}, path {row.get('path')}"
        )

    def _flush(self) -> None:
        """Time the current group in interleaved, randomly ordered rounds (the anchor in each), then free it."""
        s = self.settings
        index = self.group_index
        members = [member for member in (self.anchor, *self.group) if member is not None]
        rng = random.Random(s.seed * 1_000_003 + index * 7919 + self.latent)
        anchor_times = self.anchor_times.setdefault(index, [])
        order = list(members)
        gc.collect()
        gc.disable()  # a collection of the group's large heap inside one call would be charged to that method
        try:
            for round_index in range(s.warmup + s.repeats):
                rng.shuffle(order)
                for member in order:
                    if member.row.get("status") != "ok" or member.retired:
                        continue
                    if not self.device.cuda:
                        time.sleep(_PAUSE_S)
                    graphs = compiled_graph_count()
                    try:
                        elapsed = self.device.timed(member.call)
                    except Exception as error:
                        self._fail([member.name], "failed", one_line(error))
                        continue
                    if round_index >= s.warmup:
                        (anchor_times if member is self.anchor else member.times).append(elapsed)
                        if compiled_graph_count() > graphs:
                            member.recompiled += 1
                if round_index == s.warmup and s.slow_cutoff is not None and anchor_times:
                    self._retire_slow(anchor_times[-1], s.slow_cutoff)
        finally:
            gc.enable()
        for member in self.group:
            member.row["group"] = index
            member.row["times_s"] = tuple(member.times)
            if member.recompiled:
                member.row["notes"].append(
                    f"dynamo recompiled during {member.recompiled} of the {s.repeats} timed rounds (a guard of a "
                    "frame shared with another model failed); those rounds include compile time"
                )
        self.log(
            f"[{self.clock():7.1f}s]   group {index}: timed {len(members)} methods x {s.repeats} rounds "
            f"({', '.join(m.name for m in members)})"
        )
        compiled = any(METHODS[m.name].compiled for m in self.group)
        member = None
        members.clear()
        order.clear()
        self.group, self.builds = [], []  # the last references to the group's models
        self.group_index += 1
        if compiled:
            free_compiled()  # nothing compiled outlives its group
        settled_rss()
        if self.checkpoint is not None:
            self.checkpoint(self._finish())

    def _retire_slow(self, anchor_s: float, cutoff: float) -> None:
        """Stop calling the members that took over ``cutoff`` x the baseline (``anchor_s``) in this round."""
        for member in self.group:
            if member.times and member.times[-1] > cutoff * anchor_s:
                member.retired = True
                member.row["notes"].append(
                    f"timed in one round only: {member.times[-1] / anchor_s:.1f}x the time of {self.baseline} eager "
                    f"in that round, above the slow cutoff ({cutoff:g}x); more rounds would not change its place"
                )
                self.log(f"[{self.clock():7.1f}s]   {member.name}: over {cutoff:g}x {self.baseline}, timed once")

    # -- the rows, with ratios anchored to the baseline's eager row of each row's group
    def _finish(self) -> list[BenchRow]:
        b = self.baseline  # the four ratio fields of this baseline: fp32_median_s, speedup_vs_fp32, ...
        median_key, speedup_key, best_key = f"{b}_median_s", f"speedup_vs_{b}", f"best_{b}"
        anchor_all = [t for times in self.anchor_times.values() for t in times]
        if b in self.rows and anchor_all:
            median = statistics.median(anchor_all)
            self.rows[b].update(median_s=median, min_s=min(anchor_all), times_s=tuple(anchor_all))
            self.rows[b].update({median_key: median, speedup_key: 1.0})
        for row in self.rows.values():
            times = row.get("times_s") or ()
            if row["method"] == b or not times or row["status"] != "ok":
                continue
            anchor = self.anchor_times.get(row.get("group"), [])
            row["median_s"], row["min_s"] = statistics.median(times), min(times)
            if anchor:
                row[median_key] = statistics.median(anchor)
                row[speedup_key] = row[median_key] / row["median_s"]
        # The faster baseline: its eager row, or its fastest compiled row where compiling helped.
        compiled = {
            name: row[speedup_key]
            for name, row in self.rows.items()
            if METHODS[name].build == b and METHODS[name].compiled and row.get(speedup_key) and row["status"] == "ok"
        }
        best = max(compiled, key=compiled.get, default=b)
        best_speedup = max(1.0, compiled.get(best, 1.0))
        for row in self.rows.values():
            if row.get(speedup_key) is not None:
                row[f"speedup_vs_best_{b}"] = row[speedup_key] / best_speedup
                row[best_key] = best if best_speedup > 1.0 else b
        out = []
        for name in self.settings.methods:
            if name not in self.rows:
                continue
            row = dict(self.rows[name])
            row["notes"] = tuple(dict.fromkeys(row.get("notes") or ()))
            if row["status"] == "ok" and row.get("median_s") is None:
                row["status"], row["reason"] = "failed", row.get("reason") or _NOT_TIMED
            out.append(BenchRow(**{k: v for k, v in row.items() if k in BenchRow.__dataclass_fields__}))
        return out


def salvaged_rows(
    spec: DenoiserSpec, latent: int, settings: BenchSettings, timed: Sequence[BenchRow], reason: str
) -> list[BenchRow]:
    """The rows of a case that died: those ``timed`` before (its checkpoints; ratios from their own groups), the
    other methods of ``settings`` failed for ``reason``."""
    kept = {row.method: row for row in timed if row.status == "ok" or row.reason != _NOT_TIMED}
    return [
        kept.get(name)
        or BenchRow(**{**_new_row(spec, latent, settings, name), "status": "failed", "reason": reason, "notes": ()})
        for name in settings.methods
    ]


class _CaseKilled(RuntimeError):
    """A case's process died before its end; ``rows`` are those of the groups it had timed by then."""

    def __init__(self, message: str, rows: list[BenchRow]):
        super().__init__(message)
        self.rows = rows


def _run_case_in_child(
    model: str, latent: int, settings: BenchSettings, log: Callable[[str], None], clock_s: float
) -> tuple[list[BenchRow], dict[str, Any]]:
    """Measure one case in a fresh Python process (:func:`case_child`); its progress lines go to ``log``.

    Raises:
        _CaseKilled: the process died (e.g. killed for memory) before writing its rows; the error carries
            the rows of the groups timed before, which the child checkpoints after each group.
    """
    with tempfile.TemporaryDirectory(prefix="quantdiff-bench-case-") as folder:
        job, result = Path(folder) / "job.json", Path(folder) / "result.json"
        partial = Path(folder) / "partial.json"
        job.write_text(
            json.dumps(
                {
                    "settings": settings.to_dict(),
                    "model": model,
                    "latent": latent,
                    "clock_s": clock_s,
                    "result": str(result),
                    "partial": str(partial),
                }
            )
        )
        code = "import sys; from quantdiff.bench.runner import case_child; sys.exit(case_child(sys.argv[1]))"
        with subprocess.Popen(
            [sys.executable, "-c", code, str(job)], stdout=subprocess.PIPE, text=True, bufsize=1
        ) as child:
            assert child.stdout is not None
            for line in child.stdout:
                log(line.rstrip("\n"))
        if not result.exists():
            timed = [BenchRow.from_dict(r) for r in json.loads(partial.read_text())["rows"]] if partial.exists() else []
            raise _CaseKilled(f"its process {exit_diagnosis(child.returncode)} before its end", timed)
        data = json.loads(result.read_text())
    return [BenchRow.from_dict(row) for row in data["rows"]], data["case"]


def measure_case(
    model: str,
    latent: int,
    settings: BenchSettings,
    *,
    log: Callable[[str], None] | None = None,
    clock: Callable[[], float] | None = None,
    checkpoint: Callable[[list[BenchRow]], None] | None = None,
) -> tuple[list[BenchRow], dict[str, Any]]:
    """Measure one (model, latent) case of ``settings`` in this process: its rows and its entry of ``cases``.

    ``log`` gets the progress lines (stamped with ``clock()``, seconds), ``checkpoint`` the rows so far after
    each timed group (what survives if the process dies: :func:`salvaged_rows`).
    """
    _warm_up(settings)
    # The optional packages are imported once, before the base RSS is read, so that no row pays for them.
    available = _availability(settings)
    base = settled_rss()
    log = log or (lambda _line: None)
    clock = clock or (lambda: 0.0)
    with torch.no_grad():
        return _CaseRunner(DENOISERS[model], latent, settings, available, log, clock, base, checkpoint).run()


def case_child(job_path: str) -> int:
    """Entry point of a case's child process (run by :func:`run_benchmark` for runs of several cases): measure
    the case the job file names with :func:`measure_case`, write its rows (and after each timed group the rows
    so far) where the job says."""
    job = json.loads(Path(job_path).read_text())
    settings = BenchSettings.from_dict(job["settings"])
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    t0 = time.perf_counter() - float(job["clock_s"])
    partial = Path(job["partial"])

    def checkpoint(rows: list[BenchRow]) -> None:
        staging = partial.with_suffix(".tmp")
        staging.write_text(json.dumps({"rows": [row.to_dict() for row in rows]}, allow_nan=False))
        os.replace(staging, partial)  # atomic: a kill mid-write leaves the previous checkpoint

    rows, case = measure_case(
        job["model"],
        int(job["latent"]),
        settings,
        log=lambda line: print(line, flush=True),
        clock=lambda: time.perf_counter() - t0,
        checkpoint=checkpoint,
    )
    payload = {"rows": [row.to_dict() for row in rows], "case": case}
    Path(job["result"]).write_text(json.dumps(payload, allow_nan=False))
    return 0


def _availability(settings: BenchSettings) -> dict[str, tuple[bool, str]]:
    """build -> (its optional packages import, why not), each imported once before the base RSS is read."""
    available = {}
    for name in settings.methods:
        method = METHODS[name]
        reasons = [reason for ok, reason in (import_optional(m) for m in method.requires) if not ok]
        available[method.build] = (not reasons, "; ".join(reasons))
    return available


def _warm_up(settings: BenchSettings) -> None:
    """Load the libraries and run one tiny denoiser of each class once on the device, so that one-time process
    costs (imports, kernel and thread-pool initialisation, CUDA's context) land before the first case measures
    its base RSS."""
    for class_name in dict.fromkeys(DENOISERS[m].class_name for m in settings.models):
        tiny = next(
            spec for spec in DENOISERS.values() if spec.class_name == class_name and spec.name.startswith("tiny")
        )
        inputs = cast_inputs(denoiser_inputs(tiny, TINY_LATENT, 1, EVAL_TIMESTEP, 0), settings.device)
        with torch.no_grad():
            call_denoiser(build_denoiser(tiny).to(settings.device), inputs)
    gc.collect()


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def run_benchmark(
    settings: BenchSettings,
    *,
    log: Callable[[str], None] | None = None,
    command: str = "",
    on_case: Callable[[BenchResult], None] | None = None,
    previous: BenchResult | None = None,
) -> BenchResult:
    """Measure every (model, latent, method) of ``settings``, on the CPU or on CUDA; see the package docstring
    for what and how.

    Args:
        settings: from :func:`make_settings`.
        log: receives one progress line at a time (``None``: silent).
        command: the command line, recorded in the result.
        on_case: called after each (model, latent) case with the result so far (``complete`` False until the
            last one), e.g. to write the files as a multi-hour run goes, so that nothing measured is lost.
        previous: an earlier result of the same settings (models and latents aside) on this machine: its
            finished cases are kept as they are and only the others are measured, so that a run of several
            hours can go in parts. Every case is measured within one process either way; each records when.
    """
    log = log or (lambda _line: None)
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    started = run_started = _now()
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    rows: list[BenchRow] = []
    cases: list[Mapping[str, Any]] = []
    done: set[tuple[str, int]] = set()
    recorded = settings  # what the result says it measured: with --resume, the earlier cases' too
    if previous is not None:
        done = _reusable_cases(previous, settings)
        # The earlier file's cases that this part does not ask for stay in it as they were, so that resuming
        # one model does not drop the others.
        wanted = {(model, latent) for model in settings.models for latent in settings.latents[model]}
        keep = done | ({(case["model"], case["latent"]) for case in previous.cases} - wanted)
        cases = [case for case in previous.cases if (case["model"], case["latent"]) in keep]
        rows = [row for row in previous.rows if (row.model, row.latent) in keep]
        started = previous.started
        recorded = _merged_settings(previous.settings, settings)
    todo = [(m, latent) for m in settings.models for latent in settings.latents[m] if (m, latent) not in done]
    total = len(cases) + len(todo)  # the cases the result will hold: those kept and those measured now

    def result(complete: bool) -> BenchResult:
        return BenchResult(
            settings=recorded,
            machine=machine,
            rows=tuple(rows),
            cases=tuple(cases),
            started=started,
            duration_s=clock() + (previous.duration_s if previous is not None else 0.0),
            load_average_end=_load_average(),
            command=command,
            complete=complete,
        )

    # Several cases: each in a child process. Compiling with freezing leaves the frozen weights (and the
    # compiled model's own) held by torch's C++ side after every Python reference is gone (measured: a
    # frozen SD1.5 UNet kept 5 GiB), and later cases were refused for memory; a child returns it all.
    isolate = len(todo) > 1
    try:
        machine = machine_info(settings.device)
        if previous is not None:
            _check_same_machine(previous.machine, machine)
            if done:
                log(f"kept from the earlier run: {', '.join(f'{m} {lat}x{lat}' for m, lat in sorted(done))}")
        for model, latent in todo:
            spec = DENOISERS[model]
            log(f"[{clock():7.1f}s] {spec.title}, latent {latent}x{latent}, batch {settings.batch}")
            case_started, load_start = _now(), _load_average()
            try:
                if isolate:
                    case_rows, case = _run_case_in_child(model, latent, settings, log, clock())
                else:
                    case_rows, case = measure_case(model, latent, settings, log=log, clock=clock)
            except Exception as error:  # e.g. the fp32 model does not fit: the other cases still run
                reason = f"the case failed: {one_line(error)}"
                log(f"  {reason}")
                timed = error.rows if isinstance(error, _CaseKilled) else []
                case_rows = salvaged_rows(spec, latent, settings, timed, reason)
                case = {"model": model, "latent": latent, "error": reason}
            case.update(started=case_started, load_average_start=load_start, run_started=run_started, command=command)
            rows.extend(case_rows)
            cases.append(MappingProxyType(case))
            if on_case is not None:
                on_case(result(complete=len(cases) == total))
    finally:
        torch.set_num_threads(threads_before)
    return result(complete=True)


# What may differ between the parts of one resumed run: which cases they measure.
_PER_PART_SETTINGS = ("models", "latents", "quick")


def _merged_settings(before: BenchSettings, now: BenchSettings) -> BenchSettings:
    """``now`` with the models and latent sizes of ``before`` added (the cases a resumed file holds)."""
    models = tuple(dict.fromkeys((*before.models, *now.models)))
    latents = {model: tuple(sorted({*before.latents.get(model, ()), *now.latents.get(model, ())})) for model in models}
    return dataclasses.replace(now, models=models, latents=MappingProxyType(latents))


def _reusable_cases(previous: BenchResult, settings: BenchSettings) -> set[tuple[str, int]]:
    """The (model, latent) cases of ``previous`` that ``settings`` asks for and that finished without error."""
    old, new = previous.settings.to_dict(), settings.to_dict()
    differ = [k for k in new if k not in _PER_PART_SETTINGS and old.get(k) != new[k]]
    if differ:
        details = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in differ)
        raise QuantDiffError(
            f"cannot resume: the earlier result was measured with other settings ({details}); "
            "run with the same options, or write to another --json file"
        )
    wanted = {(model, latent) for model in settings.models for latent in settings.latents[model]}
    return {
        (case["model"], case["latent"])
        for case in previous.cases
        if "error" not in case and (case["model"], case["latent"]) in wanted
    }


def _check_same_machine(before: MachineInfo, now: MachineInfo) -> None:
    """Parts of one result must come from the same kind of machine and software."""
    keys = ("cpu", "usable_cpus", "flags", "torch", "threads", "quantized_engine", "packages", "gpu")
    before_d, now_d = before.to_dict(), now.to_dict()
    differ = [k for k in keys if before_d[k] != now_d[k]]
    if differ:
        details = "; ".join(f"{k}: {before_d[k]!r} there, {now_d[k]!r} now" for k in differ)
        raise QuantDiffError(
            f"cannot resume: the earlier result comes from another machine or software ({details}); "
            "write to another --json file"
        )
