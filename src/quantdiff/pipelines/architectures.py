"""What quantdiff knows about each supported denoiser, kept as data.

Everything architecture-specific lives here: which pipeline component is the denoiser, how to recognise
it, and which layers stay in floating point by default and why. The rest of the package asks this module
instead of testing class names itself.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantdiff.errors import PipelineError


@dataclass(frozen=True)
class IgnoreRule:
    """A layer-name glob kept in floating point by default, with the reason."""

    pattern: str
    reason: str


@dataclass(frozen=True)
class NormFeeds:
    """An affine norm whose output feeds only ``layers``: a per-input-channel factor of those layers (channel
    balancing, SmoothQuant) folds exactly into the norm's weight and bias instead of a stored pre-scale.

    Attributes:
        norm: glob of the norm's qualified name, e.g. ``*.transformer_blocks.*.norm1``.
        layers: the layers it feeds, by name relative to the norm's parent module.
        reason: what this is, for reports.
    """

    norm: str
    layers: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Architecture:
    """A supported denoiser family.

    Attributes:
        name: short id used in plans and reports (``sd15``, ``sdxl``, ``sd3``, ``pixart``).
        title: human name.
        denoiser_component: attribute of the pipeline that holds the denoiser (``unet`` / ``transformer``).
        denoiser_class: diffusers class name of the denoiser.
        flow_matching: whether the denoiser predicts a flow-matching velocity rather than noise.
        default_ignore: layers kept in floating point unless a recipe says otherwise.
        norm_feeds: affine norms and the layers they feed (foldable channel factors); empty where every
            norm is modulated per timestep (adaLN), which no stored factor can fold into.
        skip_concat: whether up blocks concatenate the skip connections to their input (UNets): the
            input of their resnets' ``conv_shortcut`` joins two tensors of different ranges (Q-Diffusion's
            shortcut splitting, :func:`concat_split_points`).
        reconstruction_blocks: globs of the modules that block reconstruction (BRECQ / Q-Diffusion,
            ``algorithms/adaround.py``) optimizes as one unit, matched outermost first
            (:func:`reconstruction_blocks_of`); quantized layers outside every block are reconstructed alone.
        text_kv: globs of the key / value projections whose input is the text encoder's output, token by
            token (cross-attention ``to_k`` / ``to_v``): where BOS-aware quantization may precompute the first
            token's key and value (``algorithms/bos_aware.py``; whether it applies is measured, not assumed).
        text_kv_note: what applies to this architecture's text keys and values, and why (shown when
            ``text_kv`` is empty and BOS-aware quantization is asked for).
        content_layers: globs of the layers that shape an image's *content* (MixDQ: cross-attention and
            feed-forward), whose sensitivity is measured on generated images; every other layer shapes its
            *quality* and is measured by the denoiser output's SQNR (``algorithms/sensitivity.py``).
        search_protected: layers a bit-width search keeps at 8 bits when the recipe quantizes them, with why.
    """

    name: str
    title: str
    denoiser_component: str
    denoiser_class: str
    flow_matching: bool
    default_ignore: tuple[IgnoreRule, ...]
    norm_feeds: tuple[NormFeeds, ...] = ()
    skip_concat: bool = False
    reconstruction_blocks: tuple[str, ...] = ()
    text_kv: tuple[str, ...] = ()
    text_kv_note: str = ""
    content_layers: tuple[str, ...] = ()
    search_protected: tuple[IgnoreRule, ...] = ()


# Shared reasons, so the same decision reads the same everywhere.
_FIRST = "first layer: few input channels so it is cheap, and latent ranges shift with the timestep"
_LAST = "last layer: its error lands directly in the predicted noise / velocity"
_TIME = (
    "timestep embedding MLP: negligible FLOPs, and its output conditions every block "
    "(timestep features are among the most quantization-sensitive, TFMQ-DM)"
)

_UNET_IGNORE = (
    IgnoreRule("conv_in", _FIRST),
    IgnoreRule("conv_out", _LAST),
    IgnoreRule("time_embedding.*", _TIME),
)

# Q-Diffusion's blocks in a UNet: each resnet (ResBlock) and each transformer block inside the Transformer2DModels
# (BasicTransformerBlock); the transformers' proj_in / proj_out, the down/upsampler convs and embedding layers are
# reconstructed layer by layer. A whole Transformer2DModel would be one unit of up to 10 blocks in SDXL.
_UNET_BLOCKS = ("*.resnets.*", "*.transformer_blocks.*")
# A DiT's blocks: each (joint) transformer block.
_DIT_BLOCKS = ("transformer_blocks.*",)

# diffusers' Transformer2DModel in the UNet: GroupNorm -> proj_in, and in each BasicTransformerBlock (norm type
# "layer_norm") affine LayerNorms before self-attention, cross-attention (query only: key and value take the
# text) and the feed-forward. The resnets' norms are followed by SiLU: nothing folds there.
_UNET_NORM_FEEDS = (
    NormFeeds("*.attentions.*.norm", ("proj_in",), "GroupNorm before the transformer's input projection"),
    NormFeeds(
        "*.transformer_blocks.*.norm1", ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "LayerNorm before self-attention"
    ),
    NormFeeds("*.transformer_blocks.*.norm2", ("attn2.to_q",), "LayerNorm before cross-attention's query"),
    NormFeeds("*.transformer_blocks.*.norm3", ("ff.net.0.proj",), "LayerNorm before the feed-forward"),
)

# MixDQ's metric-decoupled groups: "'ff' in name or 'attn2' in name" is content, everything else quality.
_UNET_CONTENT = ("*.attn2.*", "*.ff.*")
_UNET_TEXT_KV = ("*.attn2.to_k", "*.attn2.to_v")  # cross-attention reads encoder_hidden_states as it is
_UNET_TEXT_KV_NOTE = (
    "cross-attention to_k / to_v read the CLIP text encoder's output token by token; CLIP is causal, so its "
    "first (BOS) token is the same for every prompt (measured on the calibration data before it is used)"
)
_UNET_PROTECTED = (
    IgnoreRule("conv_in", _FIRST),
    IgnoreRule("conv_out", _LAST),
)

SD15 = Architecture(
    name="sd15",
    title="Stable Diffusion 1.x / 2.x UNet",
    denoiser_component="unet",
    denoiser_class="UNet2DConditionModel",
    flow_matching=False,
    default_ignore=_UNET_IGNORE,
    norm_feeds=_UNET_NORM_FEEDS,
    skip_concat=True,
    reconstruction_blocks=_UNET_BLOCKS,
    text_kv=_UNET_TEXT_KV,
    text_kv_note=_UNET_TEXT_KV_NOTE,
    content_layers=_UNET_CONTENT,
    search_protected=_UNET_PROTECTED,
)

SDXL = Architecture(
    name="sdxl",
    title="Stable Diffusion XL / SDXL-Turbo UNet",
    denoiser_component="unet",
    denoiser_class="UNet2DConditionModel",
    flow_matching=False,
    default_ignore=_UNET_IGNORE
    + (
        IgnoreRule(
            "add_embedding.*",
            "pooled-text and size/crop (time_ids) embedding MLP: negligible FLOPs, conditions every block",
        ),
    ),
    norm_feeds=_UNET_NORM_FEEDS,
    skip_concat=True,
    reconstruction_blocks=_UNET_BLOCKS,
    text_kv=_UNET_TEXT_KV,
    text_kv_note=_UNET_TEXT_KV_NOTE,
    content_layers=_UNET_CONTENT,
    search_protected=_UNET_PROTECTED,
)

# SD3's and PixArt's block norms are adaLN: scaled and shifted per timestep (AdaLayerNormZero / the
# scale-shift table), so no stored factor folds into them; channel factors are stored as input pre-scales.
SD3 = Architecture(
    name="sd3",
    title="Stable Diffusion 3 / 3.5 MMDiT",
    denoiser_component="transformer",
    denoiser_class="SD3Transformer2DModel",
    flow_matching=True,
    default_ignore=(
        IgnoreRule("pos_embed.proj", "patch-embedding conv: " + _FIRST),
        IgnoreRule("time_text_embed.*", _TIME + "; also embeds the pooled CLIP text vector"),
        IgnoreRule(
            "context_embedder",
            "projects the T5/CLIP token embeddings, whose outlier channels break per-tensor int8 "
            "(msModelSlim keeps it in floating point too)",
        ),
        IgnoreRule("norm_out.linear", "final adaLN modulation: scales the output of the last layer"),
        IgnoreRule("proj_out", _LAST),
    ),
    reconstruction_blocks=_DIT_BLOCKS,
    text_kv_note=(
        "none: SD3's joint attention concatenates the CLIP-L/G tokens (zero-padded) and the T5 tokens with the "
        "image tokens; its text keys and values (attn.add_k_proj / add_v_proj) read the text stream after the "
        "timestep- and pooled-prompt-modulated norm1_context, and from the second block on after joint attention "
        "has mixed image and prompt into every text token, so no text token is constant at any K/V input. Only "
        "context_embedder sees the raw CLIP BOS token, and it stays in floating point by default"
    ),
    # The text stream's projections are where the prompt enters joint attention; with the feed-forwards
    # they are the content group (the image stream's q/k/v attend to text too, but carry the image).
    content_layers=(
        "transformer_blocks.*.ff.*",
        "transformer_blocks.*.ff_context.*",
        "transformer_blocks.*.attn.add_*_proj",
        "transformer_blocks.*.attn.to_add_out",
    ),
    search_protected=(
        IgnoreRule("pos_embed.proj", "patch-embedding conv: " + _FIRST),
        IgnoreRule("proj_out", _LAST),
    ),
)

PIXART = Architecture(
    name="pixart",
    title="PixArt-alpha / PixArt-sigma DiT",
    denoiser_component="transformer",
    denoiser_class="PixArtTransformer2DModel",
    flow_matching=False,
    default_ignore=(
        IgnoreRule("pos_embed.proj", "patch-embedding conv: " + _FIRST),
        IgnoreRule("adaln_single.*", _TIME + "; produces the adaLN modulation of every block"),
        IgnoreRule(
            "caption_projection.*",
            "projects the T5 caption embeddings, whose outlier channels break per-tensor int8 (ViDiT-Q keeps the y-embedder in FP)",
        ),
        IgnoreRule("proj_out", _LAST),
    ),
    reconstruction_blocks=_DIT_BLOCKS,
    # Cross-attention reads the T5 caption features after caption_projection (a per-token MLP). T5 is a
    # bidirectional encoder without a BOS token, so its first token depends on the whole prompt: BOS-aware
    # quantization is measured here and refused with the numbers (see algorithms/bos_aware.py).
    text_kv=("transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v"),
    text_kv_note=(
        "cross-attention to_k / to_v read the T5 caption features; T5 is bidirectional and has no BOS token, so "
        "the first token is expected to vary with the prompt (measured on the calibration data)"
    ),
    content_layers=("transformer_blocks.*.attn2.*", "transformer_blocks.*.ff.*"),
    search_protected=(
        IgnoreRule("pos_embed.proj", "patch-embedding conv: " + _FIRST),
        IgnoreRule("proj_out", _LAST),
    ),
)

ARCHITECTURES: Mapping[str, Architecture] = {a.name: a for a in (SD15, SDXL, SD3, PIXART)}


def norm_feeds_of(denoiser: nn.Module, architecture: Architecture) -> dict[str, tuple[str, ...]]:
    """``{norm name: (qualified names of the layers it feeds)}`` for the affine norms of ``denoiser``."""
    feeds: dict[str, tuple[str, ...]] = {}
    for name, module in denoiser.named_modules():
        for rule in architecture.norm_feeds:
            if fnmatch.fnmatchcase(name, rule.norm) and getattr(module, "weight", None) is not None:
                parent = name.rpartition(".")[0]
                feeds[name] = tuple(f"{parent}.{layer}" if parent else layer for layer in rule.layers)
    return feeds


def concat_split_points(denoiser: nn.Module, architecture: Architecture) -> dict[str, int]:
    """``{layer name: channels of the first part}`` for every layer whose input is ``cat([hidden, skip], dim=1)``.

    In a diffusers UNet up block, resnet ``j`` gets the previous resnet's output (``j > 0``), or the previous
    up block's output (the mid block's for the first block), concatenated with a skip connection. Only its
    ``conv_shortcut`` (the 1x1 conv on the raw concatenation) is listed, as in Q-Diffusion: ``conv1`` sees the
    join after GroupNorm, which already aligns the halves (on ``digits-sd`` their max |x| differ by 1.00-1.18x
    at conv1, 1.21-1.36x at conv_shortcut). Empty for architectures without skip concatenation.
    """
    if not architecture.skip_concat:
        return {}
    splits: dict[str, int] = {}
    hidden = int(denoiser.config["block_out_channels"][-1])  # what the mid block hands the first up block
    for i, block in enumerate(denoiser.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if getattr(resnet, "conv_shortcut", None) is not None:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = hidden
            hidden = int(resnet.out_channels)
    return splits


def reconstruction_blocks_of(denoiser: nn.Module, architecture: Architecture) -> list[str]:
    """Qualified names of the modules matching ``architecture.reconstruction_blocks``, outermost only (a match
    inside an earlier match is part of it), in module order."""
    blocks: list[str] = []
    for name, _ in denoiser.named_modules():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in architecture.reconstruction_blocks) and not any(
            name.startswith(block + ".") for block in blocks
        ):
            blocks.append(name)
    return blocks


def layers_matching(names, patterns: tuple[str, ...]) -> list[str]:
    """The ``names`` (qualified layer names, in their order) that match any of the globs ``patterns``."""
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def architecture_of(denoiser: nn.Module) -> Architecture:
    """The architecture of a denoiser module, from its class and config."""
    return architecture_from_config(type(denoiser).__name__, dict(getattr(denoiser, "config", {}) or {}))


def architecture_from_config(class_name: str, config: Mapping[str, Any]) -> Architecture:
    """The architecture for a denoiser class name and its config (as in the component's config.json)."""
    if class_name == "UNet2DConditionModel":
        # SDXL is the same UNet class; its extra text/size conditioning is the tell.
        return SDXL if config.get("addition_embed_type") == "text_time" else SD15
    for architecture in (SD3, PIXART):
        if class_name == architecture.denoiser_class:
            return architecture
    supported = sorted({a.denoiser_class for a in ARCHITECTURES.values()})
    raise PipelineError(f"denoiser class {class_name!r} is not supported; quantdiff supports {', '.join(supported)}")
