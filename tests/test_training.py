"""The digits-sd trainer runs end to end at toy length and writes a pipeline that loads and generates."""

from __future__ import annotations

import numpy as np

from quantdiff.pipelines.loading import load_pipeline
from quantdiff.training.common import caption_vocabulary
from quantdiff.training.digits_sd import DigitsSDConfig, build_components, train_digits_sd


def test_caption_tokenizer_has_one_token_per_word():
    tokenizer = build_components(0)["tokenizer"]
    ids = tokenizer("a red seven on a white background").input_ids
    assert len(ids) == 2 + 7  # <|startoftext|>, one id per word, <|endoftext|>
    assert all(len(tokenizer(text).input_ids) <= tokenizer.model_max_length for text in caption_vocabulary())


def test_toy_training_run_writes_a_loadable_pipeline(tmp_path):
    config = DigitsSDConfig(pool_size=256, vae_steps=3, denoiser_steps=3, batch_size=8, threads=1)
    lines = []
    folder = train_digits_sd(tmp_path / "digits-sd", config, log=lines.append)
    assert any(line.startswith("vae step 0") for line in lines) and any("denoiser step 2" in line for line in lines)
    pipe = load_pipeline(folder)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latents, not SD's constant
    image = pipe("a red seven on a white background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
