"""Rendering a ``quantdiff bench`` result, CPU or CUDA: the text tables, the markdown report (``RESULTS.md``) and
the targets of issue 4.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from quantdiff.bench.denoisers import DENOISERS, EVAL_TIMESTEP, calibration_timesteps
from quantdiff.bench.results import BenchResult, BenchRow
from quantdiff.bench.settings import BenchSettings


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _speed(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _db(row: BenchRow) -> str:
    if row.identical_to_fp32:
        return "identical"
    return "" if row.sqnr_db is None else f"{row.sqnr_db:.1f}"


def _preset(s: BenchSettings) -> str:
    """Which preset the settings are, or that models / latents / methods were chosen."""
    name = "GPU" if s.baseline == "bf16" else "quick" if s.quick else "full"
    return f"{name} preset" + ("" if s.matches_preset() else " with chosen models, latent sizes or methods")


def _when(iso: str) -> str:
    return iso.replace("T", " ").replace("+00:00", " UTC")


def _case_table(rows: Sequence[BenchRow], s: BenchSettings) -> list[str]:
    """One markdown table: timings against the settings' baseline; memory of the process, or of the GPU."""
    b = s.baseline

    def weights(r: BenchRow) -> str:
        return _mib(r.weight_bytes) + ("" if r.weight_ratio_vs_fp32 is None else f" ({r.weight_ratio_vs_fp32:.2f}x)")

    def one_time(r: BenchRow) -> str:
        return "" if r.one_time_s is None else f"{r.one_time_s:.1f} ({r.setup_s or 0:.1f} + {r.first_call_s or 0:.1f})"

    memory = (
        [("peak GPU MiB", lambda r: _mib(r.device_peak_bytes))]
        if s.cuda
        else [("held MiB", lambda r: _mib(r.held_bytes)), ("peak RSS MiB", lambda r: _mib(r.peak_rss_bytes))]
    )
    columns = [
        ("method", lambda r: r.method),
        ("status", lambda r: r.status),
        ("path", lambda r: r.path or ""),
        ("s / step (median)", lambda r: "" if r.median_s is None else f"{r.median_s:.{4 if s.cuda else 3}f}"),
        (f"vs {b} eager", lambda r: _speed(getattr(r, f"speedup_vs_{b}"))),
        (f"vs best {b}", lambda r: _speed(getattr(r, f"speedup_vs_best_{b}"))),
        ("weights MiB (x fp32)", weights),
        *memory,
        ("SQNR dB", _db),
        ("one-time s (setup + first call)", one_time),
    ]
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]


def _cases(result: BenchResult) -> Iterator[tuple[str, int, list[BenchRow], Mapping[str, Any]]]:
    infos = {(c["model"], c["latent"]): c for c in result.cases}
    keys = list(dict.fromkeys((r.model, r.latent) for r in result.rows))
    for model, latent in keys:
        yield (
            model,
            latent,
            [r for r in result.rows if (r.model, r.latent) == (model, latent)],
            infos.get((model, latent), {}),
        )


def _case_title(model: str, latent: int, batch: int) -> str:
    spec = DENOISERS[model]
    pixels = f" ({latent * 8} px)" if not model.startswith("tiny") else ""
    return f"{spec.title}, latent {latent}x{latent}{pixels}, batch {batch}"


def format_table(result: BenchResult) -> str:
    """The result tables as text (markdown tables, one per model and latent size) plus failure reasons."""
    lines = []
    for model, latent, rows, _ in _cases(result):
        lines += ["", f"{_case_title(model, latent, result.settings.batch)}", *_case_table(rows, result.settings)]
        lines += [f"  {r.method}: {r.status}: {r.reason}" for r in rows if r.status != "ok"]
    return "\n".join(lines).lstrip("\n")


def _targets(result: BenchResult) -> list[str]:
    """Issue 4's targets against what this run measured (only those it has data for)."""
    lines = []
    goals = {("sd15", 64): 1.5, ("sd15", 32): 1.8, ("sd3", 64): 1.6}
    for model, latent, rows, _ in _cases(result):
        by = {r.method: r for r in rows if r.status == "ok"}
        ours = [by[m] for m in ("qd-w8a8", "qd-w8a8-compile") if m in by and by[m].speedup_vs_best_fp32]
        if not ours:
            continue
        best = max(ours, key=lambda r: r.speedup_vs_best_fp32)
        goal = goals.get((model, latent))
        verdict = (
            "" if goal is None else f" (target >= {goal}x: {'met' if best.speedup_vs_best_fp32 >= goal else 'NOT met'})"
        )
        lines.append(
            f"- {model} {latent}x{latent}: best quantdiff W8A8 = {best.method}, "
            f"{best.speedup_vs_best_fp32:.2f}x vs the "
            f"faster fp32 baseline ({best.best_fp32}){verdict}; SQNR {_db(best)} dB"
        )
        faster = [
            f"{r.method} {r.speedup_vs_fp32:.2f}x"
            for r in rows
            if r.kind == "peer" and r.status == "ok" and r.speedup_vs_fp32 and r.speedup_vs_fp32 > best.speedup_vs_fp32
        ]
        lines.append(
            "  - peers faster than it: "
            + (", ".join(faster) if faster else "none")
            + (f" (it: {best.speedup_vs_fp32:.2f}x vs fp32 eager)")
        )
        pt2e = by.get("pt2e-compile")
        if pt2e is not None and pt2e.sqnr_db is not None:
            lines.append(
                f"  - SQNR vs PT2E default: {_db(best)} dB vs {_db(pt2e)} dB at {best.speedup_vs_fp32:.2f}x vs "
                f"{pt2e.speedup_vs_fp32:.2f}x"
            )
        w8 = by.get("qd-w8a8")
        if w8 is not None and w8.weight_ratio_vs_fp32 is not None:
            lines.append(
                f"  - W8 weights in memory (target <= 0.26x): {w8.weight_ratio_vs_fp32:.3f}x of fp32 in integer mode "
                f"(oneDNN's packed int8 copy in place of weight_q, plus the fp32 layers the plan keeps, biases, norms)"
            )
        w4 = by.get("qd-w4a8")
        if w4 is not None and w4.weight_ratio_vs_fp32 is not None:
            lines.append(
                f"  - W4A8 weights in memory (target <= 0.15x): {w4.weight_ratio_vs_fp32:.3f}x of fp32 "
                f"(packed int4 + the fp32 layers the plan keeps; path {w4.path})"
            )
    return lines


def render_markdown(result: BenchResult) -> str:
    """``RESULTS.md``: machine, settings, one table per case, notes, targets and how it was measured."""
    s, b = result.settings, result.settings.baseline
    when = _when(result.started)
    parts = len({case["run_started"] for case in result.cases if case.get("run_started")})
    lines = [
        "# quantdiff bench results",
        "",
        f"Written by `{result.command or 'quantdiff bench'}` on {when}, in {result.duration_s / 60:.1f} min "
        f"({_preset(s)})"
        + ("" if result.complete else "; PARTIAL: the run was still going when this was written")
        + (f"; measured in {parts} resumed parts (`--resume`), each case within one process" if parts > 1 else "")
        + ". Regenerate with the same command; `--json FILE` writes the rows "
        "(schema: `quantdiff.bench` module docstring).",
        "",
        "## Machine",
        "",
        *result.machine.describe(),
        f"- load average at end {result.load_average_end:.2f}",
        "",
        "## Settings",
        "",
        "- models and latent sizes: "
        + "; ".join(f"{m} at {', '.join(f'{x}x{x}' for x in s.latents[m])}" for m in s.models),
        f"- batch {s.batch}"
        + (
            " (one latent: no classifier-free guidance doubling)"
            if s.batch == 1
            else " (e.g. classifier-free guidance)"
        ),
        f"- methods: {', '.join(s.methods)}",
        *([f"- device {s.device}; baseline bf16 eager, fp32 only the SQNR reference"] if b == "bf16" else []),
        f"- timing: {s.warmup} warm-up + {s.repeats} timed rounds per group; every round calls each live method once "
        f"({b} eager included) in a fresh random order; median reported" + ("; CUDA events" if s.cuda else ""),
        f"- calibration (quantdiff and PT2E, the same inputs): {s.calibration_inputs} Gaussian latents at timesteps "
        + ", ".join(f"{t:.0f}" for t in calibration_timesteps(s.calibration_inputs))
        + " with Gaussian text embeddings of the real shapes (SD1.5 77x768; SDXL 77x2048 + pooled 1280 + size ids; "
        "SD3 333x4096 + pooled 2048)",
        f"- evaluation input (timing and SQNR): another Gaussian input at timestep {EVAL_TIMESTEP:.0f}",
        f"- weights: random, seed {s.seed}: Linear/Conv2d N(0, 1/fan_in), norms 1/0, other N(0, 0.02)",
        f"- compile: inductor, freezing {'on' if s.freezing else 'off'}, cold caches (FX graph cache off, a new "
        f"inductor kernel cache per case); threads {result.machine.threads}",
        "",
        "## Results",
    ]
    for model, latent, rows, case in _cases(result):
        lines += ["", f"### {_case_title(model, latent, s.batch)}", ""]
        if case.get("error"):
            lines += [
                f"**This case did not finish** ({case['error']}): the rows below that have times come from the "
                "groups it had timed before; `--resume` measures the case again.",
                "",
            ]
        elif case:
            lines.append(
                f"fp32 weights {_mib(case.get('fp32_weight_bytes'))} MiB ({case.get('parameters', 0) / 1e6:.0f}M "
                f"parameters, {case.get('linear_share', 0) * 100:.0f}% in Linear); {case.get('groups')} timing "
                f"group(s); process base RSS {_mib(case.get('base_rss_bytes'))} MiB"
                + (f"; memory budget {_mib(case['budget_bytes'])} MiB." if case.get("budget_bytes") else ".")
                + (
                    f" Measured from {_when(case['started'])}, load average {case.get('load_average_start', 0):.2f} "
                    "at its start."
                    if case.get("started")
                    else ""
                )
            )
            lines.append("")
        lines += _case_table(rows, s)
        notes = []
        for r in rows:
            if r.status != "ok":
                notes.append(f"- **{r.method}**: {r.status}: {r.reason}")
            elif r.path_detail and r.kind != "fp32":
                notes.append(f"- {r.method}: {r.path_detail}")
            for note in r.notes:
                if r.status == "ok" and "oneDNN int8 kernels, CPU" not in note:
                    notes.append(f"  - {r.method}: {note}")
        notes += [f"- {note}" for note in case.get("notes", ())]
        if notes:
            lines += ["", *notes]
    targets = _targets(result)
    if targets:
        lines += ["", "## Targets (issue 4)", "", *targets]
    lines += [
        "",
        "## How it is measured",
        "",
        "- One process. Each method is built from the fp32 model (converted copies share its fp32 tensors, so no "
        "second fp32 copy is made) and kept alive in a group; a group is timed when the next method would not fit "
        f"the memory budget, then freed. `vs {b} eager` = {b} eager median in the same group / the method's "
        f"median; `vs best {b}` divides by {'fp32-compile' if b == 'fp32' else 'the fastest compiled bf16 row'}'s "
        "own speedup when compiling helped.",
        "- weights: tensor bytes the method holds (prepacked kernel copies included: quantdiff's integer mode "
        "holds oneDNN's packed copy in place of `weight_q`; fp32 layers a method does not quantize count too). held: RSS the "
        "method added when built, after gc + malloc_trim, including what torch.compile added (frozen weight copies, "
        "code). peak RSS: process base + held + the step's measured transient, i.e. a process holding only this "
        "method. one-time: setup (quantize, calibrate, export, convert) + first call (compile included).",
        "- SQNR: the method's output vs fp32 eager on the evaluation input; random weights make this a relative "
        "figure (trained models: `quantdiff eval`).",
        "- `path`: quantdiff rows from `use_integer_kernels`' ExecutionSummary: `integer` (every quantized layer on "
        f"the {'oneDNN' if b == 'fp32' else 'torch._int_mm'} int8 kernel), `reference` (fake-quant path: per-group "
        "or weight-only layers have no int8 kernel), `mixed`; widened int4 layers are listed.",
    ]
    if s.cuda:
        lines.append(
            "- On CUDA each call is timed with CUDA events; peak GPU: `torch.cuda.max_memory_allocated` over one "
            "step (weights included); the memory budget (host RSS) does not apply."
        )
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, path: str | os.PathLike) -> Path:
    """Write :func:`render_markdown` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(result))
    return path
