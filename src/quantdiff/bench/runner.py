"""The ``quantdiff bench`` runner: one (model, latent) case at a time, methods built into groups that are timed
in interleaved rounds (the procedure is described in the ``quantdiff.bench`` package docstring).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import signal
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

from quantdiff.bench.builds import MethodUnavailable, _Built, _call, _Context, _one_line
from quantdiff.bench.compiling import (
    _compiled_graphs,
    _dynamo_settings,
    _free_compiled,
    _inductor_config,
    _private_inductor_cache,
    _record_inductor_changes,
)
from quantdiff.bench.denoisers import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    DenoiserSpec,
    _param_count,
    bench_calibration,
    build_denoiser,
    denoiser_inputs,
)
from quantdiff.bench.memory import _PeakWatch, _settled_rss, weight_bytes
from quantdiff.bench.methods import (
    _BUILDERS,
    _MEMORY,
    _ORT_CHILD_FACTOR,
    BUILD_ORDER,
    METHODS,
    MethodSpec,
    _estimate,
    _import_optional,
)
from quantdiff.bench.ort import _fingerprint
from quantdiff.bench.results import BenchResult, BenchRow, MachineInfo, _plain, machine_info
from quantdiff.bench.settings import TINY_LATENT, BenchSettings
from quantdiff.errors import QuantDiffError
from quantdiff.primitives import sqnr_db

_PAUSE_S = 0.05  # between two timed calls of a group
_NOT_TIMED = "not timed"  # reason of a row that was built but never timed


def _exit_diagnosis(returncode: int) -> str:
    """A child's exit code in words; SIGKILL without a traceback is the kernel's OOM killer in practice."""
    killed = " (killed: most likely out of memory)" if returncode == -signal.SIGKILL else ""
    return f"exited with {returncode}{killed}"


@dataclass
class _Member:
    """A live row of the current group: how to call it and what its row says so far."""

    method: MethodSpec
    call: Callable[[], Tensor]
    row: dict[str, Any]
    times: list[float] = field(default_factory=list)
    recompiled: int = 0  # timed rounds in which dynamo compiled something
    retired: bool = False  # slower than the slow cutoff in its first timed round: not called again


class _CaseRunner:
    """Measures one (model, latent) case; see the module docstring for the procedure."""

    def __init__(
        self,
        spec: DenoiserSpec,
        latent: int,
        settings: BenchSettings,
        available,
        log,
        clock,
        base: int,
        checkpoint: Callable[[list[BenchRow]], None] | None = None,
    ):
        self.spec, self.latent, self.settings = spec, latent, settings
        self.checkpoint = checkpoint  # receives the rows so far after each timed group
        self.process_base = base  # RSS of the process before its first case: the base of every peak figure
        self.available = available  # method -> (importable, reason)
        self.log = log
        self.clock = clock
        self.rows: dict[str, dict[str, Any]] = {}
        self.group: list[_Member] = []
        self.group_index = 0
        self.builds: list[_Built] = []  # alive in the current group
        self.anchor_times: dict[int, list[float]] = {}
        self.notes: list[str] = []

    # -- rows
    def _row(self, name: str, **values) -> dict[str, Any]:
        method = METHODS[name]
        row = self.rows.setdefault(
            name,
            {
                "model": self.spec.name,
                "latent": self.latent,
                "latent_shape": tuple(self.shape),
                "batch": self.settings.batch,
                "method": name,
                "label": method.label,
                "kind": method.kind,
                "compiled": method.compiled,
                "status": "ok",
                "notes": [],
            },
        )
        row.update(values)
        return row

    def _fail(self, names: Sequence[str], status: str, reason: str) -> None:
        for name in names:
            self._row(name, status=status, reason=reason)
        self.log(f"  {', '.join(names)}: {status}: {reason}")

    # -- the case
    def run(self) -> tuple[list[BenchRow], dict[str, Any]]:
        with _private_inductor_cache():
            return self._measure()

    def _measure(self) -> tuple[list[BenchRow], dict[str, Any]]:
        s = self.settings
        self.shape = [s.batch, int(self.spec.config["in_channels"]), self.latent, self.latent]
        # The contenders first, so that they share the first timing group (see BUILD_ORDER).
        builds = sorted(dict.fromkeys(METHODS[m].build for m in s.methods), key=BUILD_ORDER.index)
        self.base_rss = _settled_rss()
        budget = s.memory_budget_bytes or int(0.85 * (psutil.virtual_memory().available + self.base_rss))
        case: dict[str, Any] = {
            "model": self.spec.name,
            "latent": self.latent,
            "budget_bytes": budget,
            "pid": os.getpid(),  # several cases: each in its own process
        }
        threads = torch.get_num_threads()
        # ONNX Runtime first: its child peaks at several times the model, so it runs before anything is held.
        self.workdir = tempfile.TemporaryDirectory(prefix="quantdiff-bench-")
        try:
            ort_model = self._prepare_ort(threads) if "ort" in builds else None
            with _PeakWatch() as watch:
                start = time.perf_counter()
                reference = build_denoiser(self.spec, s.seed)
                build_s = time.perf_counter() - start
                inputs = denoiser_inputs(self.spec, self.latent, s.batch, EVAL_TIMESTEP, s.seed + EVAL_SEED_OFFSET)
                start = time.perf_counter()
                y_ref = _call(reference, inputs)
                first_s = time.perf_counter() - start
            fp32_bytes = weight_bytes(reference)
            self.fp32_bytes = fp32_bytes
            self.fp32_held = _settled_rss() - self.base_rss
            params = sum(p.numel() for p in reference.parameters())
            linear = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.Linear))
            self.linear_share = linear / max(1, params)
            with _PeakWatch() as step:
                _call(reference, inputs)
            self._row(
                "fp32",
                weight_bytes=fp32_bytes,
                weight_ratio_vs_fp32=1.0,
                held_bytes=self.fp32_held,
                peak_rss_bytes=self.process_base + self.fp32_held + step.extra,
                setup_peak_rss_bytes=self.process_base + watch.extra,
                step_peak_extra_bytes=step.extra,
                setup_s=build_s,
                first_call_s=first_s,
                one_time_s=build_s + first_s,
                sqnr_db=math.inf,
                identical_to_fp32=True,
                path="fp32",
                path_detail="eager fp32 (ATen / oneDNN fp32 kernels)",
            )
            self.log(
                f"[{self.clock():7.1f}s] {self.spec.name} {self.latent}x{self.latent}: fp32 built ({params / 1e6:.0f}M "
                f"parameters, {fp32_bytes / 2**20:.0f} MiB) in {build_s:.1f} s, one step {first_s:.2f} s"
            )
            calibration = bench_calibration(self.spec, reference, self.latent, s.batch, s.calibration_inputs, s.seed)
            ctx = _Context(self.spec, reference, inputs, calibration, threads, ort_model)
            self.reference, self.inputs, self.y_ref = reference, inputs, y_ref
            self.anchor = _Member(METHODS["fp32"], lambda: _call(reference, inputs), self.rows["fp32"])
            for build in builds:
                self._add_build(build, ctx, budget)
            if self.group or self.group_index == 0:
                self._flush()
            y_again = _call(reference, inputs)
            if not torch.equal(y_again, y_ref):
                self.notes.append(
                    f"fp32 eager output changed during the run ({sqnr_db(y_ref, y_again):.1f} dB vs its first call): "
                    "a method modified shared weights, or the kernels are not deterministic"
                )
            case.update(
                fp32_weight_bytes=fp32_bytes,
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
            self.reference = self.inputs = self.anchor = None
            _free_compiled()
            self.workdir.cleanup()
            _settled_rss()
        return self._finish(), case

    def _prepare_ort(self, threads: int) -> Path | None:
        names = [m for m in self.settings.methods if METHODS[m].build == "ort"]
        ok, reason = self.available["ort"]
        if not ok:
            self._fail(names, "not installed" if "not installed" in reason else "failed", reason)
            return None
        params = _param_count(self.spec)
        need = _ORT_CHILD_FACTOR * 4 * params
        available = psutil.virtual_memory().available
        if need > available:
            self._fail(
                names,
                "skipped",
                f"ONNX export + quantize_static need about {need / 2**30:.0f} GiB ({_ORT_CHILD_FACTOR:.0f}x the fp32 "
                f"weights); {available / 2**30:.0f} GiB available",
            )
            return None
        reference = build_denoiser(self.spec, self.settings.seed)
        fingerprint = _fingerprint(reference)
        del reference
        _settled_rss()
        folder = Path(self.workdir.name)
        job = {
            "model": self.spec.name,
            "latent": self.latent,
            "batch": self.settings.batch,
            "seed": self.settings.seed,
            "calibration": self.settings.calibration_inputs,
            "threads": threads,
            "fingerprint": fingerprint,
            "folder": str(folder),
            "result": str(folder / "result.json"),
        }
        (folder / "job.json").write_text(json.dumps(job))
        self.log(f"[{self.clock():7.1f}s]   ort-qdq: exporting and quantizing in a child process")
        code = "import sys; from quantdiff.bench.ort import _ort_child; sys.exit(_ort_child(sys.argv[1]))"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, str(folder / "job.json")], capture_output=True, text=True)
        child_s = time.perf_counter() - start
        result_file = folder / "result.json"
        if not result_file.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()
            reason = f"ONNX child {_exit_diagnosis(done.returncode)} after {child_s:.0f} s: {tail[-1] if tail else ''}"
            self._fail(names, "failed", reason[:300])
            return None
        result = json.loads(result_file.read_text())
        for name in names:
            self._row(name, setup_peak_rss_bytes=result.get("peak_rss_bytes"))
        if result["status"] != "ok":
            self._fail(names, "failed", result["reason"])
            return None
        self.ort_setup_s = child_s
        for name in names:
            self._row(name).setdefault("notes", []).append(
                f"{result['exporter']} ONNX export {result['export_s']:.1f} s, "
                f"quantize_static {result['quantize_s']:.1f} s "
                "(in a child process; setup peak is the child's)"
            )
        return Path(result["model_path"])

    # -- builds and groups
    def _add_build(self, build: str, ctx: _Context, budget: int) -> None:
        s = self.settings
        names = [m for m in s.methods if METHODS[m].build == build and m != "fp32"]
        if not names or all(self.rows.get(n, {}).get("status", "ok") != "ok" for n in names):
            return
        for module in {r for n in names for r in METHODS[n].requires}:
            ok, reason = _import_optional(module)
            if not ok:
                self._fail(names, "not installed" if "not installed" in reason else "failed", reason)
                return
        held, transient, compile_extra = (_estimate(v, self.linear_share) for v in _MEMORY[build])
        wants_compile = any(METHODS[n].compiled for n in names)
        need = (held + transient + (compile_extra if wants_compile else 0.0)) * self.fp32_bytes
        group_full = s.group_size is not None and len(self.group) + len(names) > s.group_size
        if self.group and (group_full or _settled_rss() + need > budget):
            self._flush()
        freezing = s.freezing
        if _settled_rss() + need > budget:
            if build == "fp32" and freezing and _settled_rss() + 0.2 * self.fp32_bytes <= budget:
                freezing = False  # compile without freezing: no second weight copy
                self._row("fp32-compile")["notes"].append(
                    "compiled without freezing: the frozen weight copy would not fit in the memory budget"
                )
            else:
                self._fail(
                    names,
                    "skipped",
                    f"needs about {need / 2**30:.1f} GiB more; budget {budget / 2**30:.1f} GiB, "
                    f"{_settled_rss() / 2**30:.1f} GiB held (set a larger --memory-budget or fewer methods)",
                )
                return
        self.log(f"[{self.clock():7.1f}s]   {build}: building")
        if build == "fp32":
            built = _Built(call=None, module=self.reference, path="fp32", weight_bytes=self.fp32_bytes)
            built.start_rss = built.setup_peak = _settled_rss()
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

    def _build(self, build: str, ctx: _Context, names: list[str]) -> _Built | None:
        changes: dict[str, Any] = {}
        try:
            with _PeakWatch() as watch, _record_inductor_changes(changes):
                start = time.perf_counter()
                built = _BUILDERS[build](ctx)
                built.setup_s = (
                    time.perf_counter() - start + (getattr(self, "ort_setup_s", 0.0) if build == "ort" else 0)
                )
            built.inductor_changes = changes
            built.start_rss, built.setup_peak = watch.start, watch.peak
            built.held = max(0, _settled_rss() - watch.start)
            if built.weight_bytes is None and built.module is not None:
                built.weight_bytes = weight_bytes(built.module)
        except MethodUnavailable as error:
            self._fail(names, "skipped", str(error))
            return None
        except Exception as error:
            self._fail(names, "failed", _one_line(error))
            _settled_rss()
            return None
        return built

    def _common(self, built: _Built) -> dict[str, Any]:
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

    @staticmethod
    def _first_calls(call: Callable[[], Tensor]) -> tuple[Tensor, float, _PeakWatch, int]:
        """(output, first-call seconds, the first call's watch, the second call's transient bytes)."""
        with _PeakWatch() as first:
            start = time.perf_counter()
            output = call()
            seconds = time.perf_counter() - start
        with _PeakWatch() as step:
            call()
        return output, seconds, first, step.extra

    def _add_eager(self, name: str, built: _Built) -> None:
        row = self._row(name, **self._common(built))
        row["notes"] += built.notes
        try:
            output, seconds, first, step_extra = self._first_calls(built.call)
        except Exception as error:
            self._fail([name], "failed", _one_line(error))
            return
        built.held += max(0, _settled_rss() - first.start)
        built.setup_peak = max(built.setup_peak, first.peak)
        self._finish_first(name, row, output, seconds, built.held, built.setup_peak - built.start_rss, step_extra)
        self.group.append(_Member(METHODS[name], built.call, row))

    def _add_compiled(self, name: str, built: _Built, freezing: bool) -> None:
        row = self._row(name, **self._common(built))
        row["notes"] += built.notes
        if built.module is None:
            self._fail([name], "failed", "this method has no module to compile")
            return
        compiled = torch.compile(built.module, dynamic=False)  # static shapes, as a first compile would be
        inputs = self.inputs
        config = _inductor_config()
        settings = {**built.inductor_changes, "freezing": freezing, "fx_graph_cache": False}

        def call() -> Tensor:
            # Every call under the compile settings: models with graph breaks (diffusers' SD3) share resume
            # frames, and a guard failure on one of them recompiles in the middle of the timing rounds; that
            # compile must be the same kind (frozen, static), or qlinear's lowering fails without freezing.
            with config.patch(settings), _dynamo_settings():
                return _call(compiled, inputs)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inductor's own UserWarnings, one per lowered layer
                output, seconds, first, step_extra = self._first_calls(call)
        except Exception as error:
            # no dynamo reset here: it would drop the compiled code of the group's other members
            hint = "" if freezing else " (inductor's int8 linear lowering wants freezing: drop --no-freezing)"
            self._fail([name], "failed", f"torch.compile: {_one_line(error)}{hint}")
            return
        added = max(0, _settled_rss() - first.start)
        row["compile_added_bytes"] = added
        how = "inductor with freezing" if freezing else "inductor without freezing"
        if built.path == "fp32":
            row["path"], row["path_detail"] = "inductor", f"{how}, fp32"
        else:
            row["path_detail"] = f"{row['path_detail']}; {how}" if row["path_detail"] else how
        setup_extra = max(built.setup_peak, first.peak) - built.start_rss
        self._finish_first(name, row, output, seconds, built.held + added, setup_extra, step_extra)
        self.group.append(_Member(METHODS[name], call, row))

    def _finish_first(self, name, row, output, first, held, setup_extra, step_extra) -> None:
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
        )
        quality = "n/a" if sqnr is None else f"{sqnr:.1f} dB"
        self.log(
            f"[{self.clock():7.1f}s]   {name}: setup {row.get('setup_s') or 0:.1f} s, first call {first:.2f} s, "
            f"SQNR {quality}, path {row.get('path')}"
        )

    def _flush(self) -> None:
        """Time the current group in interleaved, randomly ordered rounds (fp32 eager in each), then free it."""
        s = self.settings
        index = self.group_index
        members = [self.anchor, *self.group]
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
                    # A pause between calls: ONNX Runtime's worker threads spin for a while after a run and
                    # would take the cores from whichever method is called next.
                    time.sleep(_PAUSE_S)
                    graphs = _compiled_graphs()
                    try:
                        start = time.perf_counter()
                        member.call()
                        elapsed = time.perf_counter() - start
                    except Exception as error:
                        self._fail([member.method.name], "failed", _one_line(error))
                        continue
                    if round_index >= s.warmup:
                        (anchor_times if member is self.anchor else member.times).append(elapsed)
                        if _compiled_graphs() > graphs:
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
            f"({', '.join(m.method.name for m in members)})"
        )
        compiled = any(m.method.compiled for m in self.group)
        member = None
        members.clear()
        order.clear()
        self.group, self.builds = [], []  # the last references to the group's models
        self.group_index += 1
        if compiled:
            _free_compiled()  # nothing compiled outlives its group
        _settled_rss()
        if self.checkpoint is not None:
            self.checkpoint(self._finish())

    def _retire_slow(self, anchor_s: float, cutoff: float) -> None:
        """Stop calling the members that took over ``cutoff`` x fp32 eager (``anchor_s``) in this round."""
        for member in self.group:
            if member.times and member.times[-1] > cutoff * anchor_s:
                member.retired = True
                member.row["notes"].append(
                    f"timed in one round only: {member.times[-1] / anchor_s:.1f}x the time of fp32 eager in that "
                    f"round, above the slow cutoff ({cutoff:g}x); more rounds would not change its place"
                )
                self.log(f"[{self.clock():7.1f}s]   {member.method.name}: over {cutoff:g}x fp32, timed once")

    # -- the rows, with ratios anchored to fp32 eager of each row's group
    def _finish(self) -> list[BenchRow]:
        anchor_all = [t for times in self.anchor_times.values() for t in times]
        if "fp32" in self.rows and anchor_all:
            self.rows["fp32"].update(
                median_s=statistics.median(anchor_all),
                min_s=min(anchor_all),
                times_s=tuple(anchor_all),
                fp32_median_s=statistics.median(anchor_all),
                speedup_vs_fp32=1.0,
            )
        for row in self.rows.values():
            times = row.get("times_s") or ()
            if row["method"] == "fp32" or not times or row["status"] != "ok":
                continue
            anchor = self.anchor_times.get(row.get("group"), [])
            row["median_s"], row["min_s"] = statistics.median(times), min(times)
            if anchor:
                row["fp32_median_s"] = statistics.median(anchor)
                row["speedup_vs_fp32"] = row["fp32_median_s"] / row["median_s"]
        compiled = self.rows.get("fp32-compile", {})
        compiled_speedup = compiled.get("speedup_vs_fp32") if compiled.get("status") == "ok" else None
        best = max(1.0, compiled_speedup or 1.0)
        for row in self.rows.values():
            if row.get("speedup_vs_fp32") is not None:
                row["speedup_vs_best_fp32"] = row["speedup_vs_fp32"] / best
                row["best_fp32"] = "fp32-compile" if best > 1.0 else "fp32"
        out = []
        for name in self.settings.methods:
            if name not in self.rows:
                continue
            row = dict(self.rows[name])
            row["notes"] = tuple(dict.fromkeys(row.get("notes") or ()))
            row["latent_shape"] = tuple(self.shape)
            if row["status"] == "ok" and row.get("median_s") is None:
                row["status"], row["reason"] = "failed", row.get("reason") or _NOT_TIMED
            out.append(BenchRow(**{k: v for k, v in row.items() if k in BenchRow.__dataclass_fields__}))
        return out


def _salvaged_rows(
    spec: DenoiserSpec, latent: int, settings: BenchSettings, timed: Sequence[BenchRow], reason: str
) -> list[BenchRow]:
    """The rows of a case that died: those timed before (ratios from their own groups), the rest failed."""
    kept = {row.method: row for row in timed if row.status == "ok" or row.reason != _NOT_TIMED}
    return [kept.get(name) or _failed_row(spec, latent, settings, name, reason) for name in settings.methods]


def _failed_row(spec: DenoiserSpec, latent: int, settings: BenchSettings, name: str, reason: str) -> BenchRow:
    method = METHODS[name]
    shape = (settings.batch, int(spec.config["in_channels"]), latent, latent)
    return BenchRow(
        spec.name, latent, shape, settings.batch, name, method.label, method.kind, method.compiled, "failed", reason
    )


class _CaseKilled(RuntimeError):
    """A case's process died before its end; ``rows`` are those of the groups it had timed by then."""

    def __init__(self, message: str, rows: list[BenchRow]):
        super().__init__(message)
        self.rows = rows


def _run_case_in_child(
    model: str, latent: int, settings: BenchSettings, log: Callable[[str], None], clock_s: float
) -> tuple[list[BenchRow], dict[str, Any]]:
    """Measure one case in a fresh Python process (:func:`_case_child`); its progress lines go to ``log``.

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
        code = "import sys; from quantdiff.bench.runner import _case_child; sys.exit(_case_child(sys.argv[1]))"
        with subprocess.Popen(
            [sys.executable, "-c", code, str(job)], stdout=subprocess.PIPE, text=True, bufsize=1
        ) as child:
            assert child.stdout is not None
            for line in child.stdout:
                log(line.rstrip("\n"))
        if not result.exists():
            timed = [BenchRow.from_dict(r) for r in json.loads(partial.read_text())["rows"]] if partial.exists() else []
            raise _CaseKilled(f"its process {_exit_diagnosis(child.returncode)} before its end", timed)
        data = json.loads(result.read_text())
    return [BenchRow.from_dict(row) for row in data["rows"]], data["case"]


def _case_child(job_path: str) -> int:
    """Entry point of a case's child process: measure it as :func:`run_benchmark` would, write the rows."""
    job = json.loads(Path(job_path).read_text())
    settings = BenchSettings.from_dict(job["settings"])
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    t0 = time.perf_counter() - float(job["clock_s"])

    def clock() -> float:
        return time.perf_counter() - t0

    def log(line: str) -> None:
        print(line, flush=True)

    _warm_up(settings)
    available = _availability(settings)
    base = _settled_rss()
    spec = DENOISERS[job["model"]]
    partial = Path(job["partial"])

    def checkpoint(rows: list[BenchRow]) -> None:
        staging = partial.with_suffix(".tmp")
        staging.write_text(json.dumps({"rows": [row.to_dict() for row in rows]}, allow_nan=False))
        os.replace(staging, partial)  # atomic: a kill mid-write leaves the previous checkpoint

    with torch.no_grad():
        runner = _CaseRunner(spec, int(job["latent"]), settings, available, log, clock, base, checkpoint)
        rows, case = runner.run()
    payload = {"rows": [row.to_dict() for row in rows], "case": _plain(case)}
    Path(job["result"]).write_text(json.dumps(payload, allow_nan=False))
    return 0


def _availability(settings: BenchSettings) -> dict[str, tuple[bool, str]]:
    """build -> (its optional packages import, why not), each imported once before the base RSS is read."""
    available = {}
    for name in settings.methods:
        method = METHODS[name]
        reasons = [reason for ok, reason in (_import_optional(m) for m in method.requires) if not ok]
        available[method.build] = (not reasons, "; ".join(reasons))
    return available


def _warm_up(settings: BenchSettings) -> None:
    """Load the libraries and run one tiny denoiser of each class once, so that one-time process costs
    (imports, kernel and thread-pool initialisation) land before the first case measures its base RSS."""
    for class_name in dict.fromkeys(DENOISERS[m].class_name for m in settings.models):
        tiny = next(
            spec for spec in DENOISERS.values() if spec.class_name == class_name and spec.name.startswith("tiny")
        )
        with torch.no_grad():
            _call(build_denoiser(tiny), denoiser_inputs(tiny, TINY_LATENT, 1, EVAL_TIMESTEP, 0))
    gc.collect()


def run_benchmark(
    settings: BenchSettings,
    *,
    log: Callable[[str], None] | None = None,
    command: str = "",
    on_case: Callable[[BenchResult], None] | None = None,
    previous: BenchResult | None = None,
) -> BenchResult:
    """Measure every (model, latent, method) of ``settings``; see the module docstring for what and how.

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
    started = run_started = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
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

    def result(complete: bool) -> BenchResult:
        return BenchResult(
            settings=recorded,
            machine=machine,
            rows=tuple(rows),
            cases=tuple(cases),
            started=started,
            duration_s=clock() + (previous.duration_s if previous is not None else 0.0),
            load_average_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
            command=command,
            complete=complete,
        )

    # the cases the result will hold: those kept from the earlier file and those measured now
    total = len(cases) + sum(1 for m in settings.models for lat in settings.latents[m] if (m, lat) not in done)
    # Several cases: each in a child process. Compiling with freezing leaves the frozen weights (and the
    # compiled model's own) held by torch's C++ side after every Python reference is gone (measured: a
    # frozen SD1.5 UNet kept 5 GiB), and later cases were refused for memory; a child returns it all.
    isolate = sum(1 for m in settings.models for lat in settings.latents[m] if (m, lat) not in done) > 1
    try:
        _warm_up(settings)
        machine = machine_info()
        if previous is not None:
            _check_same_machine(previous.machine, machine)
            if done:
                log(f"kept from the earlier run: {', '.join(f'{m} {lat}x{lat}' for m, lat in sorted(done))}")
        # The optional packages are imported once, before the base RSS is read, so that no row pays for them.
        available = _availability(settings)
        base = _settled_rss()
        with torch.no_grad():
            for model in settings.models:
                spec = DENOISERS[model]
                for latent in settings.latents[model]:
                    if (model, latent) in done:
                        continue
                    log(f"[{clock():7.1f}s] {spec.title}, latent {latent}x{latent}, batch {settings.batch}")
                    case_started = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
                    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
                    try:
                        if isolate:
                            case_rows, case = _run_case_in_child(model, latent, settings, log, clock())
                        else:
                            case_rows, case = _CaseRunner(spec, latent, settings, available, log, clock, base).run()
                    except Exception as error:  # e.g. the fp32 model does not fit: the other cases still run
                        reason = f"the case failed: {_one_line(error)}"
                        log(f"  {reason}")
                        timed = error.rows if isinstance(error, _CaseKilled) else []
                        case_rows = _salvaged_rows(spec, latent, settings, timed, reason)
                        case = {"model": model, "latent": latent, "error": reason}
                    case.update(
                        started=case_started, load_average_start=load_start, run_started=run_started, command=command
                    )
                    rows.extend(case_rows)
                    cases.append(MappingProxyType(case))
                    if on_case is not None and len(cases) < total:
                        on_case(result(complete=False))
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
    keys = ("cpu", "usable_cpus", "flags", "torch", "threads", "quantized_engine", "packages")
    before_d, now_d = before.to_dict(), now.to_dict()
    differ = [k for k in keys if before_d[k] != now_d[k]]
    if differ:
        details = "; ".join(f"{k}: {before_d[k]!r} there, {now_d[k]!r} now" for k in differ)
        raise QuantDiffError(
            f"cannot resume: the earlier result comes from another machine or software ({details}); "
            "write to another --json file"
        )
