"""Observers: turn a stream of values into a quantization range, and that range into qparams.

An observer watches a stream of 2-D tensors ``x`` of shape ``(R, N)``: ``R`` independent rows, each
quantized with its own scale (``R = 1`` for a per-tensor activation, ``R = C_out`` for per-channel
weights, ``R = C_out * G`` for per-group weights after :func:`quantdiff.primitives.group_rows`), and
``N`` new values per row in each update. ``N`` may change between updates; ``R`` may not.

Each observer chooses a per-row range ``(min, max)`` by its own rule (:meth:`Observer.range`) and
hands it to :func:`quantdiff.primitives.compute_qparams` (:meth:`Observer.qparams`). Observers know
nothing of layers or algorithms; they only see numbers.

All statistics are kept in float32 on the device of the first update. Observers hold per-instance
state only: two observers never share a generator or a buffer.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from quantdiff.primitives import compute_qparams, fake_quantize, integer_range

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
]


def _real(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float after checking it is a finite real number in ``[low, high]`` (``(low, high]``)."""
    # bool is a numbers.Real; an option set to True is always a typo in a recipe.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {interval}, got {value:g}")
    return value


def _integer(name: str, value: object, low: int) -> int:
    """``value`` after checking it is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _symmetric_range(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """``(-a, a)`` with ``a = max(|low|, |high|)``, elementwise."""
    absmax = torch.maximum(low.abs(), high.abs())
    return -absmax, absmax


class Observer:
    """Base class: validates the stream, tracks the exact running min/max, derives qparams.

    Subclasses implement :meth:`_compute_range` and may override :meth:`_observe` to collect more
    statistics. The range is computed lazily and cached until the next :meth:`update`, so calling
    :meth:`range` and :meth:`qparams` repeatedly costs one computation.

    Args:
        bits: integer width, 2 to 8.
        symmetric: signed range ``(-a, a)`` with zero point 0 (True) or affine range (False).

    Raises:
        ValueError: ``bits`` is not an integer from 2 to 8.
    """

    def __init__(self, bits: int, symmetric: bool):
        integer_range(bits, symmetric)  # validates bits with the same message as everywhere else
        self.bits = bits
        self.symmetric = bool(symmetric)
        self._rows: int | None = None
        self._min: Tensor | None = None  # (R,) exact running min over the whole stream
        self._max: Tensor | None = None  # (R,)
        self._cached_range: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Observe ``N`` more values of each of the ``R`` rows.

        Args:
            x: floating tensor ``(R, N)``. It is detached and read in float32; it is not modified.
                An update with ``N = 0`` is allowed and changes nothing.

        Raises:
            TypeError: ``x`` is not floating point.
            ValueError: ``x`` is not 2-D, its ``R`` differs from earlier updates, or it holds inf/nan.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"observers take floating-point tensors, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 2:
            raise ValueError(f"observers take 2-D (rows, values) tensors, got shape {tuple(x.shape)}")
        if self._rows is None:
            self._rows = x.shape[0]
        elif x.shape[0] != self._rows:
            raise ValueError(f"this observer watches {self._rows} rows, got an update with {x.shape[0]}")
        if x.shape[1] == 0:
            return
        x = x.detach().to(torch.float32)  # (R, N)
        batch_min, batch_max = torch.aminmax(x, dim=1)  # (R,), (R,)
        # min/max propagate nan and inf, so checking the two (R,) reductions checks all of x for free.
        if not bool(torch.isfinite(batch_min).all() & torch.isfinite(batch_max).all()):
            raise ValueError("observed values contain inf or nan; a quantization range cannot include them")
        self._observe(x, batch_min, batch_max)
        if self._min is None:
            self._min, self._max = batch_min, batch_max
        else:
            self._min = torch.minimum(self._min, batch_min)
            self._max = torch.maximum(self._max, batch_max)
        self._cached_range = None

    def observed_min_max(self) -> tuple[Tensor, Tensor]:
        """The exact per-row minimum and maximum over every value seen so far.

        Returns:
            ``(min, max)``, float32 tensors of shape ``(R,)``.

        Raises:
            RuntimeError: :meth:`update` was never called with data.
        """
        self._require_data()
        return self._min.clone(), self._max.clone()

    def range(self) -> tuple[Tensor, Tensor]:
        """The range this observer chose for each row, before :func:`compute_qparams`.

        Returns:
            ``(min, max)``, float32 tensors of shape ``(R,)``; ``(-a, a)`` for a symmetric observer.
            Asymmetric ranges are returned as chosen: widening them to include 0 is
            ``compute_qparams``'s job.

        Raises:
            RuntimeError: :meth:`update` was never called with data.
        """
        self._require_data()
        if self._cached_range is None:
            self._cached_range = self._compute_range()
        low, high = self._cached_range
        return low.clone(), high.clone()

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``compute_qparams(*self.range(), bits, symmetric)``.

        Returns:
            ``(scale, zero_point)``: float32 and int32 tensors of shape ``(R,)``.

        Raises:
            RuntimeError: :meth:`update` was never called with data.
        """
        return compute_qparams(*self.range(), self.bits, self.symmetric)

    def _require_data(self) -> None:
        if self._min is None:
            raise RuntimeError(
                f"{type(self).__name__} observed no data: call update() with at least one value per row first"
            )

    def _observe(self, x: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        """Hook for subclasses: ``x`` is a validated float32 ``(R, N)`` batch with ``N >= 1``.

        Called before the running min/max include this batch.
        """

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        """The ``(R,)`` range; only called once data has been observed."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    """The exact running range: ``min = min_t min(x_t)``, ``max = max_t max(x_t)`` per row.

    Symmetric: ``a = max(|min|, |max|)``. Never clips, so one outlier sets the scale for all values.

    Args:
        bits: integer width, 2 to 8.
        symmetric: signed range ``(-a, a)`` (True) or affine range (False).
    """

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        if self.symmetric:
            return _symmetric_range(self._min, self._max)
        return self._min, self._max


class EMAMinMaxObserver(Observer):
    """Exponential moving average of each update's min and max (Q-Diffusion / MixDQ "running_stat").

    The first update sets ``m = min(x_1)``, ``M = max(x_1)``; each later update ``t`` does::

        m <- decay * m + (1 - decay) * min(x_t)
        M <- decay * M + (1 - decay) * max(x_t)

    Symmetric: ``a = max(|m|, |M|)``. Smooths away the extremes of single batches, at the cost of
    depending on the order and batching of the stream.

    Args:
        bits: integer width, 2 to 8.
        symmetric: signed range ``(-a, a)`` (True) or affine range (False).
        decay: weight of the history, in [0, 1]; 0 keeps only the last batch, 1 only the first.

    Raises:
        ValueError: bad ``bits`` or ``decay``.
    """

    def __init__(self, bits: int, symmetric: bool, decay: float = 0.95):
        super().__init__(bits, symmetric)
        self.decay = _real("decay", decay, 0.0, 1.0)
        self._ema_min: Tensor | None = None  # (R,)
        self._ema_max: Tensor | None = None  # (R,)

    def _observe(self, x: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        if self._ema_min is None:
            self._ema_min, self._ema_max = batch_min, batch_max
            return
        self._ema_min = self.decay * self._ema_min + (1.0 - self.decay) * batch_min
        self._ema_max = self.decay * self._ema_max + (1.0 - self.decay) * batch_max

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        if self.symmetric:
            return _symmetric_range(self._ema_min, self._ema_max)
        return self._ema_min, self._ema_max


# Values per chunk of the Lp range search: (rows x candidates x samples) fake-quantized at once (1 MiB).
# Small on purpose: with 32 MiB chunks glibc's heap kept about 2.6 MiB per observer that it could not reuse,
# and the 788 observers of an SDXL UNet grew the process by gigabytes (measured; malloc_trim returned it).
# 1 MiB chunks grew it 4x less and searched faster.
_SEARCH_CHUNK_VALUES = 1 << 18


class _SampledObserver(Observer):
    """Base of the observers that need the distribution: keeps a uniform sample of each row.

    Bottom-k sampling: every incoming column (one value of each row) gets a key ``u ~ U(0, 1)`` from
    the observer's own seeded generator, and the sample is the ``max_samples`` columns with the
    smallest keys seen so far. The smallest k of i.i.d. uniform keys are a uniformly random k-subset,
    so this is an exact uniform sample without replacement of the whole stream, whatever its length
    and batching, and it is reproducible for a given seed and stream. The key is shared by all rows
    of a column, so every row is sampled at the same positions. When the stream holds at most
    ``max_samples`` values per row the sample is all of them and the result is exact.

    The range is computed from the sample, not from the exact running min/max (which
    :meth:`observed_min_max` still reports); an extreme value that the sample missed is too rare
    to move a percentile or an Lp error.

    Memory: ``R * max_samples`` float32 values, plus ``max_samples`` float64 keys.
    """

    def __init__(self, bits: int, symmetric: bool, max_samples: int, seed: int):
        super().__init__(bits, symmetric)
        self.max_samples = _integer("max_samples", max_samples, 1)
        self.seed = _integer("seed", seed, 0)
        # Keys are drawn on the CPU so the sample does not depend on the device the data lives on.
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._sample: Tensor | None = None  # (R, S), S <= max_samples
        self._keys: Tensor | None = None  # (S,) float64 keys of the sampled columns

    def sample(self) -> Tensor:
        """The values currently sampled, columns in no particular order.

        Returns:
            float32 tensor ``(R, S)`` with ``S = min(max_samples, values seen per row)``.

        Raises:
            RuntimeError: :meth:`update` was never called with data.
        """
        self._require_data()
        return self._sample.clone()

    def _observe(self, x: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        # float64 keys: 53 random bits make ties at the cut-off practically impossible on long streams.
        keys = torch.rand(x.shape[1], generator=self._generator, dtype=torch.float64).to(x.device)  # (N,)
        if self._keys is not None and self._keys.numel() == self.max_samples:
            # A full pool only admits columns whose key beats its largest one: drop the rest before
            # concatenating, which keeps late, large batches cheap (same sample, far less copying).
            admitted = keys < self._keys.max()
            x, keys = x[:, admitted], keys[admitted]  # (R, n), (n,)
        if self._sample is None:
            pool, pool_keys = x, keys  # (R, N), (N,)
        else:
            pool = torch.cat((self._sample, x), dim=1)  # (R, S + N)
            pool_keys = torch.cat((self._keys, keys))  # (S + N,)
        if pool_keys.numel() > self.max_samples:
            keep = torch.topk(pool_keys, self.max_samples, largest=False, sorted=False).indices  # (max_samples,)
            pool, pool_keys = pool[:, keep], pool_keys[keep]
        # contiguous: a first batch kept whole may be a view of the caller's tensor.
        self._sample, self._keys = pool.contiguous(), pool_keys


def _percentile_of_sorted(sorted_rows: Tensor, percent: float) -> Tensor:
    """Per-row percentile of rows sorted ascending, with numpy's default linear interpolation.

    For ``S`` sorted values ``v``: ``pos = (S - 1) * percent / 100``, ``i = floor(pos)``,
    ``result = v[i] + (v[min(i + 1, S - 1)] - v[i]) * (pos - i)``.

    Args:
        sorted_rows: ``(R, S)`` tensor, each row sorted ascending, ``S >= 1``.
        percent: in [0, 100].

    Returns:
        float32 ``(R,)``.
    """
    count = sorted_rows.shape[1]
    position = (count - 1) * percent / 100.0
    below = min(int(math.floor(position)), count - 1)
    above = min(below + 1, count - 1)
    fraction = position - below
    # Interpolate in float64 so the only rounding is the final cast, as numpy does in float64.
    low = sorted_rows[:, below].to(torch.float64)  # (R,)
    high = sorted_rows[:, above].to(torch.float64)  # (R,)
    return (low + (high - low) * fraction).to(torch.float32)


class PercentileObserver(_SampledObserver):
    """Clip each row at a percentile of its observed values.

    Symmetric: ``a = P_p(|x|)``. Asymmetric: ``min = P_(100-p)(x)``, ``max = P_p(x)``. ``P`` is the
    linearly interpolated percentile (numpy's default), computed by sorting the sample (see
    :class:`_SampledObserver`), which is the whole stream when it has at most ``max_samples`` values
    per row. Sorting rather than ``torch.quantile`` because the latter refuses inputs of more than
    16M elements.

    Args:
        bits: integer width, 2 to 8.
        symmetric: signed range ``(-a, a)`` (True) or affine range (False).
        percentile: ``p`` in (50, 100]; 100 is the sample's min/max.
        max_samples: values kept per row, >= 1.
        seed: seed of the sampling generator, >= 0.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(self, bits: int, symmetric: bool, percentile: float = 99.99, max_samples: int = 2**16, seed: int = 0):
        super().__init__(bits, symmetric, max_samples, seed)
        self.percentile = _real("percentile", percentile, 50.0, 100.0, low_open=True)

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        if self.symmetric:
            absmax = _percentile_of_sorted(self._sample.abs().sort(dim=1).values, self.percentile)  # (R,)
            return -absmax, absmax
        ordered = self._sample.sort(dim=1).values  # (R, S)
        return (
            _percentile_of_sorted(ordered, 100.0 - self.percentile),
            _percentile_of_sorted(ordered, self.percentile),
        )


class MSEObserver(_SampledObserver):
    """Lp-error range search (LAPQ; Q-Diffusion's ``scale_method="mse"``).

    Starting from the sample's per-row range ``[m, M]`` (symmetric: ``[-a, a]``, ``a = max |x|``),
    try the shrunk candidates ``[m, M] * (1 - step * i)`` for ``i = 0 .. grid - 1`` and keep, per row,
    the one minimising::

        L_p(i) = mean_j |x_j - fake_quantize(x_j; qparams(candidate_i))|^p

    over the row's sample ``x``. The loss trades rounding error (wider range) against clipping error
    (narrower range); ``p > 2`` weighs large clipping errors more than MSE does. Ties go to the wider
    candidate. The search is vectorised over rows and loops over the ``grid`` candidates, so it
    costs ``grid`` fake-quantizations of the sample, done a chunk of candidates at a time.

    Args:
        bits: integer width, 2 to 8.
        symmetric: signed range ``(-a, a)`` (True) or affine range (False).
        p: exponent of the error, > 0.
        grid: number of candidates, >= 1.
        step: fraction of the full range removed per candidate, > 0 with ``step * (grid - 1) < 1``.
        max_samples: values kept per row, >= 1.
        seed: seed of the sampling generator, >= 0.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool,
        p: float = 2.4,
        grid: int = 80,
        step: float = 0.01,
        max_samples: int = 2**16,
        seed: int = 0,
    ):
        super().__init__(bits, symmetric, max_samples, seed)
        self.p = _real("p", p, 0.0, math.inf, low_open=True)
        self.grid = _integer("grid", grid, 1)
        self.step = _real("step", step, 0.0, 1.0, low_open=True)
        if self.step * (self.grid - 1) >= 1.0:
            raise ValueError(
                f"step * (grid - 1) must be below 1 so every candidate range is non-empty, "
                f"got step={self.step:g}, grid={self.grid}"
            )

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        sample = self._sample  # (R, S)
        if self.symmetric:
            full_low, full_high = _symmetric_range(*torch.aminmax(sample, dim=1))  # (R,), (R,)
        else:
            full_low, full_high = torch.aminmax(sample, dim=1)  # (R,), (R,)
        rows, count = sample.shape
        shrink = 1.0 - self.step * torch.arange(self.grid, dtype=torch.float32, device=sample.device)  # (C,)
        errors = []
        # Candidates are evaluated in chunks, each one broadcast fake-quantization of the whole sample:
        # far fewer passes than one per candidate, with memory bounded by _SEARCH_CHUNK_VALUES.
        per_chunk = max(1, _SEARCH_CHUNK_VALUES // max(1, rows * count))
        for start in range(0, self.grid, per_chunk):
            factors = shrink[start : start + per_chunk]  # (c,)
            low = full_low[:, None] * factors  # (R, c)
            high = full_high[:, None] * factors  # (R, c)
            scale, zero_point = compute_qparams(low, high, self.bits, self.symmetric)  # (R, c), (R, c)
            approx = fake_quantize(
                sample[:, None, :], scale[..., None], zero_point[..., None], self.bits, self.symmetric
            )
            # float32 is enough here: torch sums pairwise (error ~1e-7 relative), far below the gaps
            # between neighbouring candidates; a float64 pass would double the cost of the search.
            errors.append(approx.sub_(sample[:, None, :]).abs_().pow_(self.p).mean(dim=2))
        best = torch.cat(errors, dim=1).argmin(dim=1)  # (R,); argmin keeps the first (widest) of ties
        factor = shrink[best]  # (R,)
        best_low, best_high = full_low * factor, full_high * factor
        return best_low, best_high


# Read-only so no caller can register or replace an observer behind everyone else's back.
OBSERVERS: Mapping[str, type[Observer]] = MappingProxyType(
    {
        "minmax": MinMaxObserver,
        "ema_minmax": EMAMinMaxObserver,
        "percentile": PercentileObserver,
        "mse": MSEObserver,
    }
)


def _option_names(cls: type[Observer]) -> list[str]:
    """Keyword options of an observer class: its ``__init__`` parameters after bits and symmetric."""
    parameters = inspect.signature(cls.__init__).parameters
    return [name for name in parameters if name not in ("self", "bits", "symmetric")]


def make_observer(name: str, bits: int, symmetric: bool, **options: object) -> Observer:
    """Build an observer by its name in :data:`OBSERVERS`.

    Args:
        name: one of ``OBSERVERS``' keys.
        bits: integer width, 2 to 8.
        symmetric: signed range ``(-a, a)`` (True) or affine range (False).
        **options: keyword options of that observer, e.g. ``percentile=99.9`` or ``decay=0.9``.

    Returns:
        A fresh observer that has seen no data.

    Raises:
        ValueError: unknown ``name``, or an option value out of range.
        TypeError: an option that this observer does not take.
    """
    if not isinstance(name, str) or name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}: use one of {', '.join(OBSERVERS)}")
    cls = OBSERVERS[name]
    accepted = _option_names(cls)
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise TypeError(
            f"observer {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(accepted) or 'none'}"
        )
    return cls(bits, symmetric, **options)
