"""Tests of quantdiff.observers against hand-computed values and independent numpy references."""

import numpy as np
import pytest
import torch

from quantdiff.observers import (
    OBSERVERS,
    EMAMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from quantdiff.primitives import compute_qparams, fake_quantize


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def _gaussian(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lp_error(x, low, high, bits, symmetric, p):
    """Per-row mean |x - fake_quant(x)|^p for the range (low, high), in float64 numpy."""
    scale, zero_point = compute_qparams(low, high, bits, symmetric)
    approx = fake_quantize(x, scale[:, None], zero_point[:, None], bits, symmetric)
    return (np.abs(x.double().numpy() - approx.double().numpy()) ** p).mean(axis=1)


# --- base behaviour ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_no_data_raises(name):
    observer = make_observer(name, 8, True)
    with pytest.raises(RuntimeError, match="observed no data"):
        observer.qparams()
    with pytest.raises(RuntimeError, match="observed no data"):
        observer.range()
    observer.update(torch.zeros(2, 0))  # an empty batch is not data
    with pytest.raises(RuntimeError, match="observed no data"):
        observer.qparams()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_update_validates_input(name):
    observer = make_observer(name, 8, False)
    with pytest.raises(ValueError, match="2-D"):
        observer.update(torch.zeros(4))
    with pytest.raises(TypeError):
        observer.update(torch.zeros(2, 3, dtype=torch.int32))
    observer.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2 rows"):
        observer.update(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="inf or nan"):
        observer.update(_t([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="inf or nan"):
        observer.update(_t([[0.0, 1.0], [float("-inf"), 2.0]]))


def test_update_detaches_and_accepts_other_float_dtypes():
    x = _t([[1.0, -2.0]]).requires_grad_()
    observer = MinMaxObserver(8, False)
    observer.update(x)
    observer.update(torch.tensor([[3.0]], dtype=torch.float16))
    low, high = observer.range()
    assert not low.requires_grad and low.dtype == torch.float32
    assert (low.item(), high.item()) == (-2.0, 3.0)


# --- MinMaxObserver ------------------------------------------------------------------------------


def test_minmax_exact_running_range():
    observer = MinMaxObserver(8, False)
    observer.update(_t([[1.0, -2.0, 0.5], [4.0, 5.0, 6.0]]))
    observer.update(_t([[3.0], [-1.0]]))  # N changes between updates
    low, high = observer.range()
    assert low.tolist() == [-2.0, -1.0] and high.tolist() == [3.0, 6.0]
    scale, zero_point = observer.qparams()
    expected_scale, expected_zero_point = compute_qparams(_t([-2.0, -1.0]), _t([3.0, 6.0]), 8, False)
    assert torch.equal(scale, expected_scale) and torch.equal(zero_point, expected_zero_point)
    # (-2, 3): scale 5/255, zp = round(2 * 255 / 5) = 102
    assert zero_point.tolist()[0] == 102


def test_minmax_symmetric_range_is_plus_minus_absmax():
    observer = MinMaxObserver(8, True)
    observer.update(_t([[-1.27, 0.5], [0.2, 0.3]]))
    low, high = observer.range()
    assert low.tolist() == pytest.approx([-1.27, -0.3]) and high.tolist() == pytest.approx([1.27, 0.3])
    scale, zero_point = observer.qparams()
    torch.testing.assert_close(scale, _t([0.01, 0.3 / 127]))
    assert zero_point.tolist() == [0, 0]


# --- EMAMinMaxObserver ---------------------------------------------------------------------------


def test_ema_minmax_two_updates():
    observer = EMAMinMaxObserver(8, False, decay=0.9)
    observer.update(_t([[-1.0, 2.0, 0.0]]))  # first update sets (-1, 2)
    low, high = observer.range()
    assert (low.item(), high.item()) == (-1.0, 2.0)
    observer.update(_t([[-3.0, 4.0]]))
    # min = 0.9 * -1 + 0.1 * -3 = -1.2 ; max = 0.9 * 2 + 0.1 * 4 = 2.2
    low, high = observer.range()
    assert low.item() == pytest.approx(-1.2) and high.item() == pytest.approx(2.2)
    # the exact running range is still reported separately
    exact_low, exact_high = observer.observed_min_max()
    assert (exact_low.item(), exact_high.item()) == (-3.0, 4.0)


def test_ema_minmax_symmetric_uses_larger_magnitude_of_the_averages():
    observer = EMAMinMaxObserver(8, True, decay=0.5)
    observer.update(_t([[-4.0, 1.0]]))
    observer.update(_t([[-2.0, 3.0]]))
    # min = 0.5 * -4 + 0.5 * -2 = -3 ; max = 0.5 * 1 + 0.5 * 3 = 2 -> a = 3
    low, high = observer.range()
    assert (low.item(), high.item()) == (-3.0, 3.0)


# --- sampling ------------------------------------------------------------------------------------


def test_sample_keeps_exactly_max_samples_and_is_deterministic():
    stream = [_gaussian((2, 80), seed) for seed in range(3)]

    def sample(seed):
        observer = PercentileObserver(8, True, max_samples=100, seed=seed)
        for batch in stream:
            observer.update(batch)
        return observer.sample()

    first = sample(0)
    assert first.shape == (2, 100)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first.sort(1).values, sample(1).sort(1).values)
    # Every sampled column is a column of the stream, the same one for both rows.
    columns = {tuple(column) for column in torch.cat(stream, dim=1).T.tolist()}
    assert all(tuple(column) in columns for column in first.T.tolist())


def test_sample_is_the_whole_stream_when_it_fits():
    stream = [_gaussian((3, 40), 0), _gaussian((3, 25), 1)]
    observer = MSEObserver(4, False, max_samples=65)
    for batch in stream:
        observer.update(batch)
    expected = torch.cat(stream, dim=1).sort(1).values
    assert torch.equal(observer.sample().sort(1).values, expected)


def test_sample_is_uniform_over_the_stream():
    # 30 columns in 3 batches, 5 kept: every column must be kept with probability 5/30 whatever its
    # batch. A sampler biased towards early or late batches fails this by many standard deviations.
    stream = [torch.arange(10.0)[None] + 10 * b for b in range(3)]
    counts = torch.zeros(30)
    trials = 1500
    for seed in range(trials):
        observer = PercentileObserver(8, True, max_samples=5, seed=seed)
        for batch in stream:
            observer.update(batch)
        counts[observer.sample()[0].long()] += 1
    frequency = counts / trials
    standard_deviation = (1 / 6 * 5 / 6 / trials) ** 0.5  # ~0.0096
    assert (frequency - 1 / 6).abs().max() < 5 * standard_deviation


# --- PercentileObserver --------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [99.0, 99.99, 90.0, 100.0])
def test_percentile_matches_numpy(percentile):
    stream = [_gaussian((3, 600), 0) * _t([[1.0], [5.0], [0.1]]), _gaussian((3, 401), 1)]
    data = torch.cat(stream, dim=1).numpy().astype(np.float64)

    asymmetric = PercentileObserver(8, False, percentile=percentile)
    symmetric = PercentileObserver(8, True, percentile=percentile)
    for batch in stream:
        asymmetric.update(batch)
        symmetric.update(batch)

    low, high = asymmetric.range()
    np.testing.assert_allclose(low.numpy(), np.percentile(data, 100 - percentile, axis=1), rtol=1e-6)
    np.testing.assert_allclose(high.numpy(), np.percentile(data, percentile, axis=1), rtol=1e-6)
    low, high = symmetric.range()
    expected = np.percentile(np.abs(data), percentile, axis=1)
    np.testing.assert_allclose(high.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(low.numpy(), -expected, rtol=1e-6)


def test_percentile_hand_computed():
    # Values 0..10: the 95th percentile sits at position 0.95 * 10 = 9.5 -> 9.5; the 5th at 0.5.
    observer = PercentileObserver(8, False, percentile=95.0)
    observer.update(torch.arange(11.0).flip(0)[None])
    low, high = observer.range()
    assert (low.item(), high.item()) == (0.5, 9.5)


# --- MSEObserver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_an_outlier_and_beats_minmax(symmetric):
    # 4 bits: minmax's range [-3.7, 10] spends most levels on one value. (At 8 bits the rounding
    # error is so small that clipping one outlier in 4096 values costs more than it saves, and the
    # search rightly keeps the full range.)
    x = _gaussian((1, 4096), 0)
    x[0, 100] = 10.0
    mse, minmax = MSEObserver(4, symmetric), MinMaxObserver(4, symmetric)
    mse.update(x)
    minmax.update(x)
    mse_low, mse_high = mse.range()
    assert mse_high.item() < 10.0
    mse_error = _lp_error(x, mse_low, mse_high, 4, symmetric, 2.4)
    minmax_error = _lp_error(x, *minmax.range(), 4, symmetric, 2.4)
    assert mse_error[0] < 0.6 * minmax_error[0]


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (3, False)])
def test_mse_picks_the_best_candidate_of_the_grid(bits, symmetric):
    # Reference: evaluate every candidate of the grid one by one in float64 numpy.
    x = _gaussian((1, 8000), bits)
    observer = MSEObserver(bits, symmetric)
    observer.update(x)
    low, high = observer.range()

    if symmetric:
        full_high = x.abs().max()
        full_low = -full_high
    else:
        full_low, full_high = x.min(), x.max()
    errors = [
        _lp_error(x, (full_low * (1 - 0.01 * i))[None], (full_high * (1 - 0.01 * i))[None], bits, symmetric, 2.4)[0]
        for i in range(80)
    ]
    best = int(np.argmin(errors))
    torch.testing.assert_close(high, (full_high * (1 - 0.01 * best))[None])
    torch.testing.assert_close(low, (full_low * (1 - 0.01 * best))[None])


def test_mse_range_on_gaussian_is_reasonable():
    x = _gaussian((1, 100000), 0)
    absmax = x.abs().max().item()  # ~4.4 sigma for 1e5 samples
    observer = MSEObserver(8, True)
    observer.update(x)
    high = observer.range()[1].item()
    # At 8 bits rounding noise is tiny, so only the far tail is worth clipping: the optimum lies
    # between ~3.5 and ~4.5 sigma and below the absolute maximum.
    assert 3.5 < high < absmax
    # At 4 bits the optimal clip of a unit Gaussian is about 2.5-2.7 sigma (ACIQ: 2.55 sigma for MSE).
    observer = MSEObserver(4, True)
    observer.update(x)
    assert 2.3 < observer.range()[1].item() < 2.9


@pytest.mark.parametrize("name", ["mse", "percentile", "minmax", "ema_minmax"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rows_are_independent(name, symmetric):
    # Rows with very different distributions, observed together or one at a time, give the same ranges.
    stream = [
        _gaussian((4, 300), 0) * _t([[1.0], [10.0], [0.01], [3.0]]) + _t([[0.0], [5.0], [-1.0], [0.0]]),
        _gaussian((4, 200), 1).abs() * _t([[1.0], [2.0], [0.02], [50.0]]),
    ]
    together = make_observer(name, 4, symmetric)
    for batch in stream:
        together.update(batch)
    low, high = together.range()
    scale, zero_point = together.qparams()
    for row in range(4):
        alone = make_observer(name, 4, symmetric)
        for batch in stream:
            alone.update(batch[row : row + 1])
        alone_low, alone_high = alone.range()
        torch.testing.assert_close(low[row : row + 1], alone_low, rtol=1e-6, atol=0)
        torch.testing.assert_close(high[row : row + 1], alone_high, rtol=1e-6, atol=0)
        alone_scale, alone_zero_point = alone.qparams()
        torch.testing.assert_close(scale[row : row + 1], alone_scale, rtol=1e-6, atol=0)
        assert torch.equal(zero_point[row : row + 1], alone_zero_point)


def test_range_is_cached_but_refreshed_by_update():
    observer = MSEObserver(4, True)
    observer.update(_gaussian((1, 1000), 0))
    first = observer.range()
    assert torch.equal(observer.range()[1], first[1])
    observer.update(_t([[100.0]]))
    assert observer.observed_min_max()[1].item() == 100.0
    assert not torch.equal(observer.range()[1], first[1])


# --- make_observer -------------------------------------------------------------------------------


def test_make_observer_builds_each_registered_class():
    assert set(OBSERVERS) == {"minmax", "ema_minmax", "percentile", "mse"}
    for name, cls in OBSERVERS.items():
        observer = make_observer(name, 4, False)
        assert type(observer) is cls and isinstance(observer, Observer)
        assert (observer.bits, observer.symmetric) == (4, False)
    assert make_observer("ema_minmax", 8, True, decay=0.5).decay == 0.5
    observer = make_observer("mse", 8, True, p=2.0, grid=10, step=0.05, max_samples=7, seed=3)
    assert (observer.p, observer.grid, observer.step, observer.max_samples, observer.seed) == (2.0, 10, 0.05, 7, 3)
    assert make_observer("percentile", 8, True, percentile=99).percentile == 99.0


def test_observers_registry_is_read_only():
    with pytest.raises(TypeError):
        OBSERVERS["other"] = MinMaxObserver


def test_make_observer_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown observer 'max'") as error:
        make_observer("max", 8, True)
    for name in OBSERVERS:
        assert name in str(error.value)


def test_make_observer_unknown_option_is_named():
    with pytest.raises(TypeError, match="'decay'"):
        make_observer("minmax", 8, True, decay=0.9)
    with pytest.raises(TypeError, match="'percentil'.*percentile"):
        make_observer("percentile", 8, True, percentil=99.9)


@pytest.mark.parametrize(
    ("name", "options", "named"),
    [
        ("ema_minmax", {"decay": 1.5}, "decay"),
        ("ema_minmax", {"decay": "0.9"}, "decay"),
        ("percentile", {"percentile": 101}, "percentile"),
        ("percentile", {"percentile": 40}, "percentile"),
        ("percentile", {"max_samples": 0}, "max_samples"),
        ("mse", {"p": 0}, "p"),
        ("mse", {"grid": 0}, "grid"),
        ("mse", {"grid": 2.5}, "grid"),
        ("mse", {"step": 0.02, "grid": 80}, "step"),  # 1 - 0.02 * 79 < 0: a negative range
        ("mse", {"seed": -1}, "seed"),
        ("mse", {"seed": True}, "seed"),
    ],
)
def test_make_observer_rejects_bad_option_values(name, options, named):
    with pytest.raises(ValueError, match=rf"^{named} "):
        make_observer(name, 8, True, **options)


def test_make_observer_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        make_observer("minmax", 9, True)
