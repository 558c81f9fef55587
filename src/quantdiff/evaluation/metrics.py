"""Image-quality metrics as pure functions of arrays: FID, Inception Score, PSNR, SSIM.

No torchvision-based package (torchmetrics, pytorch-fid, clean-fid, lpips) installs next to CPU torch,
so these are written out in numpy / scipy, following the reference implementations they cite.
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.linalg
from scipy.special import xlogy

# pytorch-fid's offset for singular covariance products, and its tolerance for imaginary parts.
_FID_EPS = 1e-6
_FID_IMAG_ATOL = 1e-3


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """Caps BLAS / LAPACK at one thread (a no-op without threadpoolctl, which scikit-learn installs).

    The matrices here are at most a few thousand wide, too small to gain from threads, while OpenBLAS's
    spinning workers on a busy 2-core machine made one 128x128 ``sqrtm`` take 1.7 s instead of 0.01 s.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = _FID_EPS
) -> float:
    r"""Fréchet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    .. math::
        d^2 = \lVert \mu_1 - \mu_2 \rVert_2^2 + \operatorname{tr}\bigl(\Sigma_1 + \Sigma_2
              - 2 (\Sigma_1 \Sigma_2)^{1/2}\bigr)

    (Dowson & Landau 1982; used as FID by Heusel et al. 2017, "GANs trained by a two time-scale update
    rule converge to a local Nash equilibrium"). Follows pytorch-fid: when ``sqrtm`` of the product is not
    finite (near-singular covariances, e.g. fewer samples than dimensions) it retries with ``eps * I``
    added to both covariances; an imaginary part left by round-off is dropped if its diagonal is
    below 1e-3, else it is an error. Round-off below zero is clamped: a distance is non-negative.

    Args:
        mu1: (D,) mean of the first set.
        sigma1: (D, D) covariance of the first set.
        mu2: (D,) mean of the second set.
        sigma2: (D, D) covariance of the second set.
        eps: diagonal offset for the singular case.

    Returns:
        The squared Fréchet distance (what papers report as FID).

    Raises:
        ValueError: mismatched shapes, or a square root with a large imaginary component.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, dtype=np.float64)),
        np.atleast_2d(np.asarray(sigma2, dtype=np.float64)),
    )
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"covariances must be ({dim}, {dim}), got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2  # (D,)
    with _single_threaded_blas():
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)  # (D, D)
        if not np.isfinite(covmean).all():
            offset = np.eye(dim) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_FID_IMAG_ATOL):
            raise ValueError(f"sqrtm of the covariance product has an imaginary component of {largest:.3g}")
        covmean = covmean.real
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(distance, 0.0))


def _gaussian_fit(features: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) with N >= 2, got {features.shape}")
    with _single_threaded_blas():
        sigma = np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])  # (D, D)
    return features.mean(axis=0), sigma


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets: ``frechet_distance`` of their Gaussian fits (mean, unbiased covariance).

    Args:
        features_a: (N, D) features of the first image set (e.g. ``DigitsEvaluator.features``).
        features_b: (M, D) features of the second.
    """
    mu_a, sigma_a = _gaussian_fit(features_a, "features_a")
    mu_b, sigma_b = _gaussian_fit(features_b, "features_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} and {mu_b.shape[0]}")
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def inception_score(probs: np.ndarray, splits: int = 1) -> float:
    r"""Inception Score of class probabilities (Salimans et al. 2016, "Improved techniques for training GANs").

    .. math::
        \mathrm{IS} = \exp\Bigl(\mathbb{E}_x\, \mathrm{KL}\bigl(p(y \mid x) \,\Vert\, p(y)\bigr)\Bigr),
        \qquad p(y) = \mathbb{E}_x\, p(y \mid x)

    It lies in [1, C]: 1 when every image gets the same prediction, C when predictions are confident and
    the classes evenly used. As in the original code, the samples are cut into ``splits`` consecutive
    chunks, the score is computed on each (with that chunk's marginal) and the chunk scores are averaged.

    Args:
        probs: (N, C) rows of class probabilities (each sums to 1).
        splits: number of chunks, 1 <= splits <= N.

    Returns:
        The mean score over the chunks.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (N, C) with N >= 1, got {probs.shape}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs rows must be probability distributions (non-negative, summing to 1)")
    if not 1 <= splits <= probs.shape[0]:
        raise ValueError(f"splits must be in [1, {probs.shape[0]}], got {splits}")
    scores = []
    for chunk in np.array_split(probs, splits):  # (n, C) each
        marginal = chunk.mean(axis=0, keepdims=True)  # (1, C)
        # xlogy gives 0 * log 0 = 0: a class a sample never predicts adds nothing.
        kl = (xlogy(chunk, chunk) - xlogy(chunk, marginal)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _image_batch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as (N, H, W, C) float64, an (H, W, C) image becoming a batch of one."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 3:
        return a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"images must be (H, W, C) or (N, H, W, C), got {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    r"""Peak signal-to-noise ratio in dB, averaged over the batch.

    .. math::
        \mathrm{PSNR} = 10 \log_{10} \frac{L^2}{\mathrm{MSE}(a, b)}

    with ``L = data_range`` and the MSE over all pixels and channels of one image. Per-image values are
    averaged (not the MSE over the batch), so one identical pair (PSNR = inf) makes the mean inf.

    Args:
        a: (H, W, C) or (N, H, W, C) image(s), uint8 or float.
        b: same shape as ``a``.
        data_range: the value range L (255 for uint8, 1 or 2 for float images in [0, 1] / [-1, 1]).
    """
    a, b = _image_batch(a, b)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))  # (N,)
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(data_range**2 / mse)
    return float(per_image.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """(size,) normalised 1-D Gaussian; its outer product is Wang et al.'s 2-D window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (N, H, W, C) over H and W: (N, H-k+1, W-k+1, C)."""
    k = len(window)
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=1) @ window  # (N, H-k+1, W, C)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=2) @ window  # (N, H-k+1, W-k+1, C)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    r"""Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004, IEEE TIP 13(4)), averaged over the batch.

    .. math::
        \mathrm{SSIM}(x, y) = \frac{(2 \mu_x \mu_y + C_1)(2 \sigma_{xy} + C_2)}
                                   {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (K_1 L)^2,\ C_2 = (K_2 L)^2

    with local statistics weighted by an 11x11 Gaussian window (sigma 1.5, normalised), K1 = 0.01,
    K2 = 0.03, L = ``data_range``, exactly as the authors' MATLAB ``ssim_index``: the window is applied only
    where it fits ('valid', no padding) and the variances are the window-weighted (biased) ones. Each
    channel is scored separately; an image's SSIM is the mean of its map over positions and channels,
    and the result is the mean over the batch.

    Args:
        a: (H, W, C) or (N, H, W, C) image(s), H and W >= 11, uint8 or float.
        b: same shape as ``a``.
        data_range: the value range L.
    """
    a, b = _image_batch(a, b)
    if min(a.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {a.shape[1]}x{a.shape[2]}")
    window = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a**2
    var_b = _filter_valid(b * b, window) - mu_b**2
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )  # (N, H-10, W-10, C)
    return float(ssim_map.mean(axis=(1, 2, 3)).mean())
