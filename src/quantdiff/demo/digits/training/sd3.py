"""Train ``digits-sd3``: the MMDiT / flow-matching counterpart of ``digits-sd``, in the real SD3 layout.

A ``StableDiffusion3Pipeline`` folder: ``SD3Transformer2DModel`` (joint text-image attention), two small
``CLIPTextModelWithProjection`` encoders trained jointly with it, no T5 (the pipeline zero-fills the T5
tokens, as SD3 does when it is dropped), ``FlowMatchEulerDiscreteScheduler``. Its autoencoder is trained
with the same recipe as ``digits-sd``'s, or reused from a ``digits-sd`` folder (``vae_from``).

Training follows SD3: rectified flow ``x_t = (1 - s) x_0 + s e``, velocity target ``e - x_0``, noise levels
``s`` drawn from a logit-normal, text embedded by the pipeline's own ``encode_prompt`` so that training and
inference see exactly the same conditioning (CLIP penultimate states, zero padding, T5 zeros). As in
``digits-sd``, an auxiliary head (``CaptionLabelHead``) on the pooled text embedding keeps the digit
words from collapsing while the transformer still relies on the colours.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

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

CLIP_WIDTH = 64
# Without a T5 encoder the pipeline appends `max_sequence_length` zero "T5" tokens (256 by default).
# Identical tokens weigh in attention in proportion to their number, so the count is part of the input;
# training draws it log-uniformly from 1..256 so that any `max_sequence_length` works, at a fifth of the
# cost of always training with 256 (they would be 80% of the tokens).
MAX_T5_TOKENS = 256


@dataclass(frozen=True)
class DigitsSD3Config:
    """Sizes and schedule of a ``digits-sd3`` training run."""

    seed: int = 0
    pool_size: int = 40_000
    vae_steps: int = 1_500
    vae_lr: float = 1e-3
    denoiser_steps: int = 10_000
    denoiser_lr: float = 5e-4
    batch_size: int = 64
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    caption_loss_weight: float = 0.1
    probe_every: int = 1_000
    stage: int = 0  # see DigitsSDConfig.stage
    num_layers: int = 4
    attention_heads: int = 2
    head_dim: int = 32
    threads: int = 1  # see DigitsSDConfig.threads


def build_components(vae: AutoencoderKL, config: DigitsSD3Config = DigitsSD3Config()) -> dict:
    """Untrained text encoders and transformer around a trained ``vae``, deterministic from the seed."""
    torch.manual_seed(config.seed)
    tokenizer = build_clip_tokenizer(caption_vocabulary(), min_frequency=1, model_max_length=MAX_TOKENS)
    text_encoders = [_clip_encoder(tokenizer) for _ in range(2)]
    inner = config.attention_heads * config.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1),  # 8
        patch_size=1,  # 8x8 latents: one token per latent pixel keeps the digit's strokes
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.attention_heads,
        joint_attention_dim=2 * CLIP_WIDTH,  # the two CLIP token streams, concatenated
        caption_projection_dim=inner,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=16,
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoders[0],
        "text_encoder_2": text_encoders[1],
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    }


def _clip_encoder(tokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CLIP_WIDTH,
            intermediate_size=4 * CLIP_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=CLIP_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _pipeline(components: dict) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=components["transformer"],
        scheduler=components["scheduler"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer_2=components["tokenizer"],
        text_encoder_3=None,
        tokenizer_3=None,
    )


def train_transformer(
    pipe: StableDiffusion3Pipeline,
    latents: torch.Tensor,
    captions: list[str],
    labels: torch.Tensor,
    config: DigitsSD3Config,
    log: Callable[[str], None],
    probe: Probe | None = None,
) -> SD3Transformer2DModel:
    """Joint transformer + text-encoder training with the flow-matching loss; returns the EMA transformer.

    ``labels`` (N, 3) are the caption classes for the auxiliary head; ``probe(step, pipe)`` is called every
    ``config.probe_every`` steps with a pipeline holding the current EMA transformer.
    """
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(config.seed + 2 + 1000 * config.stage)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    label_head = CaptionLabelHead(2 * CLIP_WIDTH)
    text_parameters = [*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters(), *label_head.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "weight_decay": 0.01},
            # No decay on the text side: decay is what erased the words the transformer did not use yet.
            {"params": text_parameters, "weight_decay": 0.0},
        ],
        lr=config.denoiser_lr,
    )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, config.denoiser_steps))
    for module in (transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.train()
    started = time.time()
    for step in tqdm(range(config.denoiser_steps), desc="mmdit+text", mininterval=10):
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        prompts = ["" if drop else captions[i] for i, drop in zip(index.tolist(), dropped.tolist(), strict=True)]
        x0 = latents[index]  # (B, C, 8, 8)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(config.batch_size, generator=generator))  # logit-normal(0, 1)
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        t5_tokens = int(torch.exp(torch.rand((), generator=generator) * math.log(MAX_T5_TOKENS)).round())
        context, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=t5_tokens
        )  # (B, 20 + t5_tokens, 128), (B, 128)
        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma * 1000,  # the pipeline passes the scheduler's timesteps = sigma * 1000
            encoder_hidden_states=context,
            pooled_projections=pooled,
        ).sample
        denoise_loss = F.mse_loss(velocity, noise - x0)
        kept = ~dropped
        caption_loss = label_head.loss(pooled[kept], labels[index[kept]])
        loss = denoise_loss + config.caption_loss_weight * caption_loss
        optimizer_step(loss, optimizer, schedule, parameters)
        update_ema(ema, transformer, step, config.ema_decay)
        log_denoiser_step(step, config.denoiser_steps, denoise_loss, caption_loss, started, log)
        if probe is not None and probe_due(step, config.denoiser_steps, config.probe_every):
            for module in (pipe.text_encoder, pipe.text_encoder_2):
                module.eval()
            probe(step + 1, _pipeline({**pipe.components, "transformer": ema}))
            for module in (pipe.text_encoder, pipe.text_encoder_2):
                module.train()
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    return ema.eval()


def train_digits_sd3(
    out: str | os.PathLike,
    config: DigitsSD3Config = DigitsSD3Config(),
    *,
    vae_from: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    probe: Probe | None = None,
) -> Path:
    """Train and save the pipeline to ``out`` (fp16 safetensors).

    ``vae_from``: reuse the autoencoder of a digits pipeline folder instead of training one.
    ``init_from``: continue training a digits-sd3 folder (autoencoder, text encoders, transformer) with a
    fresh learning-rate schedule of ``config.denoiser_steps``; set ``config.stage`` to 1, 2, ...
    """
    if init_from is not None and config.stage < 1:
        raise ValueError("continuing a run (init_from) needs stage >= 1, so that it draws fresh batches")
    if init_from is not None:
        vae_from = init_from
    torch.set_num_threads(config.threads)
    with torch.enable_grad():  # training must not depend on the caller's grad mode
        data = make_dataset(config.pool_size, split="train", seed=config.seed, combos="train")
        pool = images_to_tensor(data.images)
        torch.manual_seed(config.seed)  # the autoencoder's init, when it is trained here
        vae = prepare_vae(
            build_vae(),
            pool,
            vae_from=vae_from,
            config=config,
            log=log,
        )
        # SD3 pipelines normalise latents with a shift as well as a scale; ours are centred already.
        vae.register_to_config(shift_factor=0.0)
        latents = encode_pool(vae, pool)  # (N, 4, 8, 8)
        components = build_components(vae, config)
        if init_from is not None:
            for name in ("text_encoder", "text_encoder_2"):
                components[name] = CLIPTextModelWithProjection.from_pretrained(
                    init_from, subfolder=name, local_files_only=True, dtype=torch.float32
                )
            components["transformer"] = SD3Transformer2DModel.from_pretrained(
                init_from, subfolder="transformer", local_files_only=True, dtype=torch.float32
            )
        pipe = _pipeline(components)
        labels = caption_labels(data.specs)
        pipe.transformer = train_transformer(pipe, latents, data.captions, labels, config, log, probe)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    return Path(out)
