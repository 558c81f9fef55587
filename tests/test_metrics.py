"""FID, Inception Score, PSNR and SSIM against closed forms, hand-computed values and a naive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantdiff.evaluation.metrics import fid_from_features, frechet_distance, inception_score, psnr, ssim


def _closed_form_diagonal(mu1, s1, mu2, s2):
    """FID of N(mu1, diag(s1)) and N(mu2, diag(s2)): ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


# --- FID -----------------------------------------------------------------------------------------------


def test_fid_of_identical_feature_sets_is_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 3.0  # correlated, offset
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = _closed_form_diagonal(mu1, s1, mu2, s2)
    # By hand: 1 + 0 + 4 + 1 = 6 from the means; (1+9-6) + (4+1-4) + 0 + (2+0.5-2) = 5.5 from the covariances.
    assert expected == pytest.approx(11.5)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_full_covariances_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)  # full, well conditioned
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Same covariance: only the means count.
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
    # sigma2 = c^2 sigma1: tr(s + c^2 s - 2 c s) = (1 - c)^2 tr(s).
    c = 1.7
    assert frechet_distance(mu1, sigma, mu1, c**2 * sigma) == pytest.approx((1 - c) ** 2 * np.trace(sigma), rel=1e-7)


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 0.0, 1.0]), np.array([0.5, -0.5, 1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])
    expected = _closed_form_diagonal(mu1, s1, mu2, s2)
    errors = []
    for n in (500, 50_000):
        a = mu1 + np.sqrt(s1) * rng.normal(size=(n, 3))
        b = mu2 + np.sqrt(s2) * rng.normal(size=(n, 3))
        errors.append(abs(fid_from_features(a, b) - expected))
    assert errors[1] < 0.02 * expected
    assert errors[1] < errors[0]


def test_fid_handles_singular_covariances():
    rng = np.random.default_rng(3)
    # Fewer samples than dimensions: rank-deficient covariances, the case pytorch-fid offsets by eps * I.
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))
    value = fid_from_features(a, b)
    assert math.isfinite(value) and value > 0
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-4)
    zero = np.zeros((5, 5))
    assert frechet_distance(np.zeros(5), zero, np.ones(5), zero) == pytest.approx(5.0, abs=1e-4)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fid_from_features(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        fid_from_features(np.zeros((1, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --- Inception Score -------------------------------------------------------------------------------


def test_inception_score_extremes():
    confident = np.tile(np.eye(10), (5, 1))  # every class equally often, always certain
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-12)
    assert inception_score(confident, splits=5) == pytest.approx(10.0, rel=1e-12)
    rng = np.random.default_rng(0)
    same = np.tile(rng.dirichlet(np.ones(10)), (50, 1))  # identical predictions: no information
    assert inception_score(same) == pytest.approx(1.0, abs=1e-12)
    uniform = np.full((20, 4), 0.25)
    assert inception_score(uniform) == pytest.approx(1.0, abs=1e-12)
    one_class = np.tile(np.eye(10)[3], (20, 1))  # confident but no diversity
    assert inception_score(one_class) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_hand_computed():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    # p(y) = (0.75, 0.25); KL1 = ln(1/0.75); KL2 = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25).
    kl1 = math.log(1 / 0.75)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert inception_score(probs) == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-12)
    # Two splits: each chunk is its own marginal, so each scores 1.
    assert inception_score(probs, splits=2) == pytest.approx(1.0)


def test_inception_score_rejects_non_probabilities():
    with pytest.raises(ValueError):
        inception_score(np.array([[0.5, 0.6]]))
    with pytest.raises(ValueError):
        inception_score(np.eye(3), splits=4)


# --- PSNR ----------------------------------------------------------------------------------------------


def test_psnr_known_values():
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    b = np.full((8, 8, 3), 110, dtype=np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    assert psnr(a, b) == pytest.approx(28.1308, abs=1e-4)
    # uint8 must not wrap around (100 - 110 = 246 in uint8).
    assert psnr(b, a) == pytest.approx(psnr(a, b))
    assert psnr(a, a) == math.inf
    assert psnr(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(28.1308, abs=1e-4)


def test_psnr_batch_is_mean_of_per_image_values():
    a = np.zeros((2, 4, 4, 1))
    b = np.stack([np.full((4, 4, 1), 10.0), np.full((4, 4, 1), 20.0)])
    expected = (10 * math.log10(255**2 / 100) + 10 * math.log10(255**2 / 400)) / 2
    assert psnr(a, b) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


# --- SSIM ----------------------------------------------------------------------------------------------


def _naive_ssim(a, b, data_range=255.0):
    """Wang et al. 2004 SSIM by explicit loops: every 11x11 window, Gaussian-weighted statistics."""
    x = np.arange(11) - 5.0
    w = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    values = []
    for ch in range(a.shape[2]):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i : i + 11, j : j + 11, ch], b[i : i + 11, j : j + 11, ch]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    batch = rng.integers(0, 256, size=(3, 16, 20, 3), dtype=np.uint8)
    assert ssim(batch, batch) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_naive_reference():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(16, 14, 2)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 25, size=a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_naive_ssim(a, b), abs=1e-12)
    batch_a, batch_b = np.stack([a, b]), np.stack([b, 255 - a])
    expected = (_naive_ssim(a, b) + _naive_ssim(b, 255 - a)) / 2
    assert ssim(batch_a, batch_b) == pytest.approx(expected, abs=1e-12)


def test_ssim_constant_images_closed_form():
    # No variance anywhere: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a, b = np.full((12, 12, 1), 100.0), np.full((12, 12, 1), 150.0)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rel=1e-12)


def test_ssim_decreases_with_noise():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:32, 0:32]
    image = np.stack([128 + 100 * np.sin(xx / 4), 128 + 100 * np.cos(yy / 5), (xx + yy) * 4.0], -1)  # (32, 32, 3)
    scores = [ssim(image, image + rng.normal(0, sigma, image.shape)) for sigma in (2, 10, 30, 80)]
    assert (np.diff(scores) < 0).all(), scores
    assert scores[0] > 0.95 and scores[-1] < 0.5
    assert ssim(image, image + 10) == pytest.approx(ssim(image + 10, image))


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError):
        ssim(np.zeros((10, 10, 3)), np.zeros((10, 10, 3)))
    with pytest.raises(ValueError):
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 1)))
