"""The shipped trained models load with plain diffusers, generate, and follow their prompts.

Measured by the main job on 300 images (README): alignment (digit, foreground and background all right)
91.7% for digits-sd and 89.7% for digits-sd3. Here 16 images, so the bounds leave room for sampling
noise and for float differences between machines (one image is 6 points).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from quantdiff.demo.digits.evaluator import adherence, load_evaluator, predict
from quantdiff.evaluate import generate_set
from quantdiff.evaluation.prompt_sets import read_calibration_prompts, read_evaluation_set
from quantdiff.pipelines.bundled import TRAINED, resolve_model


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_model_follows_its_prompts(name):
    folder = resolve_model(name)
    # digits-sd3 has no T5: plain diffusers wants that said explicitly (quantdiff's load_pipeline does it).
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "digits-sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **no_t5)
    evaluation = read_evaluation_set(folder)
    assert evaluation is not None and len(read_calibration_prompts(folder)) >= 32
    prompts = list(evaluation.prompts[:16])
    generated = generate_set(
        pipe,
        [p.text for p in prompts],
        list(range(len(prompts))),
        steps=evaluation.steps,
        guidance=evaluation.guidance,
        batch_size=len(prompts),
        desc=name,
        progress=False,
    )
    images = generated.images  # (16, 32, 32, 3) uint8
    assert images.shape == (16, 32, 32, 3) and torch.isfinite(generated.latents).all()
    scores = adherence(predict(load_evaluator(), images), [p.spec for p in prompts])
    # The full measurement (hundreds of images) is `quantdiff eval`. Chance: 1/8 per colour, 1/640 for all three.
    assert scores["foreground"] >= 0.875 and scores["background"] >= 0.875, scores
    assert scores["all"] >= 0.75, scores
