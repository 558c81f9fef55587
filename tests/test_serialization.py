"""Quantized folders: exact round trips, self-contained copies, and clear errors on damaged folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from quantdiff.atomic import atomic_directory
from quantdiff.errors import FormatError, QuantDiffError
from quantdiff.generate import generate, load_any_pipeline
from quantdiff.nn.quantized import QuantizedLayer
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.quantize import quantize_denoiser
from quantdiff.serialization import load_quantized_denoiser, save_quantized

ROUND_TRIPS = [("sd15", "w8a8"), ("sdxl", "w4a16"), ("sd3", "w4a8"), ("pixart", "w8a8")]


@pytest.mark.parametrize("arch, recipe", ROUND_TRIPS)
def test_quantize_save_load_is_bit_identical(tiny_folders, calibration_sets, tmp_path, arch, recipe):
    calibration, held_out = calibration_sets[arch]
    pipe = load_pipeline(tiny_folders[arch])
    _, denoiser = denoiser_of(pipe)
    quantize_denoiser(denoiser, recipe, calibration.subset(4), progress=False)
    save_quantized(pipe, tmp_path / "q", base_path=tiny_folders[arch])
    loaded = load_quantized_denoiser(tmp_path / "q")
    assert sum(isinstance(m, QuantizedLayer) for m in loaded.modules()) == len(loaded.quantdiff_info.plan.quantized)
    for a, b in zip(held_out.replay(denoiser, progress=False), held_out.replay(loaded, progress=False), strict=True):
        assert torch.equal(a, b)
    # The whole pipeline, loaded from the quantized folder alone, makes the same image.
    image, _ = generate(pipe, "a cat wearing a hat", steps=3, seed=1, progress=False)
    image_loaded, parameters = generate(
        load_any_pipeline(tmp_path / "q"), "a cat wearing a hat", steps=3, seed=1, progress=False
    )
    assert image.tobytes() == image_loaded.tobytes()
    assert parameters["quantization"].startswith(recipe.upper()[:2])


@pytest.fixture(scope="module")
def saved(tiny_folders, tmp_path_factory):
    """A W8A16 tiny SD1.5 quantized folder whose base pipeline lives in its own copy (safe to move)."""
    root = tmp_path_factory.mktemp("saved")
    base = shutil.copytree(tiny_folders["sd15"], root / "base")
    pipe = load_pipeline(base)
    quantize_denoiser(denoiser_of(pipe)[1], "w8a16", progress=False)
    save_quantized(pipe, root / "q", base_path=base)
    save_quantized(pipe, root / "q-self", base_path=base, copy_components=True)
    return root


def test_weights_are_stored_as_integers(saved):
    from safetensors import safe_open

    with safe_open(saved / "q" / "unet" / "quantized.safetensors", "pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes["down_blocks.0.resnets.0.conv1.weight_q"] == "I8"
    assert dtypes["down_blocks.0.resnets.0.conv1.weight_scale"] == "F32"
    assert "down_blocks.0.resnets.0.conv1.weight" not in dtypes
    assert dtypes["conv_in.weight"] == "F32"  # default-ignored layer stays floating point
    config = json.loads((saved / "q" / "quantdiff.json").read_text())
    assert config["quant_method"] == "quantdiff" and config["format_version"] == 1
    assert config["recipe"]["name"] == "w8a16" and config["calibration"] is None
    assert config["plan"]["conv_in"]["weights"] is None
    assert set(config["base"]) >= {"path", "components_hash", "pipeline_class"}
    assert not (saved / "q" / "vae").exists() and (saved / "q-self" / "vae").is_dir()


def test_self_contained_folder_outlives_its_base(saved, tmp_path):
    moved = shutil.move(str(saved / "q-self"), tmp_path / "q-self")
    shutil.move(str(saved / "base"), tmp_path / "base-moved")
    try:
        image, _ = generate(load_any_pipeline(moved), "a dog", steps=2, seed=0, progress=False)
        assert image.size == (64, 64)
        with pytest.raises(FormatError, match="base pipeline folder .* is gone"):
            load_any_pipeline(saved / "q")
    finally:
        shutil.move(str(tmp_path / "base-moved"), saved / "base")


def _damaged(saved, tmp_path):
    damaged = shutil.copytree(saved / "q", tmp_path / "q")
    return damaged, json.loads((damaged / "quantdiff.json").read_text())


def test_newer_format_version_is_refused(saved, tmp_path):
    damaged, config = _damaged(saved, tmp_path)
    config["format_version"] = 99
    (damaged / "quantdiff.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="format version 99 .* upgrade quantdiff"):
        load_quantized_denoiser(damaged)


def test_truncated_weights_are_reported(saved, tmp_path):
    damaged, _ = _damaged(saved, tmp_path)
    weights = damaged / "unet" / "quantized.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load_quantized_denoiser(damaged)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load_quantized_denoiser(damaged)


def test_plan_and_tensors_must_agree(saved, tmp_path):
    damaged, config = _damaged(saved, tmp_path)
    config["plan"]["conv_in"]["weights"] = config["plan"]["conv_out"]["weights"] or config["recipe"]["weights"]
    (damaged / "quantdiff.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="does not match its plan"):
        load_quantized_denoiser(damaged)


def test_edited_denoiser_config_is_detected(saved, tmp_path):
    damaged, _ = _damaged(saved, tmp_path)
    config_path = damaged / "unet" / "config.json"
    unet_config = json.loads(config_path.read_text())
    unet_config["norm_eps"] = 1e-3
    config_path.write_text(json.dumps(unet_config))
    with pytest.raises(FormatError, match="changed after quantization"):
        load_quantized_denoiser(damaged)


def test_saving_requires_a_quantized_denoiser(tiny_folders, tmp_path):
    pipe = load_pipeline(tiny_folders["sd15"])
    with pytest.raises(FormatError, match="not quantized"):
        save_quantized(pipe, tmp_path / "q", base_path=tiny_folders["sd15"])
    assert not (tmp_path / "q").exists()


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "done.txt").write_text("done")
    assert (tmp_path / "out" / "done.txt").read_text() == "done"
    with pytest.raises(QuantDiffError, match="already exists"):
        with atomic_directory(tmp_path / "out"):
            pass
    with atomic_directory(tmp_path / "out", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
