"""Real-model metrics (FID Inception, CLIPScore, ImageReward) on random-weight networks of the real classes.

The FID Inception is the full-size architecture with seeded random weights saved as safetensors (its
forward is ~6 GFLOP per image, so the image sets are tiny); CLIP is a 2-layer CLIPModel saved with its
tokenizer and PIL image processor; ImageReward is only checked for its errors (its package and weights
are not installed here).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantdiff.errors import QuantDiffError
from quantdiff.evaluation.metrics import fid_from_features, frechet_distance
from quantdiff.evaluation.real_metrics import (
    INCEPTION_FEATURES,
    BasicConv2d,
    FIDInceptionV3,
    clip_embeddings,
    clip_score,
    clip_scores,
    image_reward,
    inception_features,
    inception_fid,
    inception_fid_from_features,
    load_clip,
    load_image_reward,
    load_inception,
)

# --- FID ---------------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_isotropic_gaussians():
    # mu1 = 0, mu2 = 1 (D = 3), sigma1 = I, sigma2 = 4I: |mu|^2 = 3; tr(I + 4I - 2 (4I)^1/2) = 3 * (5 - 4) = 3.
    dim = 3
    mu1, mu2 = np.zeros(dim), np.ones(dim)
    assert frechet_distance(mu1, np.eye(dim), mu2, 4 * np.eye(dim)) == pytest.approx(6.0, rel=1e-9)


def test_cross_gram_fid_equals_covariance_fid():
    """The sample-space route (few images) and pytorch-fid's covariance route give the same number."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8)) + 0.5
    expected = fid_from_features(a, b)
    # Zero columns leave FID unchanged and make D = 40 so that 30 * 40 <= 40^2 takes the cross-Gram route.
    padded = inception_fid_from_features(np.pad(a, ((0, 0), (0, 32))), np.pad(b, ((0, 0), (0, 32))))
    assert padded == pytest.approx(expected, rel=1e-6)
    assert inception_fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)  # 30 * 40 > 64: covariance route


def _random_inception(seed: int) -> FIDInceptionV3:
    """Seeded random FID Inception whose activations neither vanish nor explode over ~50 layers.

    He-initialised convolutions and random (but near-identity) BatchNorm statistics, so every tensor of
    the file is non-trivial and a wrongly mapped key would change the features.
    """
    generator = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BasicConv2d):
                weight = module.conv.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * (2.0 / weight[0].numel()) ** 0.5)
                channels = module.bn.num_features
                module.bn.weight.copy_(0.8 + 0.4 * torch.rand(channels, generator=generator))
                module.bn.bias.copy_(0.05 * torch.randn(channels, generator=generator))
                module.bn.running_mean.copy_(0.05 * torch.randn(channels, generator=generator))
                module.bn.running_var.copy_(0.8 + 0.4 * torch.rand(channels, generator=generator))
        model.fc.weight.copy_(0.01 * torch.randn(model.fc.weight.shape, generator=generator))
    return model.eval()


@pytest.fixture
def one_thread():
    """The 299x299 convolutions on one torch thread: with 2 threads on a machine busy with another job,
    oversubscription made them 4-10x slower than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    model = _random_inception(seed=0)
    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def _images(seed: int, count: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def test_inception_loads_and_gives_deterministic_2048d_features(inception_file, one_thread):
    path, reference = inception_file
    model = load_inception(path)
    assert not model.training
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    images = _images(0, 4)
    features = inception_features(model, images, batch_size=3)  # batches of 3 + 1
    assert features.shape == (4, INCEPTION_FEATURES)
    assert np.isfinite(features).all() and features.std(axis=0).max() > 0
    again = inception_features(model, images[::-1].copy(), batch_size=4)[::-1]
    np.testing.assert_allclose(again, features, rtol=1e-4, atol=1e-6)

    # FID(a, a) is 0; a different set is farther.
    assert inception_fid_from_features(features, features) == pytest.approx(0.0, abs=1e-8)
    other = inception_features(model, _images(1, 4, size=24) // 2, batch_size=4)  # darker, other size
    assert inception_fid_from_features(features, other) > 1e-4
    assert inception_fid(model, images[:2], images[:2]) == pytest.approx(0.0, abs=1e-8)


def test_inception_rejects_missing_and_mismatched_files(inception_file, tmp_path, one_thread):
    path, _ = inception_file
    with pytest.raises(QuantDiffError, match="not found.*pytorch-fid"):
        load_inception(tmp_path / "nope.safetensors")

    from safetensors.torch import load_file

    tensors = load_file(str(path))
    del tensors["Mixed_6b.branch7x7_2.conv.weight"]
    tensors["head.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(QuantDiffError, match=r"1 missing \(e\.g\. Mixed_6b\.branch7x7_2\.conv\.weight\).*head\.weight"):
        load_inception(broken)

    without_counters = {k: v for k, v in load_file(str(path)).items() if not k.endswith("num_batches_tracked")}
    lean = tmp_path / "lean.safetensors"
    save_file(without_counters, str(lean))
    load_inception(lean)  # BatchNorm counters are optional

    pickled = tmp_path / "pt_inception.pth"
    torch.save({"fc.bias": torch.zeros(1008)}, pickled)
    with pytest.raises(QuantDiffError, match="pickled"):
        load_inception(pickled)


# --- CLIPScore ---------------------------------------------------------------------------------------------

PROMPTS = ["a red fox in the snow", "a blue car on a road", "a green apple", "a cat wearing a hat"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from quantdiff.testing.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(PROMPTS, min_frequency=1, model_max_length=16)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_is_bounded_deterministic_and_matches_hand_computation(clip_folder):
    bundle = load_clip(clip_folder)
    images = _images(2, len(PROMPTS), size=40)  # resized 40 -> 32 by the processor
    scores = clip_scores(bundle, images, PROMPTS, batch_size=3)
    assert scores.shape == (len(PROMPTS),)
    assert ((scores >= 0) & (scores <= 100)).all()
    score = clip_score(bundle, images, PROMPTS)
    assert 0.0 <= score <= 100.0
    assert score == pytest.approx(float(scores.mean()), abs=1e-5)
    assert clip_score(bundle, list(images), PROMPTS) == pytest.approx(score, abs=1e-6)  # list input, same result

    # One image by hand, straight from the model's projections.
    pixels = bundle.image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
    tokens = bundle.tokenizer([PROMPTS[0]], return_tensors="pt")
    with torch.no_grad():
        image_out = bundle.model.get_image_features(pixel_values=pixels)
        text_out = bundle.model.get_text_features(**tokens)
    image_emb = getattr(image_out, "pooler_output", image_out)[0]
    text_emb = getattr(text_out, "pooler_output", text_out)[0]
    cosine = float(image_emb @ text_emb / (image_emb.norm() * text_emb.norm()))
    assert scores[0] == pytest.approx(100 * max(cosine, 0.0), abs=1e-4)

    image_emb, text_emb = clip_embeddings(bundle, images[:2], PROMPTS[:2])
    assert image_emb.shape == text_emb.shape == (2, 16)
    np.testing.assert_allclose(image_emb.norm(dim=-1).numpy(), 1.0, rtol=1e-5)


def test_load_clip_errors(tmp_path, clip_folder):
    with pytest.raises(QuantDiffError, match="not found"):
        load_clip(tmp_path / "missing")
    with pytest.raises(QuantDiffError, match="no config.json"):
        load_clip(tmp_path)
    text_only = tmp_path / "text_encoder"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "clip_text_model"}')
    with pytest.raises(QuantDiffError, match="only half of CLIP"):
        load_clip(text_only)
    other = tmp_path / "vae"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(QuantDiffError, match="not CLIP"):
        load_clip(other)
    with pytest.raises(ValueError, match="prompts"):
        clip_score(load_clip(clip_folder), _images(0, 2), PROMPTS[:1])


# --- ImageReward -------------------------------------------------------------------------------------------


def test_image_reward_names_every_missing_piece(tmp_path):
    images = _images(0, 1)
    with pytest.raises(QuantDiffError) as caught:
        image_reward(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", images, ["a fox"])
    message = str(caught.value)
    assert "ImageReward.pt" in message and "med_config.json" in message
    assert "huggingface.co/THUDM/ImageReward" in message
    if importlib.util.find_spec("ImageReward") is None:
        assert "pip install image-reward" in message


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="ImageReward is installed")
def test_image_reward_without_the_package(tmp_path):
    checkpoint, config = tmp_path / "ImageReward.pt", tmp_path / "med_config.json"
    checkpoint.write_bytes(b"")
    config.write_text("{}")
    with pytest.raises(QuantDiffError, match=r"not installed \(pip install image-reward") as caught:
        load_image_reward(checkpoint, config)
    assert "not found" not in str(caught.value)  # the files exist: only the package is named
    with pytest.raises(ValueError, match="one prompt per image"):
        image_reward(checkpoint, config, _images(0, 2), ["a fox"])


def test_eval_command_reports_real_metrics(tiny_folders, inception_file, clip_folder, tmp_path, one_thread):
    """`quantdiff eval --inception-weights --clip-model` fills fid_inception (vs FP) and clip_score."""
    import json

    from quantdiff.cli import main

    quantized = tmp_path / "w8a16"
    assert main(["--quiet", "quantize", tiny_folders["sd15"], "--recipe", "w8a16", "--out", str(quantized)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\n")
    out = tmp_path / "eval"
    argv = ["--quiet", "eval", tiny_folders["sd15"], str(quantized), "--out", str(out), "--num-images", "3"]
    argv += ["--prompts", str(prompts), "--steps", "2", "--inception-weights", str(inception_file[0])]
    assert main(argv + ["--clip-model", str(clip_folder)]) == 0
    fp, q = (model["metrics"] for model in json.loads((out / "report.json").read_text())["models"])
    assert fp["fid_inception"] is None
    # the same images again (same seeds), scored here with the metrics' own functions, network by network
    from quantdiff.evaluate import EvalSettings, evaluate

    _, images = evaluate(
        tiny_folders["sd15"],
        [str(quantized)],
        settings=EvalSettings(num_images=3, steps=2),
        prompts=["a red fox", "a blue car"],
        progress=False,
    )
    texts = ["a red fox", "a blue car", "a red fox"]
    inception = load_inception(str(inception_file[0]))
    expected_fid = inception_fid_from_features(
        inception_features(inception, images["w8a16"]), inception_features(inception, images["fp"])
    )
    assert q["fid_inception"] == pytest.approx(expected_fid, rel=1e-6, abs=1e-9)
    clip = load_clip(str(clip_folder))
    for metrics, name in ((fp, "fp"), (q, "w8a16")):
        image_emb, text_emb = clip_embeddings(clip, images[name], texts)  # unit-norm (3, P) each
        cosines = (image_emb.double() * text_emb.double()).sum(dim=-1)
        assert metrics["clip_score"] == pytest.approx(float((100 * cosines).clamp(min=0).mean()), rel=1e-5, abs=1e-6)
    assert fp["image_reward"] is None
