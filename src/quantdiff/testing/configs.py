"""Configs of the tiny denoisers: the one source for the tiny test pipelines (``quantdiff.testing.tiny``) and
the tiny cases of ``quantdiff bench``.

Same layouts and config keys as the released models, at widths of 16-128 with two layers or blocks where
the real ones have dozens. Widths are multiples of 16 wherever the architecture allows, so that group-wise
quantization and packing of two 4-bit values per byte have even sizes to work with.
"""

from __future__ import annotations

from types import MappingProxyType

# T5's width, the text-token width of SD3 and PixArt. Wider than SD3's two 32-wide CLIP encoders
# together, so that SD3 zero-pads the CLIP tokens to it as the real model does (2048 -> 4096).
T5_D_MODEL = 128

TINY_UNET_SD15 = MappingProxyType(
    {
        "sample_size": 16,  # latent side; with the x4 VAE the default image is 64x64
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 2,  # as in SD 1.5: two resnets per down block, three per up block
        "norm_num_groups": 8,
        "attention_head_dim": (2, 4),  # legacy name: this is the number of heads, giving 16-dim heads
        "cross_attention_dim": 32,  # = CLIP hidden size
        "use_linear_projection": False,  # SD 1.x: 1x1 Conv2d proj_in/proj_out around each transformer
    }
)

TINY_UNET_SDXL = MappingProxyType(
    {
        "sample_size": 16,  # latent side; with the x4 VAE the default image is 64x64
        "in_channels": 4,
        "out_channels": 4,
        # SDXL's pattern: no attention at the highest resolution, cross-attention below it.
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": (2, 4, 4),  # legacy name: number of heads, giving 16-dim heads
        "transformer_layers_per_block": (1, 1, 2),  # deeper transformers in lower blocks, as in SDXL
        "cross_attention_dim": 64,  # = hidden sizes of both CLIP encoders, concatenated (32 + 32)
        "use_linear_projection": True,  # SDXL: Linear proj_in/proj_out
        "addition_embed_type": "text_time",  # pooled text + size/crop micro-conditioning
        "addition_time_embed_dim": 16,
        # 6 time ids (original size, crop top-left, target size) x 16 + text_encoder_2's projection (32).
        "projection_class_embeddings_input_dim": 6 * 16 + 32,
    }
)

TINY_TRANSFORMER_SD3 = MappingProxyType(
    {
        "sample_size": 16,  # latent side; with the x4 VAE the default image is 64x64, 8x8 = 64 patches
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "num_attention_heads": 4,
        "attention_head_dim": 16,  # inner dim 64
        "joint_attention_dim": T5_D_MODEL,  # T5 tokens, and the CLIP tokens zero-padded to the same width
        "caption_projection_dim": 64,  # must equal the inner dim: text tokens join the image attention
        "pooled_projection_dim": 32 + 32,  # both CLIP projections, concatenated
        "pos_embed_max_size": 32,  # the position table is cropped to the input: up to 256x256 images
    }
)

TINY_TRANSFORMER_PIXART = MappingProxyType(
    {
        # The pipeline's aspect-ratio binning only knows sample sizes 32, 64 and 128 (the 256, 512 and
        # 1024 pixel tables). 32 also means no resolution/aspect-ratio micro-conditioning: only 128 has it.
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 8,  # learned sigma: the pipeline keeps the first 4 channels, as for PixArt-alpha
        "num_layers": 2,
        "num_attention_heads": 4,
        "attention_head_dim": 16,  # inner dim 64
        "cross_attention_dim": 64,  # captions are projected to the inner dim before cross-attention
        "caption_channels": T5_D_MODEL,
    }
)
