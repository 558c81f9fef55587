"""What ``quantdiff search`` writes beside the recipe: ``<stem>.search.json``, ``<stem>.search.md`` and two plots
(``<stem>.sensitivity.png``: each layer's sensitivity per candidate; ``<stem>.allocation.png``: the chosen
bits over the network), plus the cost estimate of the same search on real-size UNets."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantdiff.search.mixed import SearchResult, SearchSettings
from quantdiff.search.sensitivity import (
    CONTENT,
    FLOAT_BITS,
    INPUT,
    SQNR,
    SSIM,
    WEIGHT,
    SensitivityResults,
    SensitivitySettings,
)

REPORT_VERSION = 1
_COLOURS = {2: "tab:red", 3: "tab:orange", 4: "tab:blue", 5: "tab:cyan", 6: "tab:olive", 8: "tab:green"}


def report_paths(recipe_path: Path) -> dict[str, Path]:
    stem = recipe_path.with_suffix("")
    return {
        "json": Path(f"{stem}.search.json"),
        "markdown": Path(f"{stem}.search.md"),
        "sensitivity_plot": Path(f"{stem}.sensitivity.png"),
        "allocation_plot": Path(f"{stem}.allocation.png"),
    }


def timing_summary(results: SensitivityResults, settings: SensitivitySettings) -> dict[str, Any]:
    """Seconds per measured entry by metric, and the entries each metric needs per layer."""
    by_metric: dict[str, list[float]] = {SQNR: [], SSIM: []}
    for key, seconds in results.seconds.items():
        entry = results.entries.get(key)
        if entry is not None:
            by_metric[entry.metric].append(seconds)
    return {
        "entries": {metric: len(values) for metric, values in by_metric.items()},
        "seconds": {metric: round(sum(values), 1) for metric, values in by_metric.items()},
        "seconds_per_entry": {
            metric: (round(sum(values) / len(values), 3) if values else None) for metric, values in by_metric.items()
        },
        "candidates_per_layer": len(settings.weight_bits) + len(settings.measured_input_bits()),
        "records_per_sqnr_entry": settings.records,
        "images_per_ssim_entry": settings.images,
    }


def estimate_search(
    layer_groups: Mapping[str, int],
    candidates_per_layer: int,
    records: int,
    images: int,
    steps: int,
    guidance_batches: int,
    seconds_per_call: float,
    images_per_call: int,
) -> dict[str, float]:
    """Denoiser calls and hours of the sensitivity measurement on a model with ``layer_groups`` layers.

    A quality entry replays ``records`` recorded calls; a content entry generates ``images`` images of
    ``steps`` steps, ``images_per_call`` per denoiser call (with classifier-free guidance each call carries
    ``guidance_batches`` = 2 batch rows per image, which ``seconds_per_call`` must be measured at).
    """
    quality_calls = layer_groups.get("quality", 0) * candidates_per_layer * records
    content_calls = layer_groups.get(CONTENT, 0) * candidates_per_layer * math.ceil(images / images_per_call) * steps
    calls = quality_calls + content_calls
    return {
        "quality_calls": quality_calls,
        "content_calls": content_calls,
        "hours": round(calls * seconds_per_call / 3600, 2),
        "guidance_batches": guidance_batches,
    }


def write_search_report(
    result: SearchResult,
    results: SensitivityResults,
    settings: SearchSettings,
    sensitivity: SensitivitySettings,
    recipe_path: Path,
    *,
    model: str,
    seconds: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the JSON report, the Markdown summary and both plots beside ``recipe_path``."""
    paths = report_paths(recipe_path)
    timing = timing_summary(results, sensitivity)
    data = {
        "version": REPORT_VERSION,
        "model": model,
        "recipe": str(recipe_path),
        "settings": {**asdict(settings), "sensitivity": sensitivity.to_dict()},
        "averages": result.averages,
        "bits": {name: list(bits) for name, bits in result.bits.items()},
        "layers": [asdict(layer) for layer in result.layers],
        "sensitivity": {key: asdict(entry) for key, entry in sorted(results.entries.items())},
        "candidates": [_candidate_dict(c) for c in result.candidates],
        "notes": result.notes,
        "seconds": {**dict(seconds), **result.seconds},
        "timing": timing,
        **(dict(extra) if extra else {}),
    }
    paths["json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
    paths["markdown"].write_text(format_markdown(result, settings, sensitivity, data))
    plot_sensitivity(results, sensitivity, settings, paths["sensitivity_plot"])
    plot_allocation(result, paths["allocation_plot"])
    return paths


def _candidate_dict(candidate) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for w, a in candidate.bits.values():
        counts[f"W{w}A{a}"] = counts.get(f"W{w}A{a}", 0) + 1
    return {
        "phase": candidate.phase,
        "k": candidate.k,
        "objective": candidate.objective,
        "budgets_used": dict(candidate.budgets),
        "ssim": candidate.ssim,
        "alignment": candidate.alignment,
        "layers_by_bits": dict(sorted(counts.items())),
        "chosen": candidate.note == "chosen",
    }


def _bits_table(result: SearchResult) -> list[str]:
    groups = sorted({layer.group for layer in result.layers})
    rows = []
    for group in groups:
        members = [layer for layer in result.layers if layer.group == group]
        weights: dict[int, int] = {}
        inputs: dict[int, int] = {}
        for layer in members:
            w, a = result.bits[layer.name]
            weights[w] = weights.get(w, 0) + 1
            inputs[a] = inputs.get(a, 0) + 1
        params = sum(layer.params for layer in members)
        mean = sum(result.bits[layer.name][0] * layer.params for layer in members) / max(params, 1)
        rows.append(
            f"| {group} | {len(members)} | {params:,} | {mean:.2f} | "
            + ", ".join(f"{w}-bit: {n}" for w, n in sorted(weights.items()))
            + " | "
            + ", ".join(("float" if a == FLOAT_BITS else f"{a}-bit") + f": {n}" for a, n in sorted(inputs.items()))
            + " |"
        )
    return [
        "| group | layers | weights | avg weight bits | weight bits | input bits |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def format_markdown(result: SearchResult, settings: SearchSettings, sensitivity: SensitivitySettings, data) -> str:
    avg = result.averages
    timing = data["timing"]
    lines = [
        f"# quantdiff search: {data['model']}",
        "",
        f"Target: weights {settings.weight_bits:g} bits on average ({settings.cost} bits, parameter-weighted), inputs "
        f"{settings.input_bits:g} bits (input-size-weighted). Reached: weights {avg['weight_bits']:.3f} nominal / "
        f"{avg['weight_bits_stored']:.3f} stored bits, inputs {avg['input_bits']:.3f} bits.",
        "",
        f"Sensitivity: weights {sensitivity.weights.describe()} at {list(sensitivity.weight_bits)} bits, inputs "
        f"{sensitivity.activations.describe()} at {list(sensitivity.measured_input_bits())} bits; "
        + (
            "content layers (cross-attention, feed-forward) by SSIM of images against float, the others by the "
            "denoiser output's SQNR (metric-decoupled, MixDQ)"
            if settings.decoupled
            else "every layer by the denoiser output's SQNR (no metric decoupling)"
        )
        + f"; BOS-aware {'on' if settings.bos_aware else 'off'}; objective: {settings.objective}.",
        "",
        *_bits_table(result),
        "",
        "## Candidates",
        "",
        "| phase | k | objective | SSIM vs FP | alignment | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for c in data["candidates"]:
        ssim = "-" if c["ssim"] is None else f"{c['ssim']:.4f}"
        alignment = "-" if c["alignment"] is None else f"{100 * c['alignment']:.1f}%"
        lines.append(
            f"| {c['phase']} | {c['k']:g} | {c['objective']:.5g} | {ssim} | {alignment} | {'yes' if c['chosen'] else ''} |"
        )
    lines += ["", "## Time", ""]
    seconds = data["seconds"]
    lines.append(
        "- " + ", ".join(f"{name}: {value:.1f} s" for name, value in seconds.items() if isinstance(value, (int, float)))
    )
    per = timing["seconds_per_entry"]
    lines.append(
        f"- sensitivity entries: {timing['entries'][SQNR]} SQNR ({per[SQNR]} s each, {timing['records_per_sqnr_entry']} "
        f"records), {timing['entries'][SSIM]} SSIM ({per[SSIM]} s each, {timing['images_per_ssim_entry']} images)"
    )
    for name, estimate in data.get("estimates", {}).items():
        lines.append(f"- estimate, {name}: {estimate}")
    if result.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in result.notes]]
    lines += [
        "",
        f"Plots: `{Path(data['recipe']).with_suffix('').name}.sensitivity.png` (each layer's sensitivity per candidate), "
        f"`{Path(data['recipe']).with_suffix('').name}.allocation.png` (the chosen bits over the network).",
    ]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    # A Figure with its own Agg canvas: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_sensitivity(
    results: SensitivityResults, sensitivity: SensitivitySettings, settings: SearchSettings, path: Path
) -> None:
    """Four panels: weights / inputs (columns) x quality SQNR / content SSIM (rows), one line per bit width,
    layers in module order."""
    layers = [layer for layer in results.layers if not layer.protected]
    index = {layer.name: i for i, layer in enumerate(layers)}
    rows = [(SQNR, "output SQNR (dB)")] + ([(SSIM, "image SSIM vs FP")] if settings.decoupled else [])
    figure = _figure(min(18.0, max(9.0, len(layers) * 0.09)), 3.2 * len(rows))
    for r, (metric, label) in enumerate(rows):
        for c, (kind, bits_list) in enumerate(
            ((WEIGHT, sensitivity.weight_bits), (INPUT, sensitivity.measured_input_bits()))
        ):
            axes = figure.add_subplot(len(rows), 2, 2 * r + c + 1)
            for bits in sorted(bits_list):
                points = [
                    (index[layer.name], entry.value)
                    for layer in layers
                    if (entry := results.value(layer.name, kind, bits, metric)) is not None
                    and math.isfinite(entry.value)
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    axes.plot(
                        xs, ys, marker=".", linewidth=0.6, color=_COLOURS.get(bits, "tab:gray"), label=f"{bits}-bit"
                    )
            axes.set_title(f"{kind}s: {label}", fontsize=9)
            axes.set_xlabel("layer (module order)", fontsize=8)
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def plot_allocation(result: SearchResult, path: Path) -> None:
    """The chosen weight and input bits per layer in module order, content layers shaded."""
    layers = result.layers
    figure = _figure(min(18.0, max(9.0, len(layers) * 0.09)), 5.0)
    for row, (position, label) in enumerate(((0, "weight bits"), (1, "input bits"))):
        axes = figure.add_subplot(2, 1, row + 1)
        for i, layer in enumerate(layers):
            bits = result.bits[layer.name][position]
            shown = 16 if bits == FLOAT_BITS else bits
            colour = "tab:gray" if layer.protected else ("tab:purple" if layer.group == CONTENT else "tab:blue")
            axes.bar(i, shown, color=colour, width=0.85)
        axes.set_ylabel(label, fontsize=8)
        axes.set_yticks(sorted({16 if b[position] == FLOAT_BITS else b[position] for b in result.bits.values()}))
        axes.grid(alpha=0.3, axis="y")
    axes.set_xlabel("layer (module order); purple: content, blue: quality, gray: protected", fontsize=8)
    avg = result.averages
    figure.suptitle(
        f"weights {avg['weight_bits']:.2f} bits on average ({avg['weight_bits_stored']:.2f} stored), inputs "
        f"{avg['input_bits']:.2f}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
