"""Pieces both digits trainers share: captions, image tensors, learning-rate schedule, weight averaging."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from tqdm.auto import tqdm

from quantdiff.demo.digits.data import CAPTION_TEMPLATES, COLOURS, DIGIT_WORDS, DigitSpec, spec_labels

# Called during training with (step, pipeline holding the current weights), e.g. to log alignment.
Probe = Callable[[int, DiffusionPipeline], None]

# Longest caption is ~12 words; 20 tokens leave room for <|startoftext|> / <|endoftext|> and keep the
# text encoders and the text side of attention cheap.
MAX_TOKENS = 20


def caption_vocabulary() -> list[str]:
    """Every caption template filled with every word it can hold: the text the tokenizer learns from."""
    fills = [dict(fg=c, bg=c, word=w, num=str(n)) for c in COLOURS for n, w in enumerate(DIGIT_WORDS)]
    return [template.format(**fill) for template in CAPTION_TEMPLATES for fill in fills]


class CaptionLabelHead(torch.nn.Module):
    """Training-only head that reads digit, foreground and background off a pooled text embedding.

    Trained jointly with a denoiser alone, the text encoder collapses the digit words (measured: their
    embeddings ended 5x closer together than at random init) because early on the denoiser uses only the
    colours, and whatever it does not use yet decays. This auxiliary loss keeps every part of the caption
    linearly readable from the pooled embedding. It is dropped after training; the pipeline never sees it.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.sizes = (len(DIGIT_WORDS), len(COLOURS), len(COLOURS))
        self.proj = torch.nn.Linear(width, sum(self.sizes))

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the three heads; pooled (B, width), labels (B, 3) int64."""
        logits = self.proj(pooled).split(self.sizes, dim=-1)  # 3 x (B, classes)
        return sum(F.cross_entropy(head, labels[:, i]) for i, head in enumerate(logits)) / len(logits)


def caption_labels(specs: list[DigitSpec]) -> torch.Tensor:
    """(N, 3) int64 digit, foreground and background classes of ``specs``, for ``CaptionLabelHead``."""
    return torch.from_numpy(np.stack(spec_labels(specs), axis=1))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range diffusers' VAEs expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to zero: the factor LambdaLR multiplies the base rate by."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def update_ema(average: torch.nn.Module, current: torch.nn.Module, step: int, decay: float) -> None:
    """Exponential moving average of the weights; early on the decay is smaller so random init fades fast."""
    decay = min(decay, (1 + step) / (10 + step))
    for mean, value in zip(average.parameters(), current.parameters(), strict=True):
        mean.lerp_(value, 1 - decay)


def build_vae() -> AutoencoderKL:
    """The digits autoencoder: 32x32x3 <-> 8x8x4 (three stages, x4 downsampling), 0.24M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def train_vae(
    vae: AutoencoderKL,
    pool: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None],
) -> None:
    """Reconstruction (L2) plus a tiny KL term, then ``scaling_factor`` = 1 / std of the latents."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps))
    vae.train()
    for step in tqdm(range(steps), desc="vae", mininterval=10):
        batch = pool[torch.randint(len(pool), (batch_size,), generator=generator)]  # (B, 3, 32, 32)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval()
    latents = encode_pool(vae, pool[:4096], scale=False)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def prepare_vae(
    vae: AutoencoderKL,
    pool: torch.Tensor,
    *,
    vae_from: str | os.PathLike | None,
    config: Any,
    log: Callable[[str], None],
) -> AutoencoderKL:
    """The autoencoder of a digits pipeline folder (``vae_from``), or ``vae`` (untrained) trained on ``pool``.

    ``config``: a digits trainer config (``vae_steps``, ``vae_lr``, ``batch_size``, ``seed``).
    """
    if vae_from is not None:
        return AutoencoderKL.from_pretrained(vae_from, subfolder="vae", local_files_only=True, dtype=torch.float32)
    train_vae(
        vae, pool, steps=config.vae_steps, lr=config.vae_lr, batch_size=config.batch_size, seed=config.seed + 1, log=log
    )
    return vae


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    parameters: list[torch.nn.Parameter],
) -> None:
    """Backward, gradient norm clipped to 1, one optimizer and one schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()


def log_denoiser_step(
    step: int, total: int, denoise_loss: torch.Tensor, caption_loss: torch.Tensor, started: float, log
) -> None:
    """One log line every 1000 steps and at the last one."""
    if step % 1000 == 0 or step == total - 1:
        log(
            f"denoiser step {step}: loss {denoise_loss.item():.4f}, caption loss {caption_loss.item():.3f}"
            f" ({time.time() - started:.0f} s)"
        )


def probe_due(step: int, total: int, every: int) -> bool:
    """Whether the probe runs after ``step`` (0-based): every ``every`` steps and after the last one."""
    return every > 0 and ((step + 1) % every == 0 or step == total - 1)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pool: torch.Tensor, *, scale: bool = True, chunk: int = 512) -> torch.Tensor:
    """Posterior means of a frozen VAE, optionally normalised with its shift and scaling factor."""
    latents = torch.cat([vae.encode(pool[i : i + chunk]).latent_dist.mode() for i in range(0, len(pool), chunk)])
    if scale:
        shift = vae.config.get("shift_factor") or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
    return latents  # (N, C, h, w)
