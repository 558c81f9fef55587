"""The shipped digits evaluator: loads from the package, reads held-out renders right, orders FIDs sensibly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantdiff.demo.digits.data import COLOURS, heldout_combinations, make_dataset
from quantdiff.demo.digits.evaluator import (
    DigitsEvaluator,
    EvaluatorConfig,
    adherence,
    digits_inception_score,
    fid_digits,
    head_accuracies,
    images_to_tensor,
    load_evaluator,
    predict,
    read_metadata,
    save_evaluator,
    shipped_evaluator_path,
)
from quantdiff.evaluation import fid_from_features, inception_score


@pytest.fixture(scope="module")
def evaluator() -> DigitsEvaluator:
    return load_evaluator()


@pytest.fixture(scope="module")
def real_eval():
    """The held-out real split the accuracy requirement is stated on."""
    return make_dataset(1000, split="eval", combos="all", seed=123)


@pytest.fixture(scope="module")
def real_predictions(evaluator, real_eval):
    """The evaluator's view of ``real_eval``, computed once (the CPU is shared)."""
    return predict(evaluator, real_eval.images)


def test_shipped_file_is_small_safe_and_self_describing(evaluator):
    path = shipped_evaluator_path()
    assert path.is_file()
    size = len(path.read_bytes())
    assert size < 2 * 1024 * 1024
    metadata = read_metadata(str(path))
    config = EvaluatorConfig.from_json(metadata["config"])
    assert config == evaluator.config and config.colours == COLOURS
    assert 100_000 <= sum(p.numel() for p in evaluator.parameters()) <= 300_000
    assert json.loads(metadata["training"])["seed"] == 0
    assert not evaluator.training


def test_accuracy_on_heldout_real_split(real_eval, real_predictions):
    accuracy = adherence(real_predictions, real_eval.specs)
    assert accuracy["digit"] >= 0.98, accuracy
    assert accuracy["foreground"] >= 0.98, accuracy
    assert accuracy["background"] >= 0.98, accuracy


def test_accuracy_on_heldout_combinations(evaluator):
    data = make_dataset(400, split="eval", combos="heldout", seed=7)
    assert set(data.specs) <= heldout_combinations()
    accuracy = head_accuracies(evaluator, data)
    assert min(accuracy["digit"], accuracy["foreground"], accuracy["background"]) >= 0.97, accuracy


def test_features_and_predictions_shapes(evaluator, real_eval):
    images = real_eval.images[:50]
    x = images_to_tensor(images)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    with torch.no_grad():
        feats = evaluator.features(x)
        out = evaluator(x)
    assert feats.shape == (50, evaluator.config.feature_dim) == (50, 128)
    assert out.digit.shape == (50, 10) and out.foreground.shape == (50, 8) and out.background.shape == (50, 8)
    predictions = predict(evaluator, images, batch_size=16)  # several batches
    assert predictions.features.shape == (50, 128) and np.isfinite(predictions.features).all()
    assert np.allclose(predictions.features, feats.numpy(), atol=1e-5)
    assert np.allclose(predictions.digit.sum(1), 1.0)
    assert sum(p == s for p, s in zip(predictions.specs(), real_eval.specs[:50], strict=True)) >= 48
    with pytest.raises(ValueError):
        images_to_tensor(images.astype(np.float32))


def test_adherence_detects_wrong_prompts(real_eval, real_predictions):
    assert adherence(real_predictions, real_eval.specs)["all"] >= 0.98
    # The same images judged against shifted prompts: most no longer match.
    shifted = real_eval.specs[1:] + real_eval.specs[:1]
    assert adherence(real_predictions, shifted)["all"] < 0.2
    with pytest.raises(ValueError):
        adherence(real_predictions, real_eval.specs[:10])


def test_fid_digits_orders_real_above_corrupted(evaluator, real_predictions):
    b = make_dataset(800, split="eval", combos="all", seed=2).images
    features_a = real_predictions.features  # (1000, 128)
    real = fid_from_features(features_a, predict(evaluator, b).features)
    part = b[:400]
    corrupted = {
        "inverted colours": 255 - part,  # off-palette: cyan, magenta, ...
        "grayscale": np.repeat(part.mean(-1, keepdims=True), 3, -1).astype(np.uint8),
        "uniform noise": np.random.default_rng(0).integers(0, 256, part.shape, dtype=np.uint8),
    }
    for name, images in corrupted.items():
        distance = fid_from_features(features_a, predict(evaluator, images).features)
        assert 4 * real < distance, (name, real, distance)


def test_fid_digits_is_fid_of_evaluator_features(evaluator, real_eval, real_predictions):
    from scipy.linalg import sqrtm

    a, b = real_eval.images[:150], real_eval.images[150:300]
    # the Frechet distance of the two Gaussian fits, written out here in float64 with scipy's matrix square root
    fa, fb = (real_predictions.features[rows].astype(np.float64) for rows in (slice(0, 150), slice(150, 300)))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sigma_a, sigma_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * sqrtm(sigma_a @ sigma_b).real))
    assert fid_digits(evaluator, a, b) == pytest.approx(expected, rel=1e-4)
    assert fid_from_features(fa, fb) == pytest.approx(expected, rel=1e-4)


def test_inception_score_of_digit_head(evaluator, real_eval, real_predictions):
    real_score = inception_score(real_predictions.digit)
    assert real_score > 8.5  # confident and balanced: close to the maximum of 10
    assert digits_inception_score(evaluator, real_eval.images[:300]) > 8.0
    noise = np.random.default_rng(1).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    assert digits_inception_score(evaluator, noise) < real_score / 2


def test_save_load_round_trip_and_refusals(evaluator, real_eval, tmp_path):
    path = save_evaluator(evaluator, tmp_path / "e.safetensors", extra_metadata={"note": "copy"})
    again = load_evaluator(path)
    x = images_to_tensor(real_eval.images[:20])
    with torch.no_grad():
        assert torch.equal(again.features(x), evaluator.features(x))
    assert read_metadata(path)["note"] == "copy"

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a digits evaluator"):
        load_evaluator(other)
    metadata = read_metadata(path)
    palette = json.loads(metadata["palette"])
    palette["red"] = [200, 0, 0]
    tensors = {k: v.contiguous() for k, v in evaluator.state_dict().items()}
    save_file(tensors, str(tmp_path / "repainted.safetensors"), metadata={**metadata, "palette": json.dumps(palette)})
    with pytest.raises(ValueError, match="palette"):
        load_evaluator(tmp_path / "repainted.safetensors")


def test_untrained_model_fails_the_accuracy_bar(real_eval):
    torch.manual_seed(0)
    untrained = DigitsEvaluator().eval()
    accuracy = head_accuracies(untrained, make_dataset(200, split="eval", combos="all", seed=123))
    assert accuracy["digit"] < 0.5 and accuracy["all"] < 0.1
    # head_accuracies is the same measurement as the shipped model's check.
    shipped = head_accuracies(load_evaluator(), make_dataset(200, split="eval", combos="all", seed=123))
    assert shipped["all"] >= 0.97
    assert accuracy["digit"] < 0.5 and accuracy["all"] < 0.1
