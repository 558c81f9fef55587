"""Write an :class:`~quantdiff.analysis.statistics.AnalysisReport`: ``report.json``, ``report.md`` and PNG plots.

``report.json`` schema (version 1). Every SQNR is in dB and ``null`` where the layer was never called or its
input quantized exactly; ratios are ``null`` where their denominator is 0::

    {"version": 1,
     "architecture": {"name", "title"},                 # sd15 / sdxl / sd3 / pixart
     "denoiser_class": str,
     "settings": {"timestep_groups", "percentile", "bits": [8, 4], "top_k", "rank_by"},
     "calibration": {"records", "prompts", "mode", "num_inference_steps", "guidance_scale", "model"},
     "timestep_groups": [{"index", "low_edge", "high_edge", "timesteps": [...]}],
                                  # ascending timesteps; group g holds low_edge <= t < high_edge (null: open)
     "seconds": float,            # wall time of the two replays
     "ranking": {"bits": 4, "by": "median_channel" | "tensor",      # called layers, worst first, by
                 "worst_first": [layer name, ...]},                 # sqnr_db_median_channel or sqnr_db at `bits`
     "never_called": [layer name, ...],
     "plots": {"sqnr_by_layer", "absmax_by_group", "channels_worst", "tokens_text_layers"},  # file or null
     "layers": [{                 # every Linear / Conv2d of the denoiser, in named_modules() order
        "name", "index", "type": "Linear" | "Conv2d", "weight_shape": [...],
        "default_ignore": reason | null,           # kept in FP by the architecture's default ignore list
        "reads_text_tokens": bool,                 # input is the call's encoder_hidden_states tensor itself
        "calls": int, "input_shape": [...] | null, # shape of the first call's input
        "input_range": {"calls", "min", "max", "absmax", "percentile"},  # percentile: mean over calls of
                                                                         # each call's settings.percentile of |x|
        "input_range_by_group": [{"calls", "min", "max", "absmax", "percentile"}],   # per timestep group
        "channels": {"count", "median_max_abs", "max_over_median",
                     "top": [{"channel", "max_abs"}]} | null,   # per input channel max |x| over the replay;
                                                                # channel = last dim (Linear), dim 1 (Conv2d)
        "tokens": {"positions",                                 # Linear inputs with a token axis, else null
                   "largest_over_median": {"mean", "max"},      # over calls of: largest token max / median
                   "token0_over_others": {"mean", "max"},       # ... token 0 max / median of the others
                                                                # (per call: the largest over the batch's
                                                                # samples; all-zero samples skipped)
                   "top_positions": [{"position", "max_abs"}]} | null,
        "weight": {"min", "max", "absmax", "std", "excess_kurtosis"},
        "sqnr_db": {"8": float | null, "4": float | null},      # input fake-quantized with one static
                                                                # per-tensor asymmetric min-max scale
        "sqnr_db_median_channel": {"8", "4"},   # the same scale: median over input channels of each
                                                # channel's SQNR (what a typical channel keeps; the tensor
                                                # figure is energy-weighted, so one huge channel hides that
                                                # the others round to zero)
        "sqnr_db_by_group": {"8": [...], "4": [...]}}]}         # the same scale, per timestep group
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

from quantdiff.analysis.statistics import AnalysisReport, LayerAnalysis
from quantdiff.atomic import atomic_directory

REPORT_VERSION = 1

PLOT_SQNR = "sqnr_by_layer.png"
PLOT_ABSMAX = "absmax_by_group.png"
PLOT_CHANNELS = "channels_worst.png"
PLOT_TOKENS = "tokens_text_layers.png"

# Token 0 "is an outlier" when its max |x| is at least this many times the median of the other tokens' maxima
# (mean over calls); a channel likewise against the median channel maximum.
TOKEN_OUTLIER_RATIO = 3.0
CHANNEL_OUTLIER_RATIO = 10.0

# What to look for in each architecture, beside the numbers (report.md's notes).
ARCHITECTURE_NOTES = {
    "sd15": (
        "Cross-attention `attn2.to_k` / `attn2.to_v` read CLIP's token sequence itself. MixDQ found CLIP's first "
        "(BOS) token to carry far larger activations than the others, which stretches one per-tensor scale for "
        "every other token; the outlier-token table says whether this model shows it. The up blocks' ResNets "
        "(`conv1`, `conv_shortcut`) read the skip connection concatenated to the hidden state, channels of two "
        "scales (Q-Diffusion's shortcut splitting, recipe algorithm `shortcut_split`); convolutions see latents "
        "whose range moves with the timestep (the timestep-group table)."
    ),
    "sdxl": (
        "Cross-attention `attn2.to_k` / `attn2.to_v` read the two CLIP encoders' concatenated hidden states "
        "(MixDQ's BOS-token observation applies to both halves). `add_embedding.*` (pooled text and size ids) "
        "is kept in floating point by default."
    ),
    "sd3": (
        "The MMDiT's text stream starts at `context_embedder` (kept in floating point by default: T5/CLIP token "
        "embeddings with outlier channels); the joint attention's `add_q_proj` / `add_k_proj` / `add_v_proj` "
        "read that stream after adaLN modulation. Timesteps are flow-matching sigmas x 1000."
    ),
    "pixart": (
        "`caption_projection.*` reads the T5 embeddings directly (kept in floating point by default); the "
        "cross-attention `attn2.to_k` / `attn2.to_v` read its projected output. `adaln_single.*` makes every "
        "block's modulation and is kept in floating point too."
    ),
}


def write_analysis(
    report: AnalysisReport,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    worst: int = 10,
    title: str | None = None,
) -> Path:
    """Write ``report.json``, ``report.md`` and the PNG plots into the folder ``out``, atomically.

    Args:
        report: what :func:`~quantdiff.analysis.statistics.analyze_denoiser` returned.
        out: the folder to create; an existing one is an error unless ``overwrite``.
        worst: how many of the worst layers the tables and plots show.
        title: the model's name in ``report.md`` (default: the calibration's model path).
    """
    with atomic_directory(out, overwrite=overwrite) as staging:
        plots = write_plots(report, staging, worst=worst)
        document = report.to_dict()
        document["plots"] = plots
        (staging / "report.json").write_text(json.dumps(document, indent=1, allow_nan=False))
        (staging / "report.md").write_text(format_markdown(report, plots, worst=worst, title=title))
    return Path(out)


# ------------------------------------------------------------------------------------------------- tables


def _db(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _token0(layer: LayerAnalysis) -> float | None:
    return None if layer.tokens is None else layer.tokens.token0_over_others_mean


def format_worst_layers(report: AnalysisReport, count: int = 10) -> str:
    """A plain-text table of the ``count`` worst layers at the ranking width (what ``quantdiff analyze`` prints)."""
    bits = sorted(report.settings["bits"], reverse=True)
    ranked = report.ranked()[:count]
    header = (
        ["rank", "layer", "type"]
        + [f"SQNR{b}" for b in bits]
        + [f"med.ch SQNR{report.rank_bits}", "absmax", "ch max/med", "tok0/others"]
    )
    rows = [
        [
            str(rank),
            layer.name + (" (FP by default)" if layer.default_ignore else ""),
            layer.layer_type,
            *[_db(layer.sqnr_db[b]) for b in bits],
            _db(layer.sqnr_db_median_channel[report.rank_bits]),
            _g(layer.overall.absmax),
            _x(layer.channels.ratio if layer.channels else None),
            _x(_token0(layer)),
        ]
        for rank, layer in enumerate(ranked, 1)
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [
        f"worst {len(ranked)} of {len(report.layers)} layers at {report.rank_bits} bits, by "
        f"{report.settings.get('rank_by', 'median_channel').replace('_', '-')} SQNR "
        "(per-tensor min-max input scale, SQNR in dB):"
    ]
    for row in [header] + rows:
        lines.append(
            "  ".join(
                cell.ljust(width) if i == 1 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _group_label(report: AnalysisReport, g: int) -> str:
    members = report.groups.timesteps[g]
    if not members:
        return f"group {g}"
    return f"t {members[0]:g}-{members[-1]:g}" if len(members) > 1 else f"t {members[0]:g}"


def format_markdown(
    report: AnalysisReport, plots: dict[str, str | None], *, worst: int = 10, title: str | None = None
) -> str:
    """``report.md``: the worst layers, ranges per timestep group, outlier channels and tokens, notes, plots."""
    bits = sorted(report.settings["bits"], reverse=True)
    rank_bits = report.rank_bits
    ranked = report.ranked()
    rank_of = {layer.name: rank for rank, layer in enumerate(ranked, 1)}
    ignored = [layer for layer in report.layers if layer.default_ignore]
    calibration = report.calibration
    percentile = report.settings["percentile"]
    lines = [
        f"# quantdiff analyze: {title or calibration.get('model') or report.denoiser_class}",
        "",
        f"{report.architecture.title} (`{report.denoiser_class}`): {len(report.layers)} Linear / Conv2d layers, "
        f"{len(ignored)} of them kept in floating point by default. Calibration: {calibration['records']} denoiser "
        f"calls from {calibration['prompts']} prompts (mode {calibration.get('mode')}, "
        f"{calibration.get('num_inference_steps')} steps), in {len(report.groups)} timestep groups; the two replays "
        f"took {report.seconds:.1f} s.",
        "",
        f"SQNR: each call's input fake-quantized with one static per-tensor asymmetric min-max scale (the range "
        f"over the whole replay), signal and noise energies summed over the calls; the median-channel SQNR uses "
        f"the same scale, per input channel, and takes the median channel. One channel far larger than the rest "
        f"carries most of the energy and lifts the tensor figure while the other channels round to zero; the "
        f"median channel shows it. Layers ranked by the {rank_bits}-bit "
        f"{'median-channel' if report.settings.get('rank_by', 'median_channel') == 'median_channel' else 'tensor'} "
        f"SQNR, worst first.",
        "",
        f"## Worst {min(worst, len(ranked))} layers at {rank_bits} bits",
        "",
    ]
    header = [
        "rank",
        "layer",
        "type",
        *[f"SQNR {b}-bit (dB)" for b in bits],
        f"median-channel SQNR {rank_bits}-bit (dB)",
        "input min / max",
        f"p{percentile:g} of abs(x)",
        "channel max / median (top channel)",
        "token max / median",
        "token 0 / others",
        "weight kurtosis",
    ]
    rows = []
    for layer in ranked[:worst]:
        top_channel = f" ({layer.channels.top[0][0]})" if layer.channels and layer.channels.top else ""
        rows.append(
            [
                str(rank_of[layer.name]),
                f"`{layer.name}`" + (" (FP by default)" if layer.default_ignore else ""),
                layer.layer_type,
                *[_db(layer.sqnr_db[b]) for b in bits],
                _db(layer.sqnr_db_median_channel[rank_bits]),
                f"{_g(layer.overall.min)} / {_g(layer.overall.max)}",
                _g(layer.overall.percentile),
                _x(layer.channels.ratio if layer.channels else None) + top_channel,
                _x(layer.tokens.largest_over_median_mean if layer.tokens else None),
                _x(_token0(layer)),
                _g(layer.weights.excess_kurtosis),
            ]
        )
    lines += _markdown_table(header, rows) + [""]
    other = "tensor" if report.settings.get("rank_by", "median_channel") == "median_channel" else "median_channel"
    other_figure = "sqnr_db" if other == "tensor" else "sqnr_db_median_channel"
    lines += [
        f"By the {other.replace('_', '-')} SQNR instead, the worst five: "
        + ", ".join(
            f"`{layer.name}` ({_db(getattr(layer, other_figure)[rank_bits])} dB)"
            for layer in report.ranked(by=other)[:5]
        )
        + ".",
        "",
    ]
    if plots.get("sqnr_by_layer"):
        lines += [f"![SQNR per layer]({plots['sqnr_by_layer']})", ""]

    lines += [f"## Input absmax per timestep group (worst {min(worst, len(ranked))} layers)", ""]
    group_header = ["layer"] + [_group_label(report, g) for g in range(len(report.groups))]
    group_rows = [
        [f"`{layer.name}`"] + [_g(stats.absmax if stats.calls else None) for stats in layer.by_group]
        for layer in ranked[:worst]
    ]
    lines += _markdown_table(group_header, group_rows) + [""]
    edges = ", ".join(f"{edge:g}" for edge in report.groups.edges) or "none (one group)"
    lines += [f"Group edges (ascending timesteps): {edges}.", ""]
    if plots.get("absmax_by_group"):
        lines += [f"![Input absmax per timestep group]({plots['absmax_by_group']})", ""]

    lines += ["## Outlier channels", ""]
    by_channel_ratio = sorted(
        (layer for layer in ranked if layer.channels and layer.channels.ratio), key=lambda layer: -layer.channels.ratio
    )
    # Layers fed the same tensor (every ResNet's time_emb_proj reads SiLU(time embedding)) make one row.
    same_input: dict[tuple, list[LayerAnalysis]] = {}
    for layer in by_channel_ratio:
        same_input.setdefault((layer.input_shape, tuple(layer.channels.max_abs.tolist())), []).append(layer)
    channel_rows = [
        [
            f"`{layers[0].name}`" + (f" and {len(layers) - 1} more with the same input" if len(layers) > 1 else ""),
            ", ".join(str(rank_of[layer.name]) for layer in layers[:3]) + (", ..." if len(layers) > 3 else ""),
            _x(layers[0].channels.ratio),
            _g(layers[0].channels.median),
            ", ".join(f"{c} ({v:.3g})" for c, v in layers[0].channels.top[:5]),
        ]
        for layers in list(same_input.values())[:worst]
    ]
    lines += _markdown_table(
        ["layer", f"rank at {rank_bits} bits", "max / median", "median channel max", "top channels (max abs(x))"],
        channel_rows,
    ) + [""]
    if plots.get("channels_worst"):
        lines += [f"![Per-channel max abs(x) of the worst layer]({plots['channels_worst']})", ""]

    lines += ["## Outlier tokens", ""]
    text_inputs = distinct_text_inputs(report)
    if text_inputs:
        lines += [
            "Layers that read the text encoder's output (`encoder_hidden_states`) directly, one row per input:",
            "",
        ]
        token_rows = [
            [
                f"`{layer.name}`" + (f" and {len(others)} more" if others else ""),
                str(rank_of.get(layer.name, "-")),
                f"{_x(layer.tokens.token0_over_others_mean)} (max {_x(layer.tokens.token0_over_others_max)})",
                _x(layer.tokens.largest_over_median_mean),
                ", ".join(str(p) for p, _ in layer.tokens.top[:5]),
            ]
            for layer, others in text_inputs
        ]
        lines += _markdown_table(
            ["layers", f"rank at {rank_bits} bits", "token 0 / others", "largest / median", "top positions"],
            token_rows,
        ) + [""]
    by_token0 = sorted((layer for layer in ranked if _token0(layer)), key=lambda layer: -_token0(layer))
    if by_token0:
        lines += ["Largest token-0 ratios of all Linear layers:", ""]
        lines += _markdown_table(
            ["layer", "token 0 / others (mean, max over calls)", "largest / median"],
            [
                [
                    f"`{layer.name}`",
                    f"{_x(_token0(layer))}, {_x(layer.tokens.token0_over_others_max)}",
                    _x(layer.tokens.largest_over_median_mean),
                ]
                for layer in by_token0[:5]
            ],
        ) + [""]
    if plots.get("tokens_text_layers"):
        lines += [f"![Per-position max abs(x) of the text-reading layers]({plots['tokens_text_layers']})", ""]

    lines += [f"## Notes ({report.architecture.title})", ""]
    lines += [f"- {note}" for note in architecture_notes(report, worst=worst)] + [""]

    if ignored:
        lines += ["## Default-ignored layers", ""]
        lines += _markdown_table(
            ["layer", f"rank at {rank_bits} bits", *[f"SQNR {b}-bit (dB)" for b in bits], "why it stays in FP"],
            [
                [
                    f"`{layer.name}`",
                    str(rank_of.get(layer.name, "-")),
                    *[_db(layer.sqnr_db[b]) for b in bits],
                    layer.default_ignore,
                ]
                for layer in ignored
            ],
        ) + [""]
    return "\n".join(lines)


def distinct_text_inputs(report: AnalysisReport) -> list[tuple[LayerAnalysis, list[LayerAnalysis]]]:
    """The layers that read the text encoder's output, grouped by input: in a UNet every cross-attention
    ``to_k`` / ``to_v`` reads the same tensor and so has the same token statistics. ``(first layer, the others)``."""
    groups: dict[tuple, tuple[LayerAnalysis, list[LayerAnalysis]]] = {}
    for layer in report.layers:
        if layer.reads_text_tokens and layer.tokens is not None:
            key = (layer.input_shape, tuple(layer.tokens.position_max.tolist()))
            if key in groups:
                groups[key][1].append(layer)
            else:
                groups[key] = (layer, [])
    return list(groups.values())


def _kind(name: str) -> str:
    """A layer's role without its block indices: ``down_blocks.0.attentions.1.proj_in`` -> ``attentions.proj_in``."""
    parts = [part for part in name.split(".") if not part.isdigit()]
    return ".".join(parts[-2:]) if len(parts) > 1 else name


def architecture_notes(report: AnalysisReport, *, worst: int = 10) -> list[str]:
    """The per-architecture notes of ``report.md``: the architecture's known trouble spots, then what the
    numbers say about them (worst kinds of layers, token 0, timestep drift, outlier channels, FP layers)."""
    ranked = report.ranked()
    rank_bits = report.rank_bits
    notes = []
    if report.architecture.name in ARCHITECTURE_NOTES:
        notes.append(ARCHITECTURE_NOTES[report.architecture.name])
    if ranked:
        head = ranked[:worst]
        kinds = collections.Counter(_kind(layer.name) for layer in head).most_common(3)
        types = collections.Counter(layer.layer_type for layer in head)
        notes.append(
            f"The {len(head)} worst layers at {rank_bits} bits: "
            + ", ".join(f"{count} {kind}" for kind, count in sorted(types.items()))
            + "; most frequent roles: "
            + ", ".join(f"`{kind}` ({count})" for kind, count in kinds)
            + "."
        )
    text_inputs = [(layer, others) for layer, others in distinct_text_inputs(report) if _token0(layer) is not None]
    for layer, others in text_inputs:
        ratio = _token0(layer)
        verdict = "an outlier" if ratio >= TOKEN_OUTLIER_RATIO else "not an outlier"
        readers = f"`{layer.name}`" + (f" and {len(others)} other layers" if others else "")
        notes.append(
            f"Token 0 of the text encoder's output (read by {readers}): its max abs(x) is {ratio:.1f}x the median "
            f"of the other tokens' maxima (mean over calls; largest call {_x(layer.tokens.token0_over_others_max)}): "
            f"{verdict} (threshold {TOKEN_OUTLIER_RATIO:g}x)."
        )
    if not text_inputs:
        notes.append("No Linear layer reads the text encoder's output tensor itself (it is projected first).")
    by_token0 = [layer for layer in ranked if _token0(layer) is not None]
    if by_token0:
        top = max(by_token0, key=_token0)
        notes.append(
            f"Largest token-0 ratio of any Linear input: `{top.name}` ({_token0(top):.1f}x the median of the "
            f"other tokens' maxima)."
        )
    drifts = []
    for layer in ranked:
        peaks = [stats.absmax for stats in layer.by_group if stats.calls and stats.absmax > 0]
        if len(peaks) > 1:
            drifts.append((max(peaks) / min(peaks), layer))
    if drifts:
        drift, layer = max(drifts, key=lambda item: item[0])
        peaks = [_g(stats.absmax if stats.calls else None) for stats in layer.by_group]
        notes.append(
            f"Timestep dependence: `{layer.name}` has the largest spread of input absmax across the timestep "
            f"groups ({drift:.1f}x: {' / '.join(peaks)}, ascending timesteps); per-timestep-group input scales "
            f"(recipe algorithm `timestep_groups`) help layers like it."
        )
    with_channels = [layer for layer in ranked if layer.channels and layer.channels.ratio]
    if with_channels:
        strong = [layer for layer in with_channels if layer.channels.ratio >= CHANNEL_OUTLIER_RATIO]
        top = max(with_channels, key=lambda layer: layer.channels.ratio)
        notes.append(
            f"Outlier channels: {len(strong)} of {len(with_channels)} layers have a channel whose max abs(x) is "
            f"{CHANNEL_OUTLIER_RATIO:g}x the median channel's or more; the largest ratio is `{top.name}` "
            f"({top.channels.ratio:.1f}x, channel {top.channels.top[0][0]}). Channel balancing (recipe algorithm "
            f"`smoothquant`: input pre-scales folded into the weights) targets these."
        )
    ignored = [layer for layer in ranked if layer.default_ignore]
    if ignored:
        rank_of = {layer.name: rank for rank, layer in enumerate(ranked, 1)}
        notes.append(
            "Default-ignored layers rank "
            + ", ".join(f"`{layer.name}` {rank_of[layer.name]}" for layer in ignored)
            + f" of {len(ranked)} at {rank_bits} bits."
        )
    never = [layer.name for layer in report.layers if not layer.calls]
    if never:
        notes.append(
            f"{len(never)} layers were never called during the replay: "
            + ", ".join(f"`{name}`" for name in never[:5])
            + ("..." if len(never) > 5 else "")
            + "."
        )
    return notes


# -------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # A Figure with its own Agg canvas: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def write_plots(report: AnalysisReport, folder: Path, *, worst: int = 10) -> dict[str, str | None]:
    """Draw the PNG plots into ``folder``; returns plot key -> file name (``None`` where there is nothing to draw)."""
    ranked = report.ranked()
    plots: dict[str, str | None] = dict.fromkeys(
        ("sqnr_by_layer", "absmax_by_group", "channels_worst", "tokens_text_layers")
    )
    if not ranked:
        return plots
    _plot_sqnr(report, folder / PLOT_SQNR, worst=min(worst, 5))
    plots["sqnr_by_layer"] = PLOT_SQNR
    _plot_absmax(report, ranked[: min(worst, 6)], folder / PLOT_ABSMAX)
    plots["absmax_by_group"] = PLOT_ABSMAX
    if ranked[0].channels is not None:
        _plot_channels(ranked[0], report, folder / PLOT_CHANNELS)
        plots["channels_worst"] = PLOT_CHANNELS
    text_inputs = distinct_text_inputs(report)
    if text_inputs:
        _plot_tokens(text_inputs, folder / PLOT_TOKENS)
        plots["tokens_text_layers"] = PLOT_TOKENS
    return plots


def _plot_sqnr(report: AnalysisReport, path: Path, *, worst: int) -> None:
    bits = sorted(report.settings["bits"], reverse=True)
    called = [layer for layer in report.layers if layer.calls]
    figure = _figure(min(16.0, max(8.0, len(report.layers) * 0.06)), 4.5)
    axes = figure.add_subplot()
    for b, colour in zip(
        bits, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray"), strict=False
    ):
        points = [
            (layer.index, layer.sqnr_db[b])
            for layer in called
            if layer.sqnr_db[b] is not None and math.isfinite(layer.sqnr_db[b])
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker=".", linewidth=0.8, color=colour, label=f"{b}-bit")
        ignored = [
            (layer.index, layer.sqnr_db[b])
            for layer in called
            if layer.default_ignore and layer.sqnr_db[b] is not None and math.isfinite(layer.sqnr_db[b])
        ]
        if ignored:
            xs, ys = zip(*ignored, strict=True)
            axes.scatter(
                xs,
                ys,
                s=40,
                facecolors="none",
                edgecolors="black",
                zorder=3,
                label="FP by default" if b == bits[0] else None,
            )
    median_channel = [
        (layer.index, layer.sqnr_db_median_channel[report.rank_bits])
        for layer in called
        if layer.sqnr_db_median_channel[report.rank_bits] is not None
    ]
    if median_channel:
        xs, ys = zip(*median_channel, strict=True)
        axes.plot(
            xs, ys, linestyle="--", linewidth=0.8, color="tab:gray", label=f"{report.rank_bits}-bit, median channel"
        )
    by_median_channel = report.settings.get("rank_by", "median_channel") == "median_channel"
    for layer in report.ranked()[:worst]:
        value = (layer.sqnr_db_median_channel if by_median_channel else layer.sqnr_db)[report.rank_bits]
        if value is not None and math.isfinite(value):
            axes.annotate(
                layer.name, (layer.index, value), fontsize=6, rotation=20, xytext=(3, -10), textcoords="offset points"
            )
    axes.set_xlabel("layer (module order)")
    axes.set_ylabel("input SQNR (dB), per-tensor min-max")
    axes.set_title(f"{report.architecture.title}: per-layer input SQNR")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _plot_absmax(report: AnalysisReport, layers: list[LayerAnalysis], path: Path) -> None:
    figure = _figure(8.0, 4.5)
    axes = figure.add_subplot()
    labels = [_group_label(report, g) for g in range(len(report.groups))]
    for layer in layers:
        values = [stats.absmax if stats.calls else math.nan for stats in layer.by_group]
        axes.plot(range(len(labels)), values, marker="o", label=layer.name)
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlabel("timestep group (ascending timesteps)")
    axes.set_ylabel("input absmax")
    peaks = [stats.absmax for layer in layers for stats in layer.by_group if stats.calls]
    if peaks and min(peaks) > 0 and max(peaks) / min(peaks) > 20:  # a log axis only where ranges differ widely
        axes.set_yscale("log")
    axes.set_title(f"Input absmax per timestep group, worst {len(layers)} layers at {report.rank_bits} bits")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path)


def _plot_channels(layer: LayerAnalysis, report: AnalysisReport, path: Path) -> None:
    channels = layer.channels
    values = channels.max_abs.tolist()
    figure = _figure(10.0, 4.0)
    axes = figure.add_subplot()
    top = {c for c, _ in channels.top}
    colours = ["tab:red" if c in top else "tab:blue" for c in range(len(values))]
    axes.bar(range(len(values)), values, width=1.0, color=colours)
    axes.axhline(channels.median, color="black", linestyle="--", linewidth=0.8, label=f"median {channels.median:.3g}")
    for c, v in channels.top[:3]:
        axes.annotate(str(c), (c, v), fontsize=7, xytext=(2, 2), textcoords="offset points")
    axes.set_xlabel("input channel")
    axes.set_ylabel("max abs(x)")
    axes.set_title(
        f"{layer.name}: per-channel max abs(x) (max / median {_x(channels.ratio)}), worst at {report.rank_bits} bits",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _plot_tokens(text_inputs: list[tuple[LayerAnalysis, list[LayerAnalysis]]], path: Path) -> None:
    figure = _figure(8.0, 4.0)
    axes = figure.add_subplot()
    shown = text_inputs[:6]
    for layer, others in shown:
        label = layer.name + (f" (+{len(others)} with the same input)" if others else "")
        axes.plot(layer.tokens.position_max.tolist(), marker=".", linewidth=0.8, label=label)
    axes.set_xlabel("token position")
    axes.set_ylabel("max abs(x) over the replay")
    axes.set_title("Per-position max abs(x) of the inputs that are the text encoder's output", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path)


__all__ = [
    "REPORT_VERSION",
    "architecture_notes",
    "format_markdown",
    "format_worst_layers",
    "write_analysis",
    "write_plots",
]
