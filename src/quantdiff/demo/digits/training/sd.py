"""Train ``digits-sd``: a small text-to-image model in the real ``StableDiffusionPipeline`` layout.

The coloured-digits captions (``quantdiff.demo.digits.data``) are learnable in minutes on a CPU yet
need everything a real text-to-image model has: a VAE, a text encoder, cross-attention and
classifier-free guidance. The result is the project's default model: a pipeline folder that
``from_pretrained`` loads like any Stable Diffusion checkpoint, so the whole quantdiff flow runs on it
and its quality can be measured offline.

Stages (deterministic from ``seed``):

1. render a pool of captioned training images (training source digits, training colour combinations);
2. train an ``AutoencoderKL`` (32x32x3 <-> 8x8x4) with an L2 + tiny KL loss, then set its
   ``scaling_factor`` so latents have unit variance, as Stable Diffusion does;
3. train a ``UNet2DConditionModel`` and a small ``CLIPTextModel`` together with the DDPM epsilon loss,
   captions dropped 10% of the time for classifier-free guidance, and an EMA of the UNet weights.
   An auxiliary head (``CaptionLabelHead``) keeps digit and colours readable from the text encoder's
   pooled output, and the UNet also gets the pooled caption through its time embedding
   (``addition_embed_type="text"``), so the digit word reaches every residual block, not only the
   cross-attention layers.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from quantdiff.demo.digits.data import make_dataset
from quantdiff.demo.digits.training.common import (
    MAX_TOKENS,
    CaptionLabelHead,
    Probe,
    build_vae,
    caption_labels,
    caption_vocabulary,
    cosine_lr,
    encode_pool,
    images_to_tensor,
    log_denoiser_step,
    optimizer_step,
    prepare_vae,
    probe_due,
    update_ema,
)
from quantdiff.testing.tokenizers import build_clip_tokenizer


@dataclass(frozen=True)
class DigitsSDConfig:
    """Sizes and schedule of a ``digits-sd`` training run."""

    seed: int = 0
    pool_size: int = 40_000
    vae_steps: int = 1_500
    vae_lr: float = 1e-3
    denoiser_steps: int = 9_000
    denoiser_lr: float = 4e-4
    batch_size: int = 64
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    caption_loss_weight: float = 0.1
    probe_every: int = 1_000
    # 0: a run from scratch; n: the n-th continuation of one (``init_from``), which draws fresh batches,
    # noise and timesteps instead of replaying the first run's.
    stage: int = 0
    # One thread: these small models barely gain from two, and a 2-thread OpenMP pool slows down ~10x
    # whenever anything else runs on a 2-core machine.
    threads: int = 1


def build_components(seed: int = 0) -> dict:
    """Untrained components of the pipeline, deterministic from ``seed``."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(caption_vocabulary(), min_frequency=1, model_max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = build_vae()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        # 1.1M parameters: a step at batch 64 costs ~0.26 s on 2 threads and ~0.4 s on one (4.2M parameters:
        # twice that); the training budget is about an hour per model.
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
        addition_embed_type="text",  # pooled caption -> time embedding (attention pooling over tokens)
    )
    # A cosine schedule suits 8x8 latents: the linear SD schedule destroys small images too early.
    train_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "unet": unet,
        "scheduler": train_scheduler,
    }


def train_denoiser(
    components: dict,
    pool: torch.Tensor,
    data_captions: list[str],
    labels: torch.Tensor,
    config: DigitsSDConfig,
    log: Callable[[str], None],
    probe: Probe | None = None,
) -> UNet2DConditionModel:
    """Joint UNet + text-encoder training with the epsilon loss; returns the EMA UNet.

    ``labels`` (N, 3) are the caption classes for the auxiliary head; ``probe(step, pipe)`` is called every
    ``config.probe_every`` steps with a pipeline holding the current EMA UNet (e.g. to measure alignment).
    """
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    vae, unet, scheduler = components["vae"], components["unet"], components["scheduler"]
    generator = torch.Generator().manual_seed(config.seed + 2 + 1000 * config.stage)
    latents = encode_pool(vae, pool)  # (N, 4, 8, 8); the VAE is frozen now, so encode the pool once
    tokens = tokenizer(
        data_captions + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids  # (N + 1, T); the last row is the empty caption
    empty = len(data_captions)
    ema = copy.deepcopy(unet).requires_grad_(False)
    label_head = CaptionLabelHead(text_encoder.config.hidden_size)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "weight_decay": 0.01},
            # No decay on the text side: decay is what erased the words the UNet did not use yet.
            {"params": list(text_encoder.parameters()) + list(label_head.parameters()), "weight_decay": 0.0},
        ],
        lr=config.denoiser_lr,
    )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, config.denoiser_steps))
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in tqdm(range(config.denoiser_steps), desc="unet+text", mininterval=10):
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        ids = tokens[torch.where(dropped, torch.full_like(index, empty), index)]  # (B, T)
        x0 = latents[index]  # (B, 4, 8, 8)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        encoded = text_encoder(ids)
        context = encoded.last_hidden_state  # (B, T, 64)
        denoise_loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        kept = ~dropped
        caption_loss = label_head.loss(encoded.pooler_output[kept], labels[index[kept]])  # pooled: (B, 64)
        loss = denoise_loss + config.caption_loss_weight * caption_loss
        optimizer_step(loss, optimizer, schedule, parameters)
        update_ema(ema, unet, step, config.ema_decay)
        log_denoiser_step(step, config.denoiser_steps, denoise_loss, caption_loss, started, log)
        if probe is not None and probe_due(step, config.denoiser_steps, config.probe_every):
            text_encoder.eval()
            probe(step + 1, _pipeline(components, ema))
            text_encoder.train()
    text_encoder.eval()
    return ema.eval()


def _pipeline(components: dict, unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """The inference pipeline around ``unet``: DDIM on the training noise schedule."""
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_digits_sd(
    out: str | os.PathLike,
    config: DigitsSDConfig = DigitsSDConfig(),
    *,
    vae_from: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    probe: Probe | None = None,
) -> Path:
    """Train and save the pipeline to ``out`` (fp16 safetensors; load it in fp32 for CPU inference).

    ``vae_from``: reuse the autoencoder of a digits pipeline folder instead of training one.
    ``init_from``: continue training a digits-sd folder (its autoencoder, text encoder and UNet) with a
    fresh learning-rate schedule of ``config.denoiser_steps``; set ``config.stage`` to 1, 2, ...
    """
    if init_from is not None and config.stage < 1:
        raise ValueError("continuing a run (init_from) needs stage >= 1, so that it draws fresh batches")
    torch.set_num_threads(config.threads)
    with torch.enable_grad():  # training must not depend on the caller's grad mode
        return _train(out, config, vae_from, init_from, log, probe)


def _train(
    out: str | os.PathLike,
    config: DigitsSDConfig,
    vae_from: str | os.PathLike | None,
    init_from: str | os.PathLike | None,
    log: Callable[[str], None],
    probe: Probe | None,
) -> Path:
    data = make_dataset(config.pool_size, split="train", seed=config.seed, combos="train")
    pool = images_to_tensor(data.images)
    components = build_components(config.seed)
    if init_from is not None:
        components["text_encoder"] = CLIPTextModel.from_pretrained(
            init_from, subfolder="text_encoder", local_files_only=True, dtype=torch.float32
        )
        components["unet"] = UNet2DConditionModel.from_pretrained(
            init_from, subfolder="unet", local_files_only=True, dtype=torch.float32
        )
        vae_from = init_from
    components["vae"] = prepare_vae(
        components["vae"],
        pool,
        vae_from=vae_from,
        config=config,
        log=log,
    )
    unet = train_denoiser(components, pool, data.captions, caption_labels(data.specs), config, log, probe)
    _pipeline(components, unet).to(torch.float16).save_pretrained(out, safe_serialization=True)
    return Path(out)
