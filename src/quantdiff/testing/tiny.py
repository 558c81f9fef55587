"""Tiny random-weight text-to-image pipelines, built offline from configs.

quantdiff's tests have to run real diffusers pipelines end to end - calibrate, quantize, save, load,
generate - on a CPU, with no network and no multi-gigabyte checkpoints. The builders here produce
pipelines of the genuine diffusers classes (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``PixArtAlphaPipeline``) with the same component layout, config keys and
call paths as the released models, but with widths of 16-128 and two layers or blocks where the real
ones have dozens, so a 4-step generation with classifier-free guidance takes a fraction of a second.
The weights are random, so the images are noise; what the tests need is that every code path a real
model takes (cross-attention, SDXL's size conditioning, SD3's joint attention over zero-padded CLIP + T5
tokens, PixArt's resolution binning and learned sigma) runs, on a denoiser with enough Linear and Conv2d
layers for quantization to have something to do.

Everything is deterministic from ``seed`` and nothing is downloaded: the denoisers' configs are those of
``quantdiff.testing.configs`` (shared with the tiny cases of ``quantdiff bench``), and the tokenizers are
learned by code from a built-in prompt corpus (``quantdiff.testing.tokenizers``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from quantdiff.testing.configs import (
    T5_D_MODEL,
    TINY_TRANSFORMER_PIXART,
    TINY_TRANSFORMER_SD3,
    TINY_UNET_SD15,
    TINY_UNET_SDXL,
)
from quantdiff.testing.tokenizers import PROMPT_CORPUS, build_clip_tokenizer, build_t5_tokenizer

__all__ = ["TINY_ARCHITECTURES", "build_tiny_pipeline", "save_tiny_pipeline"]

TINY_ARCHITECTURES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "pixart")


# --------------------------------------------------------------------------------------------------
# Public API


def build_tiny_pipeline(arch: str, seed: int = 0, *, with_t5: bool = True) -> DiffusionPipeline:
    """Random-weight tiny pipeline of ``arch``, deterministic from ``seed``.

    The same seed gives bit-identical weights; the global torch RNG is left as it was. ``with_t5`` only
    matters for ``sd3``: ``False`` builds it without its third text encoder (``text_encoder_3`` and
    ``tokenizer_3`` are ``None``), as users do to save memory; the other components are unchanged.
    All modules are fp32 and in eval mode, like a pipeline loaded with ``from_pretrained``.
    """
    builder = _builder(arch)
    with _seeded(seed):
        pipeline = builder(with_t5=with_t5) if arch == "sd3" else builder()
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.float().eval()
    return pipeline


def save_tiny_pipeline(arch: str, folder: str | os.PathLike, seed: int = 0, *, with_t5: bool = True) -> Path:
    """``build_tiny_pipeline(...).save_pretrained(folder)`` as safetensors; returns the folder path."""
    pipeline = build_tiny_pipeline(arch, seed, with_t5=with_t5)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# Pipelines: one builder per architecture, assembling the component builders below. Components are
# built (and so draw from the seeded RNG) in the order they appear.


def _build_sd15() -> StableDiffusionPipeline:
    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_tiny_vae(block_out_channels=(16, 32, 32), latent_channels=4, scaling_factor=0.18215),
        text_encoder=_clip_text_encoder(tokenizer, hidden_size=32),
        tokenizer=tokenizer,
        unet=_tiny_unet_sd15(),
        scheduler=_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    return StableDiffusionXLPipeline(
        # SDXL's VAE has the same shape as SD 1.5's, only a different latent scaling.
        vae=_tiny_vae(block_out_channels=(16, 32, 32), latent_channels=4, scaling_factor=0.13025),
        text_encoder=_clip_text_encoder(tokenizer, hidden_size=32),
        text_encoder_2=_clip_text_encoder(tokenizer_2, hidden_size=32, projection_dim=32),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_tiny_unet_sdxl(),
        scheduler=_euler_scheduler(),
        add_watermarker=False,  # invisible-watermark is not a dependency, and would alter the pixels
    )


def _build_sd3(*, with_t5: bool) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    transformer = _tiny_transformer_sd3()
    # SD3's VAE: 16 latent channels, no quant convs, and latents normalised by a shift *and* a scale.
    vae = _tiny_vae(
        block_out_channels=(16, 32, 32),
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = _clip_text_encoder(tokenizer, hidden_size=32, projection_dim=32)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, hidden_size=32, projection_dim=32)
    # T5 last, so that with_t5=False leaves the random weights of everything else unchanged.
    tokenizer_3 = _t5_tokenizer() if with_t5 else None
    text_encoder_3 = _t5_text_encoder(tokenizer_3) if tokenizer_3 is not None else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_pixart() -> PixArtAlphaPipeline:
    tokenizer = _t5_tokenizer()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_text_encoder(tokenizer),
        # One level deeper than the others (x8, like every real SD VAE): PixArt always generates at a
        # size from its aspect-ratio table (256x256 for sample_size 32), and x8 keeps that at 32x32
        # latents = 256 patches of 2x2.
        vae=_tiny_vae(block_out_channels=(16, 16, 32, 32), latent_channels=4, scaling_factor=0.18215),
        transformer=_tiny_transformer_pixart(),
        scheduler=_dpm_solver_scheduler(),
    )


_BUILDERS: Mapping[str, Callable[..., DiffusionPipeline]] = MappingProxyType(
    {"sd15": _build_sd15, "sdxl": _build_sdxl, "sd3": _build_sd3, "pixart": _build_pixart}
)


def _builder(arch: str) -> Callable[..., DiffusionPipeline]:
    if arch not in _BUILDERS:
        valid = ", ".join(TINY_ARCHITECTURES)
        raise ValueError(f"unknown tiny architecture {arch!r}; valid ones are {valid}")
    return _BUILDERS[arch]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Denoisers


def _tiny_unet_sd15() -> UNet2DConditionModel:
    return UNet2DConditionModel(**TINY_UNET_SD15)


def _tiny_unet_sdxl() -> UNet2DConditionModel:
    return UNet2DConditionModel(**TINY_UNET_SDXL)


def _tiny_transformer_sd3() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**TINY_TRANSFORMER_SD3)


def _tiny_transformer_pixart() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(**TINY_TRANSFORMER_PIXART)


# --------------------------------------------------------------------------------------------------
# VAE and schedulers


def _tiny_vae(*, block_out_channels: tuple[int, ...], latent_channels: int, **extra_config) -> AutoencoderKL:
    """A VAE that downsamples by ``2 ** (len(block_out_channels) - 1)``, the pipelines' vae_scale_factor.

    ``extra_config`` holds the latent normalisation (``scaling_factor``, ``shift_factor``) and the like.
    """
    depth = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        **extra_config,
    )


# The noise schedule SD 1.x and SDXL were trained with.
_SD_BETAS = MappingProxyType(
    {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
)


def _ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _euler_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")


def _dpm_solver_scheduler() -> DPMSolverMultistepScheduler:
    # PixArt-alpha was trained with a linear schedule, and ships with DPM-Solver++.
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
    )


# --------------------------------------------------------------------------------------------------
# Text encoders


def _clip_text_encoder(
    tokenizer: CLIPTokenizer, *, hidden_size: int, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder; with ``projection_dim`` it also returns projected pooled embeddings."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=hidden_size // 16,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size,
        hidden_act="quick_gelu",
        # The pooled output is taken at the first eos token, so the ids must match the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def _t5_text_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU feed-forward, like the T5-XXL of SD3 and PixArt)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=T5_D_MODEL // 16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


# --------------------------------------------------------------------------------------------------
# Tokenizers: every tiny pipeline's are learned from the same prompt corpus.


def _clip_tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer(PROMPT_CORPUS)


def _t5_tokenizer() -> T5Tokenizer:
    return build_t5_tokenizer(PROMPT_CORPUS)
