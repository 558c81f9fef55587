"""The shipped trained models load with plain diffusers, generate, and follow their prompts.

Measured by the main job on 300 images (README): alignment (digit, foreground and background all right)
91.7% for digits-sd, 89.7% for digits-sd3 and 87.0% for digits-sd-turbo (2 steps). Here 16 images of the
25-step models, so the bounds leave room for sampling noise and for float differences between machines
(one image is 6 points); the few-step model makes all 100 evaluation prompts in about 1.5 s, so it is judged
on all of them (one image is 1 point; its first 16 happen to be hard: 11 right, 68.8%, vs 84% on all 100).
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
    count = 100 if evaluation.steps <= 4 else 16  # a few-step model: cheap, so measured on more images
    prompts = list(evaluation.prompts[:count])
    generated = generate_set(
        pipe,
        [p.text for p in prompts],
        list(range(len(prompts))),
        steps=evaluation.steps,
        guidance=evaluation.guidance,
        batch_size=min(len(prompts), 50),
        desc=name,
        progress=False,
    )
    images = generated.images  # (N, 32, 32, 3) uint8
    assert images.shape == (len(prompts), 32, 32, 3) and torch.isfinite(generated.latents).all()
    scores = adherence(predict(load_evaluator(), images), [p.spec for p in prompts])
    # The full measurement (hundreds of images) is `quantdiff eval`. Chance: 1/8 per colour, 1/640 for all three.
    assert scores["foreground"] >= 0.875 and scores["background"] >= 0.875, scores
    assert scores["all"] >= 0.75, scores
