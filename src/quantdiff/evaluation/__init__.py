"""Offline evaluation building blocks of ``quantdiff eval``: image metrics (FID from features, Inception
Score, PSNR, SSIM), real-model metrics with local weights (FID Inception-v3, CLIPScore, ImageReward) and
the prompt sets a model folder carries (``prompt_sets``).

Nothing here downloads anything. The digits data set and its evaluator CNN, which judge the bundled
digits models, belong to the digits demo (``quantdiff.demo.digits``).
"""

from quantdiff.evaluation.metrics import fid_from_features, frechet_distance, inception_score, psnr, ssim
from quantdiff.evaluation.real_metrics import (
    ClipBundle,
    FIDInceptionV3,
    clip_embeddings,
    clip_score,
    clip_scores,
    image_reward,
    image_reward_scores,
    inception_features,
    inception_fid,
    inception_fid_from_features,
    load_clip,
    load_image_reward,
    load_inception,
)

__all__ = [
    "ClipBundle",
    "FIDInceptionV3",
    "clip_embeddings",
    "clip_score",
    "clip_scores",
    "fid_from_features",
    "frechet_distance",
    "image_reward",
    "image_reward_scores",
    "inception_features",
    "inception_fid",
    "inception_fid_from_features",
    "inception_score",
    "load_clip",
    "load_image_reward",
    "load_inception",
    "psnr",
    "ssim",
]
