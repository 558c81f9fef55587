"""Calibration capture: hooks record exactly what the pipeline passes; storage and replay are exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CALIBRATION_PROMPTS, CAPTURE

from quantdiff.calibration import CalibrationSet, capture_calibration, default_prompts
from quantdiff.calibration.capture import spread_indices
from quantdiff.calibration.dataset import denoiser_output
from quantdiff.errors import CalibrationError
from quantdiff.pipelines.loading import denoiser_of, load_pipeline


def test_spread_indices():
    assert spread_indices(6, 3) == [0, 2, 5]
    assert spread_indices(50, 5) == [0, 12, 24, 37, 49]
    assert spread_indices(4, None) == [0, 1, 2, 3]
    assert spread_indices(4, 10) == [0, 1, 2, 3]


def test_default_prompts_ship_with_the_package():
    prompts = default_prompts()
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert sum('"' in p for p in prompts) >= 5  # text rendered inside images


def test_capture_keeps_evenly_spread_steps_and_both_guidance_branches(tiny_folders, calibration_sets, arch):
    calibration, held_out = calibration_sets[arch]
    assert len(calibration) == 4 * 3 and len(held_out) == 3
    assert [r.step_index for r in calibration.records[:3]] == [0, 2, 5]
    assert calibration.info["denoiser_class"] == denoiser_of(load_pipeline(tiny_folders[arch]))[1].__class__.__name__
    first = calibration.records[0].inputs
    sample = first.get("sample", first.get("hidden_states"))
    assert sample.shape[0] == 2  # unconditional + conditional, batched by the pipeline
    timesteps = [r.timestep for r in calibration.records[:3]]
    assert timesteps[0] > timesteps[1] > timesteps[2]  # noisiest first


def test_replay_reproduces_the_pipeline_calls_exactly(tiny_folders):
    pipe = load_pipeline(tiny_folders["sdxl"])
    _, unet = denoiser_of(pipe)
    seen = []
    handle = unet.register_forward_hook(lambda module, args, output: seen.append(denoiser_output(output).clone()))
    try:
        recorded = capture_calibration(pipe, CALIBRATION_PROMPTS[:2], **CAPTURE)
    finally:
        handle.remove()
    assert "added_cond_kwargs" in recorded.records[0].inputs  # SDXL's text_embeds / time_ids
    expected = [seen[prompt * 6 + step] for prompt in range(2) for step in (0, 2, 5)]
    replayed = list(recorded.replay(unet, progress=False))
    assert len(replayed) == len(expected)
    for a, b in zip(replayed, expected, strict=True):
        assert torch.equal(a, b)


def test_save_load_round_trip_is_exact(calibration_sets, tmp_path):
    calibration, _ = calibration_sets["sdxl"]
    calibration.save(tmp_path / "calib")
    loaded = CalibrationSet.load(tmp_path / "calib")
    assert loaded.info == json.loads(json.dumps(calibration.info))
    assert len(loaded) == len(calibration)
    for a, b in zip(loaded, calibration, strict=True):
        assert (a.prompt_index, a.step_index, a.timestep) == (b.prompt_index, b.step_index, b.timestep)
        _assert_same(a.inputs, b.inputs)


def _assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_noise_mode_pairs_real_text_with_gaussian_latents(tiny_folders, calibration_sets):
    pipe = load_pipeline(tiny_folders["sd3"])
    noise = capture_calibration(pipe, CALIBRATION_PROMPTS[:4], mode="noise", **CAPTURE)
    trajectory, _ = calibration_sets["sd3"]
    assert len(noise) == 4 * 3
    assert [r.step_index for r in noise.records[:3]] == [0, 2, 5]
    # Text conditioning is the pipeline's own; only the latents and timesteps are drawn.
    torch.testing.assert_close(
        noise.records[0].inputs["encoder_hidden_states"], trajectory.records[0].inputs["encoder_hidden_states"]
    )
    assert [r.timestep for r in noise.records[:3]] == pytest.approx([r.timestep for r in trajectory.records[:3]])
    latents = noise.records[1].inputs["hidden_states"]
    assert torch.equal(latents[0], latents[1])  # same latents in both guidance branches
    assert not torch.equal(latents, trajectory.records[1].inputs["hidden_states"])
    assert 0.7 < latents.std().item() / trajectory.records[0].inputs["hidden_states"].std().item() < 1.3


def test_calibration_from_another_model_is_refused(calibration_sets, tiny_folders):
    calibration, _ = calibration_sets["sd15"]
    _, other = denoiser_of(load_pipeline(tiny_folders["sdxl"]))
    with pytest.raises(CalibrationError, match="recorded on another model"):
        calibration.check_matches(other)


def test_corrupt_or_missing_calibration_is_reported(calibration_sets, tmp_path):
    calibration, _ = calibration_sets["sd15"]
    folder = calibration.save(tmp_path / "calib")
    shard = folder / "records-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CalibrationError, match="corrupt or truncated"):
        CalibrationSet.load(folder)
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationSet.load(tmp_path / "nowhere")
    with pytest.raises(CalibrationError, match="no calibration prompts"):
        capture_calibration(None, ["  "])
