"""The digits-sd-turbo trainer: CLIP pretraining, LCM's formulas, one consistency step, frozen text encoder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from quantdiff.demo.digits.data import make_dataset
from quantdiff.demo.digits.training.common import MAX_TOKENS, images_to_tensor
from quantdiff.demo.digits.training.turbo import (
    DigitsTurboConfig,
    Distillation,
    SkippingGrid,
    boundary_scalings,
    build_student,
    build_text_encoder,
    guidance_embedding,
    lcd_step_loss,
    pretrain_text_encoder,
    train_digits_turbo,
)
from quantdiff.pipelines.bundled import trained_model_folder
from quantdiff.pipelines.loading import load_pipeline

TEACHER = trained_model_folder("digits-sd")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, as the trainer runs: a 2-thread OpenMP pool is ~50x slower on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TEACHER, subfolder="tokenizer", local_files_only=True)


def _tokens(tokenizer, texts):
    return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


def test_guidance_embedding_and_boundary_scalings_match_diffusers():
    w = torch.tensor([0.0, 1.5, 4.0, 7.25])
    # the pipeline's method does not use self: call it unbound
    expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=64)
    assert torch.equal(guidance_embedding(w, 64), expected)
    scheduler = LCMScheduler(beta_schedule="squaredcos_cap_v2", timestep_scaling=10.0)
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(skip, rel=1e-6) and c_out[i].item() == pytest.approx(out, rel=1e-6)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x: the boundary condition


def test_skipping_grid_is_the_lcm_schedulers():
    scheduler = LCMScheduler(beta_schedule="squaredcos_cap_v2", original_inference_steps=50)
    grid = SkippingGrid(scheduler.alphas_cumprod, 50)
    for steps in (1, 2, 4):
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(grid.timesteps.tolist())
    assert grid.timesteps[0] == 19 and grid.timesteps[-1] == 999 and grid.previous[0] == 0
    assert torch.equal(grid.previous[1:], grid.timesteps[:-1])


def test_contrastive_loss_falls_and_encoder_freezes(tokenizer):
    data = make_dataset(64, split="train", seed=0, combos="train")
    encoder = build_text_encoder(tokenizer, hidden_size=32, layers=1, seed=0)
    config = DigitsTurboConfig(text_steps=40, text_batch_size=32, text_lr=3e-3, image_width=8, log_every=1000)
    torch.manual_seed(0)
    losses = pretrain_text_encoder(
        encoder, tokenizer, images_to_tensor(data.images), _tokens(tokenizer, data.captions), config, log=print
    )
    print("clip losses", losses[:3], losses[-3:])
    # chance level is log(32) = 3.47; the pairs become separable
    assert np.mean(losses[:5]) > 3.0 and np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def _tiny_teacher(cross_dim: int) -> UNet2DConditionModel:
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    ).eval()


def test_student_starts_as_the_teacher_and_reads_the_guidance_scale():
    teacher = _tiny_teacher(16)
    student = build_student(teacher, guidance_embed_dim=32)
    assert student.config.time_cond_proj_dim == 32 and student.config.addition_embed_type == "text"
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        reference = teacher(x, t, encoder_hidden_states=context).sample
        started = student(
            x, t, timestep_cond=guidance_embedding(torch.tensor([2.0, 6.0]), 32), encoder_hidden_states=context
        ).sample
        assert torch.equal(started, reference)  # cond_proj is zero: the guidance input adds nothing yet
        student.time_embedding.cond_proj.weight.normal_()
        moved = student(
            x, t, timestep_cond=guidance_embedding(torch.tensor([2.0, 6.0]), 32), encoder_hidden_states=context
        ).sample
    assert (moved - reference).abs().max() > 1e-3  # and it is wired in


def _toy_distillation(teacher: UNet2DConditionModel, n: int = 16) -> Distillation:
    generator = torch.Generator().manual_seed(3)
    scheduler = LCMScheduler(beta_schedule="squaredcos_cap_v2")
    return Distillation(
        teacher=teacher,
        grid=SkippingGrid(scheduler.alphas_cumprod, 50),
        latents=torch.randn(n, 4, 8, 8, generator=generator),
        caption_index=torch.arange(n) % 4,
        teacher_context=torch.randn(4, 5, 16, generator=generator),
        student_context=torch.randn(4, 5, 16, generator=generator),
        teacher_empty=torch.randn(5, 16, generator=generator),
    )


def test_one_consistency_step_moves_the_student_toward_its_target():
    teacher = _tiny_teacher(16).requires_grad_(False)
    data = _toy_distillation(teacher)
    student = build_student(teacher, guidance_embed_dim=32)
    target = build_student(teacher, guidance_embed_dim=32).requires_grad_(False)  # fixed target for the check
    config = DigitsTurboConfig(batch_size=8, guidance_embed_dim=32, huber_c=1e-3)
    same_batch = lambda: torch.Generator().manual_seed(7)  # noqa: E731

    losses = []
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(10):  # the same batch each time: the student's distance to this target must shrink
        loss = lcd_step_loss(student, target, data, config, same_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("lcd losses", losses)
    assert losses[-1] < 0.7 * losses[0]  # (Adam's first step, the same size on every weight, may overshoot)
    # the teacher and the target got no update
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in target.parameters())


@pytest.fixture(scope="module")
def toy_turbo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo") / "digits-sd-turbo"
    config = DigitsTurboConfig(
        pool_size=64,
        text_layers=1,
        text_steps=3,
        text_batch_size=16,
        image_width=8,
        adapt_steps=2,
        lcd_steps=2,
        batch_size=4,
        probe_every=0,
    )
    lines: list[str] = []
    train_digits_turbo(folder, config, teacher_from=TEACHER, log=lines.append)
    return folder, config, lines


def test_toy_run_writes_a_few_step_pipeline(toy_turbo):
    folder, _, lines = toy_turbo
    assert any(line.startswith("text step 2") for line in lines) and any(
        line.startswith("lcd step 1") for line in lines
    )
    pipe = load_pipeline(folder)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim is not None
    images = []
    for steps in (1, 2, 4):
        out = pipe("a red seven on a white background", num_inference_steps=steps, guidance_scale=5.0, output_type="np")
        assert not pipe.do_classifier_free_guidance  # guidance is baked in: one UNet call per step
        images.append(out.images[0])
    assert all(image.shape == (32, 32, 3) and np.isfinite(image).all() for image in images)


def test_continuation_keeps_the_frozen_text_encoder_bit_identical(toy_turbo, tmp_path):
    folder, config, _ = toy_turbo
    lines: list[str] = []
    continued = tmp_path / "continued"
    train_digits_turbo(continued, replace(config, stage=1), teacher_from=TEACHER, init_from=folder, log=lines.append)
    assert any("stages A and B0 are skipped" in line for line in lines)
    before = load_file(folder / "text_encoder" / "model.safetensors")
    after = load_file(continued / "text_encoder" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    unet_before = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    unet_after = load_file(continued / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)  # while the UNet trained
    with pytest.raises(ValueError, match="stage >= 1"):
        train_digits_turbo(tmp_path / "x", config, teacher_from=TEACHER, init_from=folder)
