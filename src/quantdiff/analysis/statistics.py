"""Per-layer activation and weight statistics of a floating-point denoiser, gathered while a calibration set
is replayed (the numbers behind ``quantdiff analyze``).

Two replays, both with :class:`~quantdiff.calibration.taps.Taps` on every candidate layer and a
:func:`~quantdiff.calibration.timestep.step_clock` to know each call's timestep:

1. **ranges**: per timestep group min / max / absmax and a high percentile of ``|x|``; per input channel
   max ``|x|``; per token max ``|x|`` (Linear inputs with a token axis), summarised per call;
2. **SQNR**: each call's input fake-quantized with the one static per-tensor asymmetric min-max scale the
   first replay found (what a static per-tensor recipe would use), signal and noise energies summed over
   the replay, for each bit width: for the whole tensor, per timestep group, and per input channel (whose
   median is the default ranking figure: see :meth:`AnalysisReport.ranked`).

Memory is bounded whatever the calibration set's size: per layer a few numbers per timestep group, one
``(C_in,)`` vector of channel maxima and one vector of per-position token maxima; no input is kept.
"""

from __future__ import annotations

import bisect
import fnmatch
import inspect
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantdiff.algorithms.timestep_groups import group_edges
from quantdiff.calibration.dataset import CalibrationSet
from quantdiff.calibration.taps import Taps
from quantdiff.calibration.timestep import step_clock
from quantdiff.errors import QuantDiffError
from quantdiff.pipelines.architectures import Architecture, architecture_of
from quantdiff.primitives import compute_qparams, fake_quantize

# The layer kinds resolve_plan considers: exact types, as it matches them (a subclass may change forward()).
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

# kthvalue over more values than this is estimated from an even stride of the call's |x| (a few ms instead of
# a few hundred on SDXL-sized inputs; the estimate of a 99.9th percentile from 4M samples is within ~1%).
_PERCENTILE_MAX_VALUES = 1 << 22


# What the ranking sorts by (see AnalysisReport.ranked and LayerAnalysis.sqnr_db_median_channel for why the
# median channel is the default).
RANK_BY = ("median_channel", "tensor")


class AnalysisError(QuantDiffError):
    """The analysis cannot run with these settings or this calibration data."""


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TimestepGrouping:
    """The calibration timesteps cut into groups of (nearly) equal numbers of distinct timesteps.

    The same grouping as the ``timestep_groups`` algorithm (``group_edges``) and the same convention as a
    quantized layer's per-group input scales (``timestep_edges``): groups in ascending
    timestep order, group ``g`` holds the timesteps ``t`` with ``edges[g-1] <= t < edges[g]``.

    Attributes:
        edges: ``G - 1`` ascending boundaries, each halfway between the neighbouring groups' timesteps.
        timesteps: the distinct calibration timesteps of each group, ascending.
    """

    edges: tuple[float, ...]
    timesteps: tuple[tuple[float, ...], ...]

    @classmethod
    def of(cls, timesteps: Sequence[float], groups: int) -> TimestepGrouping:
        """Groups of the distinct values of ``timesteps`` (at most ``groups``; fewer if there are fewer values)."""
        if groups < 1:
            raise AnalysisError(f"the number of timestep groups must be at least 1, got {groups}")
        distinct = sorted({float(t) for t in timesteps if not math.isnan(float(t))})
        if not distinct:  # calls without a timestep (recorded as nan): one group
            return cls((), ((),))
        count = min(groups, len(distinct))
        edges = tuple(group_edges(distinct, count))  # the grouping the timestep_groups algorithm will use
        members: list[list[float]] = [[] for _ in range(count)]
        for t in distinct:
            members[bisect.bisect_right(edges, t)].append(t)
        return cls(edges, tuple(tuple(group) for group in members))

    def __len__(self) -> int:
        return len(self.timesteps)

    def group_of(self, timestep: float | None) -> int:
        """The group of a call's timestep (the first group when the call has none)."""
        if timestep is None or math.isnan(timestep):
            return 0
        return bisect.bisect_right(self.edges, timestep)

    def to_dict(self) -> list[dict[str, Any]]:
        return [
            {
                "index": g,
                "low_edge": self.edges[g - 1] if g else None,
                "high_edge": self.edges[g] if g < len(self.edges) else None,
                "timesteps": list(members),
            }
            for g, members in enumerate(self.timesteps)
        ]


@dataclass
class RangeStats:
    """Input range over some calls. ``percentile`` is the mean over those calls of each call's percentile of
    ``|x|`` (``None`` before any call)."""

    calls: int = 0
    min: float = math.inf
    max: float = -math.inf
    absmax: float = 0.0
    percentile: float | None = None

    def to_dict(self) -> dict[str, Any]:
        called = self.calls > 0
        return {
            "calls": self.calls,
            "min": self.min if called else None,
            "max": self.max if called else None,
            "absmax": self.absmax if called else None,
            "percentile": self.percentile,
        }


@dataclass
class ChannelStats:
    """Per input channel max ``|x|`` over the replay.

    Attributes:
        max_abs: ``(C_in,)`` float32, the maximum of ``|x|`` of each input channel.
        median: median of ``max_abs``.
        ratio: ``max_abs.max() / median`` (``None`` when the median is 0).
        top: the ``top_k`` channels with the largest maxima, ``(channel, max |x|)``, largest first.
    """

    max_abs: Tensor
    median: float
    ratio: float | None
    top: list[tuple[int, float]]

    @classmethod
    def of(cls, max_abs: Tensor, top_k: int) -> ChannelStats:
        median = float(max_abs.median())
        values, indices = max_abs.topk(min(top_k, max_abs.numel()))
        top = [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]
        return cls(max_abs, median, _ratio(float(max_abs.max()), median), top)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": int(self.max_abs.numel()),
            "median_max_abs": self.median,
            "max_over_median": self.ratio,
            "top": [{"channel": c, "max_abs": v} for c, v in self.top],
        }


@dataclass
class TokenStats:
    """Per token max ``|x|`` of a Linear input with a token axis (the dimension before the channels).

    Each call is summarised by two ratios of its ``(B, T)`` token maxima, computed per sample of the batch and
    the largest taken (samples whose median is 0, such as SDXL's all-zero unconditional text, are skipped):
    the largest token max over the median token max, and token 0's max over the median of the other tokens'
    maxima. The replay keeps the mean over calls and the largest of each, and the running max per position.

    Attributes:
        positions: token positions seen (the longest sequence).
        largest_over_median_mean, largest_over_median_max: per-call largest / median, mean and max over calls.
        token0_over_others_mean, token0_over_others_max: per-call token 0 / median of the others (``None``
            for single-token inputs).
        position_max: ``(T,)`` float32, max ``|x|`` at each position over the replay.
        top: the ``top_k`` positions with the largest maxima, ``(position, max |x|)``.
    """

    positions: int
    largest_over_median_mean: float | None
    largest_over_median_max: float | None
    token0_over_others_mean: float | None
    token0_over_others_max: float | None
    position_max: Tensor
    top: list[tuple[int, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "largest_over_median": {"mean": self.largest_over_median_mean, "max": self.largest_over_median_max},
            "token0_over_others": {"mean": self.token0_over_others_mean, "max": self.token0_over_others_max},
            "top_positions": [{"position": p, "max_abs": v} for p, v in self.top],
        }


@dataclass(frozen=True)
class WeightStats:
    """Range and shape of a layer's weight distribution (all elements together)."""

    min: float
    max: float
    absmax: float
    std: float
    excess_kurtosis: float | None

    @classmethod
    def of(cls, weight: Tensor) -> WeightStats:
        w = weight.detach().to(torch.float64).flatten()
        centred = w - w.mean()
        variance = float(centred.square().mean())
        # Excess kurtosis E[(w - mu)^4] / var^2 - 3: 0 for a Gaussian, large for heavy-tailed weights.
        kurtosis = float(centred.pow(4).mean()) / variance**2 - 3.0 if variance > 0 else None
        return cls(float(w.min()), float(w.max()), float(w.abs().max()), math.sqrt(variance), kurtosis)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min": self.min,
            "max": self.max,
            "absmax": self.absmax,
            "std": self.std,
            "excess_kurtosis": self.excess_kurtosis,
        }


@dataclass
class LayerAnalysis:
    """Everything measured about one Linear / Conv2d layer of the denoiser.

    Attributes:
        name: ``named_modules()`` name; ``index``: its position among the analysed layers (module order).
        layer_type: ``Linear`` or ``Conv2d``; ``weight_shape``: the weight's shape.
        default_ignore: the architecture's reason for keeping it in floating point by default, else ``None``.
        reads_text_tokens: whether its input is the denoiser's ``encoder_hidden_states`` tensor itself (the
            text encoder's output, e.g. cross-attention ``to_k`` / ``to_v`` of a UNet).
        input_shape: shape of its input in the first call (``None`` if never called).
        overall: the input range over the whole replay; ``by_group``: per timestep group.
        channels, tokens: outlier channels and tokens (``None`` when not called / no token axis).
        weights: the weight's statistics.
        sqnr_db: bits -> SQNR of the per-tensor min-max fake-quantized input over the replay (``None``:
            never called, or no quantization noise at all); ``sqnr_db_by_group``: the same per timestep
            group, with the same (replay-wide) scale. ``sqnr_db_median_channel``: with that scale, the median
            over input channels of each channel's SQNR: what a typical channel keeps. The tensor figure is
            energy-weighted, so one channel far larger than the rest carries most of the signal and hides that
            the others are rounded to zero; this figure does not.
    """

    name: str
    index: int
    layer_type: str
    weight_shape: tuple[int, ...]
    default_ignore: str | None
    reads_text_tokens: bool
    input_shape: tuple[int, ...] | None
    overall: RangeStats
    by_group: list[RangeStats]
    channels: ChannelStats | None
    tokens: TokenStats | None
    weights: WeightStats
    sqnr_db: dict[int, float | None]
    sqnr_db_median_channel: dict[int, float | None]
    sqnr_db_by_group: dict[int, list[float | None]]

    @property
    def calls(self) -> int:
        return self.overall.calls

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "type": self.layer_type,
            "weight_shape": list(self.weight_shape),
            "default_ignore": self.default_ignore,
            "reads_text_tokens": self.reads_text_tokens,
            "calls": self.calls,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "input_range": self.overall.to_dict(),
            "input_range_by_group": [group.to_dict() for group in self.by_group],
            "channels": None if self.channels is None else self.channels.to_dict(),
            "tokens": None if self.tokens is None else self.tokens.to_dict(),
            "weight": self.weights.to_dict(),
            "sqnr_db": {str(bits): _finite(value) for bits, value in self.sqnr_db.items()},
            "sqnr_db_median_channel": {str(bits): value for bits, value in self.sqnr_db_median_channel.items()},
            "sqnr_db_by_group": {
                str(bits): [_finite(value) for value in values] for bits, values in self.sqnr_db_by_group.items()
            },
        }


@dataclass
class AnalysisReport:
    """The analysis of one denoiser on one calibration set.

    Attributes:
        architecture: the denoiser's :class:`Architecture`; ``denoiser_class``: its class name.
        settings: ``timestep_groups`` (asked for), ``percentile``, ``bits``, ``top_k``.
        calibration: ``records``, ``prompts``, ``mode``, ``num_inference_steps``, ``model`` of the data.
        groups: the timestep groups actually used.
        layers: every Linear / Conv2d layer, in module order.
        seconds: wall time of the two replays.
    """

    architecture: Architecture
    denoiser_class: str
    settings: dict[str, Any]
    calibration: dict[str, Any]
    groups: TimestepGrouping
    layers: list[LayerAnalysis]
    seconds: float = 0.0

    @property
    def rank_bits(self) -> int:
        """The bit width the ranking uses: the narrowest analysed."""
        return min(self.settings["bits"])

    def ranked(self, bits: int | None = None, by: str | None = None) -> list[LayerAnalysis]:
        """Called layers, worst first at ``bits`` (default :attr:`rank_bits`) by ``by`` (default the report's
        ``settings["rank_by"]``): ``median_channel`` (the median-channel SQNR, ties by the tensor SQNR) or
        ``tensor`` (the tensor SQNR). No noise at all counts as best."""
        bits = self.rank_bits if bits is None else bits
        by = self.settings.get("rank_by", "median_channel") if by is None else by
        if by not in RANK_BY:
            raise AnalysisError(f"rank by one of {', '.join(RANK_BY)}, got {by!r}")
        called = [layer for layer in self.layers if layer.calls]

        def key(layer: LayerAnalysis) -> tuple[float, float, int]:
            tensor = _sort_key(layer.sqnr_db[bits])
            if by == "tensor":
                return (tensor, tensor, layer.index)
            return (_sort_key(layer.sqnr_db_median_channel[bits]), tensor, layer.index)

        return sorted(called, key=key)

    def layer(self, name: str) -> LayerAnalysis:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` document (schema in :mod:`quantdiff.analysis.report`)."""
        from quantdiff.analysis.report import REPORT_VERSION

        ranked = self.ranked()
        return {
            "version": REPORT_VERSION,
            "architecture": {"name": self.architecture.name, "title": self.architecture.title},
            "denoiser_class": self.denoiser_class,
            "settings": dict(self.settings, bits=list(self.settings["bits"])),
            "calibration": dict(self.calibration),
            "timestep_groups": self.groups.to_dict(),
            "seconds": round(self.seconds, 3),
            "ranking": {
                "bits": self.rank_bits,
                "by": self.settings.get("rank_by", "median_channel"),
                "worst_first": [layer.name for layer in ranked],
            },
            "never_called": [layer.name for layer in self.layers if not layer.calls],
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _sort_key(sqnr: float | None) -> float:
    return math.inf if sqnr is None else sqnr


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


# ------------------------------------------------------------------------------------------- accumulation


def channel_axis(module: nn.Module, x: Tensor) -> int:
    """The input-channel dimension of ``x``: the last for Linear, dim 1 for batched Conv2d ``(B, C, H, W)``."""
    if isinstance(module, nn.Conv2d):
        return x.dim() - 3  # (B, C, H, W) -> 1; an unbatched (C, H, W) -> 0
    return x.dim() - 1


def abs_percentile(abs_x: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile (0-100, nearest rank) of the values of ``abs_x``."""
    flat = abs_x.reshape(-1)
    if flat.numel() > _PERCENTILE_MAX_VALUES:
        flat = flat[:: math.ceil(flat.numel() / _PERCENTILE_MAX_VALUES)]
    # round() first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, whose ceil is one rank too high.
    rank = min(flat.numel(), max(1, math.ceil(round(percentile / 100.0 * flat.numel(), 6))))
    return float(flat.kthvalue(rank).values)


class _LayerAccumulator:
    """What one layer's hooks accumulate over the replays (bounded: no input is kept)."""

    def __init__(self, name: str, module: nn.Module, groups: int, bits: Sequence[int]):
        self.name = name
        self.module = module
        self.input_shape: tuple[int, ...] | None = None
        self.reads_text_tokens = False
        self.overall = RangeStats()
        self.by_group = [RangeStats() for _ in range(groups)]
        self._percentile_sums = [0.0] * groups
        self.channel_max: Tensor | None = None  # (C_in,)
        self.position_max: Tensor | None = None  # (T,)
        self.largest_over_median = _RunningRatio()
        self.token0_over_others = _RunningRatio()
        self.signal = [0.0] * groups  # sum x^2 per group, float64 on the Python side
        self.noise = {b: [0.0] * groups for b in bits}  # sum (x - fq(x))^2 per bits and group
        self.channel_signal: Tensor | None = None  # (C_in,) float64, sum x^2 per input channel
        self.channel_noise: dict[int, Tensor] = {}  # bits -> (C_in,) float64

    # First replay ------------------------------------------------------------------------------------------
    def observe_ranges(self, x: Tensor, group: int, percentile: float, text_tokens: Tensor | None) -> None:
        if text_tokens is not None and _same_tensor(x, text_tokens):  # before .float(), which copies fp16
            self.reads_text_tokens = True
        x = x.detach().float()
        if self.input_shape is None:
            self.input_shape = tuple(x.shape)
        abs_x = x.abs()
        low, high, peak = float(x.min()), float(x.max()), float(abs_x.max())
        tail = abs_percentile(abs_x, percentile)
        for stats in (self.overall, self.by_group[group]):
            stats.calls += 1
            stats.min, stats.max, stats.absmax = min(stats.min, low), max(stats.max, high), max(stats.absmax, peak)
        self._percentile_sums[group] += tail
        group_stats = self.by_group[group]
        group_stats.percentile = self._percentile_sums[group] / group_stats.calls
        self.overall.percentile = sum(self._percentile_sums) / self.overall.calls

        axis = channel_axis(self.module, x)
        per_channel = abs_x.movedim(axis, -1).reshape(-1, x.shape[axis]).amax(dim=0).cpu()  # (C_in,)
        self.channel_max = per_channel if self.channel_max is None else torch.maximum(self.channel_max, per_channel)

        if isinstance(self.module, nn.Linear) and x.dim() >= 3:
            self._observe_tokens(abs_x)

    def _observe_tokens(self, abs_x: Tensor) -> None:
        tokens = abs_x.amax(dim=-1)  # (..., T)
        tokens = tokens.reshape(-1, tokens.shape[-1])  # (B, T)
        # Ratios per sample of the batch, then the largest: a median over the whole batch would mix prompts, and
        # SDXL's unconditional half is all zeros (force_zeros_for_empty_prompt), which makes it 0.
        self.largest_over_median.add(_largest_ratio(tokens.amax(dim=1), tokens.median(dim=1).values))  # (B,) / (B,)
        if tokens.shape[1] > 1:
            self.token0_over_others.add(_largest_ratio(tokens[:, 0], tokens[:, 1:].median(dim=1).values))
        position_max = tokens.amax(dim=0).cpu()  # (T,)
        if self.position_max is None:
            self.position_max = position_max
        else:  # sequences of different lengths: the running max covers the longest one seen
            length = max(self.position_max.numel(), position_max.numel())
            padded = torch.zeros(length)
            padded[: self.position_max.numel()] = self.position_max
            padded[: position_max.numel()] = torch.maximum(padded[: position_max.numel()], position_max)
            self.position_max = padded

    # Second replay -----------------------------------------------------------------------------------------
    def observe_noise(self, x: Tensor, group: int, qparams: dict[int, tuple[Tensor, Tensor]]) -> None:
        x = x.detach().float()
        axis = channel_axis(self.module, x)
        # Squares in float32, sums per channel in float64: no float64 copy of a large input is ever made.
        channel_signal = _per_channel_sum(x.square(), axis)  # (C_in,) float64
        self.signal[group] += float(channel_signal.sum())
        self.channel_signal = channel_signal if self.channel_signal is None else self.channel_signal + channel_signal
        for bits, (scale, zero_point) in qparams.items():
            error = (x - fake_quantize(x, scale, zero_point, bits, symmetric=False)).square_()
            channel_noise = _per_channel_sum(error, axis)  # (C_in,) float64
            self.noise[bits][group] += float(channel_noise.sum())
            previous = self.channel_noise.get(bits)
            self.channel_noise[bits] = channel_noise if previous is None else previous + channel_noise

    def input_qparams(self, bits: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """The one static per-tensor asymmetric min-max scale of each bit width, from the first replay."""
        low, high = torch.tensor(self.overall.min), torch.tensor(self.overall.max)
        return {b: compute_qparams(low, high, b, symmetric=False) for b in bits}

    def result(self, index: int, default_ignore: str | None, top_k: int) -> LayerAnalysis:
        called = self.overall.calls > 0
        tokens = None
        if self.position_max is not None:
            values, positions = self.position_max.topk(min(top_k, self.position_max.numel()))
            tokens = TokenStats(
                positions=int(self.position_max.numel()),
                largest_over_median_mean=self.largest_over_median.mean,
                largest_over_median_max=self.largest_over_median.largest,
                token0_over_others_mean=self.token0_over_others.mean,
                token0_over_others_max=self.token0_over_others.largest,
                position_max=self.position_max,
                top=[(int(p), float(v)) for p, v in zip(positions, values, strict=True)],
            )
        return LayerAnalysis(
            name=self.name,
            index=index,
            layer_type=type(self.module).__name__,
            weight_shape=tuple(self.module.weight.shape),
            default_ignore=default_ignore,
            reads_text_tokens=self.reads_text_tokens,
            input_shape=self.input_shape,
            overall=self.overall,
            by_group=self.by_group,
            channels=ChannelStats.of(self.channel_max, top_k) if self.channel_max is not None else None,
            tokens=tokens,
            weights=WeightStats.of(self.module.weight),
            sqnr_db={b: _db(sum(self.signal), sum(noise)) if called else None for b, noise in self.noise.items()},
            sqnr_db_median_channel={
                b: _median_channel_db(self.channel_signal, self.channel_noise.get(b)) for b in self.noise
            },
            sqnr_db_by_group={
                b: [
                    _db(signal, group_noise) if stats.calls else None
                    for signal, group_noise, stats in zip(self.signal, noise, self.by_group, strict=True)
                ]
                for b, noise in self.noise.items()
            },
        )


def _db(signal: float, noise: float) -> float | None:
    """:func:`quantdiff.primitives.sqnr_db`'s ``10 log10(signal / noise)`` on energies summed over calls; ``None``
    when there is no noise (exact) and ``-inf`` for an all-zero signal, as there."""
    if noise == 0.0:
        return None
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _per_channel_sum(values: Tensor, axis: int) -> Tensor:
    """``values`` summed over every dimension but ``axis``, in float64, on the CPU: ``(C,)``."""
    return values.movedim(axis, -1).reshape(-1, values.shape[axis]).sum(dim=0, dtype=torch.float64).cpu()


def _median_channel_db(signal: Tensor | None, noise: Tensor | None) -> float | None:
    """Median over channels of each channel's SQNR (dB); channels with no noise count as infinitely good,
    all-zero channels are left out. ``None`` when there is no such channel or the median channel is exact."""
    if signal is None or noise is None:
        return None
    keep = signal > 0
    if not bool(keep.any()):
        return None
    per_channel = 10.0 * torch.log10(signal[keep] / noise[keep])  # (C',), +inf where noise is 0
    median = float(per_channel.median())
    return median if math.isfinite(median) else None


def _largest_ratio(numerators: Tensor, denominators: Tensor) -> float | None:
    """``max(numerators / denominators)`` over the entries whose denominator is positive (``None`` if none is)."""
    valid = denominators > 0
    if not bool(valid.any()):
        return None
    return float((numerators[valid] / denominators[valid]).max())


class _RunningRatio:
    """Mean and largest of one ratio per call, without keeping the calls' values."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.largest: float | None = None

    def add(self, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.count += 1
        self.total += value
        self.largest = value if self.largest is None else max(self.largest, value)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def _same_tensor(x: Tensor, other: Tensor) -> bool:
    """Whether ``x`` is ``other`` (or a float32 view of the same memory): identity, not equal values."""
    return x.data_ptr() == other.data_ptr() and x.shape == other.shape


@contextmanager
def _text_tokens_of_each_call(denoiser: nn.Module) -> Iterator[dict[str, Tensor | None]]:
    """A dict whose ``"tensor"`` is the current denoiser call's ``encoder_hidden_states`` (bound by name, as
    :class:`~quantdiff.calibration.timestep.StepClock` binds ``timestep``); the hook is removed on exit."""
    signature = inspect.signature(denoiser.forward)
    current: dict[str, Tensor | None] = {"tensor": None}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        value = signature.bind_partial(*args, **kwargs).arguments.get("encoder_hidden_states")
        current["tensor"] = value if isinstance(value, Tensor) else None

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield current
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------- API


def analyzed_layers(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear / Conv2d of ``denoiser`` in module order: the layers ``resolve_plan`` considers."""
    return [(name, module) for name, module in denoiser.named_modules() if type(module) in LAYER_TYPES]


def default_ignore_reason(name: str, architecture: Architecture) -> str | None:
    """The reason of the first default ignore rule of ``architecture`` that matches layer ``name``."""
    for rule in architecture.default_ignore:
        if fnmatch.fnmatchcase(name, rule.pattern):
            return rule.reason
    return None


def check_settings(
    *,
    timestep_groups: int = 4,
    percentile: float = 99.9,
    bits: Sequence[int] = (8, 4),
    top_k: int = 8,
    rank_by: str = "median_channel",
) -> tuple[int, ...]:
    """Raise :class:`AnalysisError` for settings :func:`analyze_denoiser` cannot use (callers check before long
    work); returns the bit widths, widest first."""
    if isinstance(timestep_groups, bool) or not isinstance(timestep_groups, int) or timestep_groups < 1:
        raise AnalysisError(f"the number of timestep groups must be at least 1, got {timestep_groups}")
    if not 0 < percentile <= 100:
        raise AnalysisError(f"the percentile must lie in (0, 100], got {percentile}")
    if top_k < 1:
        raise AnalysisError(f"top-k must be at least 1, got {top_k}")
    if rank_by not in RANK_BY:
        raise AnalysisError(f"rank by one of {', '.join(RANK_BY)}, got {rank_by!r}")
    for width in bits:
        if isinstance(width, bool) or not isinstance(width, int) or not 2 <= width <= 8:
            raise AnalysisError(f"bit widths must be integers from 2 to 8, got {width!r}")
    if not bits:
        raise AnalysisError("give at least one bit width")
    return tuple(sorted(set(bits), reverse=True))


def analyze_denoiser(
    denoiser: nn.Module,
    calibration: CalibrationSet,
    *,
    timestep_groups: int = 4,
    percentile: float = 99.9,
    bits: Sequence[int] = (8, 4),
    top_k: int = 8,
    rank_by: str = "median_channel",
    architecture: Architecture | None = None,
    progress: bool = True,
) -> AnalysisReport:
    """Replay ``calibration`` through the floating-point ``denoiser`` and measure every Linear / Conv2d layer.

    Args:
        denoiser: a floating-point diffusers denoiser (UNet or DiT), not yet quantized; it is not changed.
        calibration: recorded denoiser calls (``quantdiff calibrate`` / ``capture_calibration``).
        timestep_groups: number of groups of equal numbers of distinct calibration timesteps.
        percentile: the high percentile of ``|x|`` reported per call (0-100, e.g. 99.9).
        bits: the widths of the per-tensor SQNR figures; the layers are ranked by the narrowest.
        top_k: how many outlier channels / token positions to list per layer.
        rank_by: ``median_channel`` (default): rank by the median over input channels of each channel's SQNR
            under the per-tensor scale; ``tensor``: by the SQNR of the whole tensor. The tensor figure is
            energy-weighted and not monotonic in an outlier's size: a channel 1000x the others carries nearly
            all the energy, so the tensor SQNR comes out *good* while every other channel rounds to zero.
        architecture: default: the denoiser's (:func:`architecture_of`); says which layers are default-ignored.
        progress: show a progress bar per replay.

    Returns:
        An :class:`AnalysisReport` (``write_analysis`` writes it; ``report.ranked()`` is the worst-first list).
    """
    bits = check_settings(
        timestep_groups=timestep_groups, percentile=percentile, bits=bits, top_k=top_k, rank_by=rank_by
    )
    if not len(calibration):
        raise AnalysisError("the calibration set has no records: record some with `quantdiff calibrate`")
    architecture = architecture or architecture_of(denoiser)
    groups = TimestepGrouping.of([record.timestep for record in calibration], timestep_groups)
    layers = analyzed_layers(denoiser)
    if not layers:
        raise AnalysisError(f"{type(denoiser).__name__} has no Linear / Conv2d layer to analyse")
    accumulators = [_LayerAccumulator(name, module, len(groups), bits) for name, module in layers]
    started = time.perf_counter()

    with step_clock(denoiser) as clock, _text_tokens_of_each_call(denoiser) as text_tokens:
        with Taps(denoiser) as taps:
            for accumulator in accumulators:

                def ranges(x: Tensor, accumulator: _LayerAccumulator = accumulator) -> None:
                    group = groups.group_of(clock.timestep)
                    accumulator.observe_ranges(x, group, percentile, text_tokens["tensor"])

                taps.on_layer_input(accumulator.name, ranges)
            for _ in calibration.replay(denoiser, progress=progress, desc="analyze: input ranges"):
                pass

        qparams = {a.name: a.input_qparams(bits) for a in accumulators if a.overall.calls}
        with Taps(denoiser) as taps:
            for accumulator in accumulators:
                if accumulator.name not in qparams:
                    continue

                def noise(x: Tensor, accumulator: _LayerAccumulator = accumulator) -> None:
                    accumulator.observe_noise(x, groups.group_of(clock.timestep), qparams[accumulator.name])

                taps.on_layer_input(accumulator.name, noise)
            for _ in calibration.replay(denoiser, progress=progress, desc="analyze: per-tensor SQNR"):
                pass

    results = [
        accumulator.result(index, default_ignore_reason(accumulator.name, architecture), top_k)
        for index, accumulator in enumerate(accumulators)
    ]
    info = calibration.info
    return AnalysisReport(
        architecture=architecture,
        denoiser_class=type(denoiser).__name__,
        settings={
            "timestep_groups": timestep_groups,
            "percentile": percentile,
            "bits": bits,
            "top_k": top_k,
            "rank_by": rank_by,
        },
        calibration={
            "records": len(calibration),
            "prompts": len({record.prompt_index for record in calibration}),
            "mode": info.get("mode"),
            "num_inference_steps": info.get("num_inference_steps"),
            "guidance_scale": info.get("guidance_scale"),
            "model": info.get("model"),
        },
        groups=groups,
        layers=results,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "RANK_BY",
    "AnalysisError",
    "AnalysisReport",
    "ChannelStats",
    "LayerAnalysis",
    "RangeStats",
    "TimestepGrouping",
    "TokenStats",
    "WeightStats",
    "abs_percentile",
    "analyze_denoiser",
    "analyzed_layers",
    "channel_axis",
    "check_settings",
    "default_ignore_reason",
]
