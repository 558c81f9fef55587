"""Train ``digits-sd-turbo``: ``digits-sd`` distilled to 1-4 steps by latent consistency distillation.

The few-step model MixDQ studies (SDXL-Turbo, LCMs) differs from ``digits-sd`` in two ways that matter for
quantization: its text encoder is a CLIP text model pretrained *contrastively* and then frozen (as Stable
Diffusion's is, where the first token becomes a constant outlier), and it samples in 1-4 steps with the
guidance scale baked in, so each step's error is not averaged away by later ones. This trainer makes both:

A. a causal ``CLIPTextModel`` (the hidden size of digits-sd's, so the teacher UNet's cross-attention fits) is
   pretrained with CLIP's symmetric InfoNCE loss on captions against a tiny conv image encoder, then frozen;
B0. guided distillation (Meng et al., stage 1) as a warm start: a student UNet, initialised from the teacher's
   and given ``time_cond_proj_dim`` for the guidance scale ``w``, learns the teacher's classifier-free-guided
   prediction at scale ``w`` while reading the NEW frozen text encoder (the teacher reads its own), and
   switches from epsilon to v-prediction (see ``PREDICTION_TYPE``);
B. latent consistency distillation (Luo et al. 2023, LCM): on the 50-step DDIM skipping grid of the teacher's
   schedule (k = 20 training steps), the student at t_{n+k} must match an EMA target network at t_n on the
   point the teacher's guided DDIM step reaches, with LCM's boundary scalings and pseudo-Huber loss.

The folder is a ``StableDiffusionPipeline`` with diffusers' ``LCMScheduler``: because the UNet has
``time_cond_proj_dim``, the pipeline embeds ``guidance_scale - 1`` as ``timestep_cond`` and skips CFG (one
UNet call per step). Everything is deterministic from ``seed``; ``init_from`` continues a finished or
checkpointed run (its frozen text encoder and student UNet) with fresh batches (``stage`` >= 1).

Where digit accuracy is lost (issue 17; measured on 100 evaluation prompts, the digits evaluator): the
first run (500 stage-A steps, 600 B0 steps at 3e-4) ended at 67% alignment at 2 steps, colours right,
digits ~70%. Every stage was checked apart. The frozen encoder *does* carry the digit (a linear probe
reads it off its hidden states of unseen caption templates at 99.9%), but weakly against the images:
stage A's zero-shot image -> caption retrieval was 63% for the digit (100% for both colours), the tiny
image tower still learning digits when stage A stopped. The B0 student, sampled with 25 DDIM steps
(no consistency step involved), was already at 67% digits after 600 steps, and 71% after 300 more;
the same B0 reading the *teacher's* text encoder instead reached 85% after 150 steps and 93% after
600. So the digits are lost where the student learns to read the new encoder, and consistency
distillation only keeps what B0 hands it (LCD's plateau at 65-70% from step ~500). Hence the
defaults: stage A 1500 steps (zero-shot digit retrieval 92%: the text encoder's digit directions are
trained against an image tower that separates digits), B0 at a higher rate and for longer (450 steps
at 1e-3 on that encoder: 81% digits with 25 DDIM steps, vs 72% on the 500-step encoder; 2000 steps:
85-87% alignment with 25 DDIM steps, the teacher 91% with the same sampler). Consistency distillation
then reaches B0's level within a few hundred steps and *loses* digits if it runs on: 2-step alignment
(300 images, guidance 5) of one 2000-step run's checkpoints 85.0 / 85.3 / 86.3 / 82.7 / 82.7 / 80.3 /
79.0% at steps 250 / 500 / 750 / 1000 / 1250 / 1500 / 2000 (1000 steps at half the rate: 83.3%), so
``lcd_steps`` is 750. The shipped model (``scripts/train_digits.py --model turbo --lcd-steps 0``, then
``--init-from`` that folder ``--stage 1 --lcd-steps 750``) scores 87.0% at 2 steps, guidance 7 (300 images;
84.7% at guidance 5, 71.0% at 1 step, 83.3% at 4).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from quantdiff.atomic import atomic_directory
from quantdiff.demo.digits.data import all_combinations, format_caption, make_dataset, spec_labels
from quantdiff.demo.digits.training.common import (
    MAX_TOKENS,
    Probe,
    cosine_lr,
    encode_pool,
    images_to_tensor,
    probe_due,
    update_ema,
)

# The teacher's cosine schedule ends at alpha_bar(999) = 2.4e-9: an epsilon-predicting student would divide
# its error by sqrt(alpha_bar) = 4.9e-5 to get x0 in a 1-step sample (LCMScheduler's first step is t = 999).
# v-prediction gives x0 = sqrt(a) x - sqrt(1 - a) v, well conditioned at every t.
PREDICTION_TYPE = "v_prediction"
# LCM's boundary condition: c_skip(t) = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2).
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


@dataclass(frozen=True)
class DigitsTurboConfig:
    """Sizes and schedule of a ``digits-sd-turbo`` training run."""

    seed: int = 0
    pool_size: int = 40_000
    # A: contrastive text encoder
    text_layers: int = 4
    text_steps: int = 1_500  # 500: zero-shot digit retrieval 63% and the student's digits stall ~70% (docstring)
    text_lr: float = 1e-3
    text_batch_size: int = 256
    image_width: int = 32  # channels of the first conv of stage A's image encoder
    # B0: guided distillation warm start, on t <= adapt_max_timestep (above it the teacher's x0 is noise / 1e-4)
    adapt_steps: int = 2_000  # was 600 at 3e-4: the student learns to read the new encoder here (docstring)
    adapt_lr: float = 1e-3
    adapt_max_timestep: int = 900
    # B: latent consistency distillation
    lcd_steps: int = 750  # was 3000: past ~750 steps LCD loses digits (docstring)
    lcd_lr: float = 2e-4
    batch_size: int = 64
    num_ddim_timesteps: int = 50
    w_min: float = 2.0  # the teacher's CFG scale is 1 + w (LCM's convention); digits-sd samples at 5 (w = 4)
    w_max: float = 8.0
    guidance_embed_dim: int = 64
    huber_c: float = 1e-3
    target_decay: float = 0.95  # LCM's target network
    ema_decay: float = 0.995  # the weights that ship
    x0_clip: float = 4.0  # teacher's x0 clamped to the latent range (the data's |x| stays below ~4)
    probe_every: int = 500
    log_every: int = 100
    stage: int = 0
    threads: int = 1


# --------------------------------------------------------------------------------------- the pure math


def clip_loss(text_features: torch.Tensor, image_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE; features (B, D) unnormalised, pair i is (text i, image i)."""
    text_features = F.normalize(text_features, dim=-1)
    image_features = F.normalize(image_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * text_features @ image_features.T  # (B, B)
    targets = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance scales -> (B, dim) sinusoidal embedding, exactly as the pipeline's ``timestep_cond``.

    Same formula as ``StableDiffusionPipeline.get_guidance_scale_embedding`` (VDM's): w * 1000 in sin / cos of
    geometric frequencies. A test checks it against the pipeline's own method.
    """
    w = w.float() * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]  # (B, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip, c_out for integer timesteps (B,) -> two (B, 1, 1, 1), as ``LCMScheduler`` computes them."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def _alpha(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def x0_from_v(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    sqrt_a, sqrt_1a = _alpha(alphas_cumprod, t)
    return sqrt_a * x - sqrt_1a * v


def x0_from_eps(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    sqrt_a, sqrt_1a = _alpha(alphas_cumprod, t)
    return (x - sqrt_1a * eps) / sqrt_a


def consistency_output(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip x + c_out x0(v): what ``LCMScheduler.step`` calls ``denoised``."""
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x + c_out * x0_from_v(v, x, t, alphas_cumprod)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((prediction - target) ** 2 + c**2) - c).mean()


class SkippingGrid:
    """LCM's skipping-step DDIM grid: t_n = 20 n - 1 for n = 1..50 (k = 20), the grid ``LCMScheduler`` samples on."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int) -> None:
        train_steps = len(alphas_cumprod)
        self.k = train_steps // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.k - 1  # (N,) 19 .. 999
        self.previous = (self.timesteps - self.k).clamp(min=0)  # where the teacher's step lands
        self.alphas_cumprod = alphas_cumprod
        # the first grid point steps to alpha_bar(0) (diffusers' DDIMSolver)
        self.previous_alpha = alphas_cumprod[self.previous]

    def teacher_step(
        self, eps: torch.Tensor, x: torch.Tensor, index: torch.Tensor, x0_clip: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from t_{index} with the (guided) teacher epsilon; returns (x_prev, clamped x0).

        x0 is clamped to the latent range and epsilon re-derived from it (as DDIM's ``clip_sample`` does): at
        t = 999 the teacher's x0 = (x - sqrt(1 - a) eps) / 4.9e-5 is noise, which unclamped would throw x_prev
        hundreds of units off the data.
        """
        t = self.timesteps[index]
        sqrt_a, sqrt_1a = _alpha(self.alphas_cumprod, t)
        x0 = ((x - sqrt_1a * eps) / sqrt_a).clamp(-x0_clip, x0_clip)
        eps = (x - sqrt_a * x0) / sqrt_1a
        a_prev = self.previous_alpha[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


# --------------------------------------------------------------------------------------- models


def build_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, seed: int) -> CLIPTextModel:
    """A causal CLIP text model (SD's kind) sized like digits-sd's but deeper."""
    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


class ImageEncoder(torch.nn.Module):
    """Tiny conv net, 32x32x3 -> (B, dim): CLIP's image tower for stage A only (it does not ship)."""

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.SiLU()]
        channels = width
        for out in (2 * width, 4 * width, 4 * width):  # 32 -> 16 -> 8 -> 4
            layers += [torch.nn.Conv2d(channels, out, 3, stride=2, padding=1), torch.nn.SiLU()]
            channels = out
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels * 16, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images).flatten(1))  # (B, dim)


def build_student(teacher: UNet2DConditionModel, guidance_embed_dim: int) -> UNet2DConditionModel:
    """The teacher's UNet plus ``time_cond_proj_dim`` (zero-initialised, so it starts as the teacher)."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": guidance_embed_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"student does not match the teacher: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def lcm_scheduler(teacher_scheduler_config: dict, num_ddim_timesteps: int) -> LCMScheduler:
    return LCMScheduler.from_config(
        teacher_scheduler_config,
        prediction_type=PREDICTION_TYPE,
        original_inference_steps=num_ddim_timesteps,
        timestep_scaling=TIMESTEP_SCALING,
        set_alpha_to_one=True,
        clip_sample=False,
    )


# --------------------------------------------------------------------------------------- stage A


@torch.no_grad()
def zero_shot_accuracy(
    text_encoder: CLIPTextModel,
    projection: torch.nn.Module,
    image_encoder: ImageEncoder,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,
    specs: list,
) -> dict[str, float]:
    """Classify ``images`` by their most similar caption among all (digit, fg, bg) specs; per-head accuracy."""
    candidates = all_combinations()
    ids = tokenizer(
        [format_caption(s, 0) for s in candidates], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
    ).input_ids
    text = F.normalize(projection(text_encoder(ids).pooler_output), dim=-1)  # (S, D)
    image = F.normalize(image_encoder(images), dim=-1)  # (N, D)
    best = [candidates[i] for i in (image @ text.T).argmax(dim=1).tolist()]
    truth, guess = spec_labels(specs), spec_labels(best)
    names = ("digit", "foreground", "background")
    return {name: float(np.mean(truth[i] == guess[i])) for i, name in enumerate(names)}


def pretrain_text_encoder(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,
    token_ids: torch.Tensor,
    config: DigitsTurboConfig,
    log: Callable[[str], None],
    probe_images: tuple[torch.Tensor, list] | None = None,
) -> list[float]:
    """Stage A: CLIP contrastive pretraining on (caption, image) pairs; freezes the encoder; returns the losses.

    images (N, 3, 32, 32) in [-1, 1]; token_ids (N, T).
    """
    generator = torch.Generator().manual_seed(config.seed + 10 + 1000 * config.stage)
    width = text_encoder.config.hidden_size
    image_encoder = ImageEncoder(width, config.image_width)
    projection = torch.nn.Linear(width, width, bias=False)  # CLIP's text_projection (training only)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    parameters = [*text_encoder.parameters(), *image_encoder.parameters(), *projection.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=config.text_lr, weight_decay=0.01)
    warmup = min(200, max(1, config.text_steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, config.text_steps, warmup))
    text_encoder.train()
    losses = []
    started = time.time()
    for step in range(config.text_steps):
        index = torch.randint(len(images), (config.text_batch_size,), generator=generator)
        loss = clip_loss(
            projection(text_encoder(token_ids[index]).pooler_output), image_encoder(images[index]), logit_scale
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % config.log_every == 0 or step == config.text_steps - 1:
            log(
                f"text step {step}: clip loss {loss.item():.4f}, logit scale {logit_scale.exp().item():.1f} ({time.time() - started:.0f} s)"
            )
        if probe_images is not None and probe_due(step, config.text_steps, config.probe_every):
            text_encoder.eval()
            accuracy = zero_shot_accuracy(text_encoder, projection, image_encoder, tokenizer, *probe_images)
            log(f"text probe step {step + 1}: zero-shot " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))
            text_encoder.train()
    text_encoder.eval().requires_grad_(False)
    return losses


# --------------------------------------------------------------------------------------- stage B


@dataclass
class Distillation:
    """Everything stage B0 / B read: frozen teacher, frozen text embeddings of every caption, the data."""

    teacher: UNet2DConditionModel
    grid: SkippingGrid
    latents: torch.Tensor  # (N, 4, h, w), scaled
    caption_index: torch.Tensor  # (N,) row of the caption of each latent in the embedding tables
    teacher_context: torch.Tensor  # (C, T, D) teacher text encoder on each distinct caption
    student_context: torch.Tensor  # (C, T, D) the new frozen text encoder on each distinct caption
    teacher_empty: torch.Tensor  # (T, D) teacher text encoder on "" (CFG's unconditional branch)

    def batch(self, size: int, generator: torch.Generator):
        index = torch.randint(len(self.latents), (size,), generator=generator)
        captions = self.caption_index[index]
        return self.latents[index], self.teacher_context[captions], self.student_context[captions]

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The teacher's CFG epsilon, eps_c + w (eps_c - eps_u), both branches in one batch."""
        empty = self.teacher_empty.expand_as(context)
        eps = self.teacher(
            torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([context, empty])
        ).sample
        conditional, unconditional = eps.chunk(2)
        return conditional + w.view(-1, 1, 1, 1) * (conditional - unconditional)


@torch.no_grad()
def embed_captions(text_encoder: CLIPTextModel, token_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat(
        [text_encoder(token_ids[i : i + chunk]).last_hidden_state for i in range(0, len(token_ids), chunk)]
    )


def _sample_w(size: int, config: DigitsTurboConfig, generator: torch.Generator) -> torch.Tensor:
    return config.w_min + (config.w_max - config.w_min) * torch.rand(size, generator=generator)


def adapt_step_loss(
    student: UNet2DConditionModel, data: Distillation, config: DigitsTurboConfig, generator: torch.Generator
) -> torch.Tensor:
    """Stage B0: the student's v at scale w on the new text embedding vs the teacher's guided v (MSE)."""
    x0, teacher_context, student_context = data.batch(config.batch_size, generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(config.adapt_max_timestep + 1, (config.batch_size,), generator=generator)
    sqrt_a, sqrt_1a = _alpha(data.grid.alphas_cumprod, t)
    x = sqrt_a * x0 + sqrt_1a * noise
    w = _sample_w(config.batch_size, config, generator)
    eps = data.guided_eps(x, t, teacher_context, w)
    target_x0 = ((x - sqrt_1a * eps) / sqrt_a).clamp(-config.x0_clip, config.x0_clip)
    target_v = (sqrt_a * x - target_x0) / sqrt_1a  # v = sqrt(a) eps - sqrt(1 - a) x0, eps from x and x0
    v = student(
        x, t, timestep_cond=guidance_embedding(w, config.guidance_embed_dim), encoder_hidden_states=student_context
    ).sample
    return F.mse_loss(v, target_v)


def lcd_step_loss(
    student: UNet2DConditionModel,
    target: UNet2DConditionModel,
    data: Distillation,
    config: DigitsTurboConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Stage B: LCM's consistency distillation loss for one batch.

    x_{t_{n+k}} = noised data; the teacher's guided DDIM step (its own text encoder) gives x_{t_n}; the student
    f(x_{t_{n+k}}) must match the target network's f(x_{t_n}), both reading the new text embedding.
    """
    x0, teacher_context, student_context = data.batch(config.batch_size, generator)
    grid = data.grid
    index = torch.randint(len(grid.timesteps), (config.batch_size,), generator=generator)
    start, previous = grid.timesteps[index], grid.previous[index]
    noise = torch.randn(x0.shape, generator=generator)
    sqrt_a, sqrt_1a = _alpha(grid.alphas_cumprod, start)
    x_start = sqrt_a * x0 + sqrt_1a * noise  # (B, 4, h, w)
    w = _sample_w(config.batch_size, config, generator)
    w_embedding = guidance_embedding(w, config.guidance_embed_dim)  # (B, E)
    v = student(x_start, start, timestep_cond=w_embedding, encoder_hidden_states=student_context).sample
    prediction = consistency_output(v, x_start, start, grid.alphas_cumprod)
    with torch.no_grad():
        x_previous, _ = grid.teacher_step(
            data.guided_eps(x_start, start, teacher_context, w), x_start, index, config.x0_clip
        )
        v_target = target(x_previous, previous, timestep_cond=w_embedding, encoder_hidden_states=student_context).sample
        goal = consistency_output(v_target, x_previous, previous, grid.alphas_cumprod)
    return pseudo_huber(prediction, goal, config.huber_c)


def _optimizer(student: UNet2DConditionModel, lr: float, steps: int):
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, max(1, steps // 10))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup))


def _step(loss: torch.Tensor, student: UNet2DConditionModel, optimizer, schedule) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def distil(
    student: UNet2DConditionModel,
    data: Distillation,
    config: DigitsTurboConfig,
    log: Callable[[str], None],
    checkpoint: Callable[[str, int, UNet2DConditionModel], None] | None = None,
) -> UNet2DConditionModel:
    """Stages B0 and B on ``student``; returns the weight average that ships.

    ``checkpoint(phase, step, average)`` is called every ``probe_every`` steps and after each phase.
    """
    generator = torch.Generator().manual_seed(config.seed + 20 + 1000 * config.stage)
    average = copy.deepcopy(student).requires_grad_(False)
    student.train()
    started = time.time()
    if config.adapt_steps > 0:
        optimizer, schedule = _optimizer(student, config.adapt_lr, config.adapt_steps)
        for step in range(config.adapt_steps):
            loss = adapt_step_loss(student, data, config, generator)
            _step(loss, student, optimizer, schedule)
            update_ema(average, student, step, config.ema_decay)
            if step % config.log_every == 0 or step == config.adapt_steps - 1:
                log(f"adapt step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)")
            if checkpoint is not None and probe_due(step, config.adapt_steps, config.probe_every):
                checkpoint("adapt", step + 1, average)
        # consistency training starts from the averaged weights: they are what the probe measured
        student.load_state_dict(average.state_dict())
    target = copy.deepcopy(student).requires_grad_(False)
    optimizer, schedule = _optimizer(student, config.lcd_lr, config.lcd_steps)
    for step in range(config.lcd_steps):
        loss = lcd_step_loss(student, target, data, config, generator)
        _step(loss, student, optimizer, schedule)
        with torch.no_grad():
            for mean, value in zip(target.parameters(), student.parameters(), strict=True):
                mean.lerp_(value, 1 - config.target_decay)
        update_ema(average, student, step, config.ema_decay)
        if step % config.log_every == 0 or step == config.lcd_steps - 1:
            log(f"lcd step {step}: loss {loss.item():.5f} ({time.time() - started:.0f} s)")
        if checkpoint is not None and probe_due(step, config.lcd_steps, config.probe_every):
            checkpoint("lcd", step + 1, average)
    return average.eval()


# --------------------------------------------------------------------------------------- the run


def _pipeline(teacher_folder_parts: dict, text_encoder, unet, num_ddim_timesteps: int) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=teacher_folder_parts["vae"],
        text_encoder=text_encoder,
        tokenizer=teacher_folder_parts["tokenizer"],
        unet=unet,
        scheduler=lcm_scheduler(teacher_folder_parts["scheduler"].config, num_ddim_timesteps),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: StableDiffusionPipeline, out: str | os.PathLike) -> None:
    """fp16 safetensors into ``out``, replacing the model files atomically; an existing prompts/ folder stays."""
    out = Path(out)
    prompts = out / "prompts"
    with atomic_directory(out, overwrite=True) as staging:
        half = copy.deepcopy(pipe).to(torch.float16)
        half.save_pretrained(staging, safe_serialization=True)
        if prompts.is_dir():
            shutil.copytree(prompts, staging / "prompts")


def train_digits_turbo(
    out: str | os.PathLike,
    config: DigitsTurboConfig = DigitsTurboConfig(),
    *,
    teacher_from: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    probe: Probe | None = None,
) -> Path:
    """Train and save ``digits-sd-turbo`` to ``out`` (fp16), checkpointing there every ``probe_every`` steps.

    ``teacher_from``: the digits-sd folder (teacher UNet, its text encoder, VAE and tokenizer, which the turbo
    reuses). ``init_from``: a turbo folder to continue: its frozen text encoder is kept (stage A and the
    warm start B0 are skipped) and consistency distillation continues from its UNet; needs ``stage`` >= 1.
    """
    if init_from is not None and config.stage < 1:
        raise ValueError("continuing a run (init_from) needs stage >= 1, so that it draws fresh batches")
    torch.set_num_threads(config.threads)
    with torch.enable_grad():
        return _train(out, config, teacher_from, init_from, log, probe)


def _train(out, config: DigitsTurboConfig, teacher_from, init_from, log, probe) -> Path:
    load = dict(local_files_only=True)
    parts = {
        "vae": AutoencoderKL.from_pretrained(teacher_from, subfolder="vae", **load, dtype=torch.float32).eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(teacher_from, subfolder="tokenizer", **load),
        "scheduler": DDIMScheduler.from_pretrained(teacher_from, subfolder="scheduler", **load),
    }
    teacher_text = CLIPTextModel.from_pretrained(teacher_from, subfolder="text_encoder", **load, dtype=torch.float32)
    teacher = UNet2DConditionModel.from_pretrained(teacher_from, subfolder="unet", **load, dtype=torch.float32)
    teacher_text.eval().requires_grad_(False)
    teacher.eval().requires_grad_(False)
    tokenizer = parts["tokenizer"]

    data = make_dataset(config.pool_size, split="train", seed=config.seed, combos="train")
    pool = images_to_tensor(data.images)  # (N, 3, 32, 32)
    distinct = sorted(set(data.captions))
    row = {text: i for i, text in enumerate(distinct)}
    caption_index = torch.tensor([row[c] for c in data.captions])
    tokenize = lambda texts: (
        tokenizer(  # noqa: E731
            texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
    )
    distinct_ids = tokenize(distinct)  # (C, T)

    if init_from is not None:
        log(f"continuing {init_from}: its frozen text encoder is kept, stages A and B0 are skipped")
        text_encoder = CLIPTextModel.from_pretrained(init_from, subfolder="text_encoder", **load, dtype=torch.float32)
        text_encoder.eval().requires_grad_(False)
        student = UNet2DConditionModel.from_pretrained(init_from, subfolder="unet", **load, dtype=torch.float32)
        config = replace(config, adapt_steps=0)
    else:
        text_encoder = build_text_encoder(tokenizer, teacher_text.config.hidden_size, config.text_layers, config.seed)
        probe_data = make_dataset(1000, split="eval", seed=config.seed + 5, combos="all")
        pretrain_text_encoder(
            text_encoder,
            tokenizer,
            pool,
            distinct_ids[caption_index],
            config,
            log,
            probe_images=(images_to_tensor(probe_data.images), list(probe_data.specs)),
        )
        student = build_student(teacher, config.guidance_embed_dim)

    distillation = Distillation(
        teacher=teacher,
        grid=SkippingGrid(parts["scheduler"].alphas_cumprod.float(), config.num_ddim_timesteps),
        latents=encode_pool(parts["vae"], pool),
        caption_index=caption_index,
        teacher_context=embed_captions(teacher_text, distinct_ids),
        student_context=embed_captions(text_encoder, distinct_ids),
        teacher_empty=embed_captions(teacher_text, tokenize([""]))[0],
    )
    log(f"{len(distinct)} distinct captions; latent |x| max {distillation.latents.abs().max():.2f}")

    def checkpoint(phase: str, step: int, average: UNet2DConditionModel) -> None:
        average.eval()
        pipe = _pipeline(parts, text_encoder, average, config.num_ddim_timesteps)
        save_pipeline(pipe, out)
        if probe is not None:
            log(f"probe after {phase} step {step}:")
            probe(step, pipe)

    average = distil(student, distillation, config, log, checkpoint)
    save_pipeline(_pipeline(parts, text_encoder, average, config.num_ddim_timesteps), out)
    return Path(out)
