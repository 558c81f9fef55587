"""Published denoiser configs, for building real-size models with random weights (sizes, benchmarks).

Speed and storage depend only on shapes, so these let quantdiff measure real-size models without any
download. Values are those of the diffusers ``config.json`` of each published checkpoint.
"""

from __future__ import annotations

from types import MappingProxyType

# runwayml/stable-diffusion-v1-5, unet/config.json (859.5M parameters).
SD15_UNET = MappingProxyType(
    {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2567.5M parameters). Keys at their diffusers
# defaults (class_embed_type, encoder_hid_dim, time_embedding_type, ...) are left out, as above.
SDXL_UNET = MappingProxyType(
    {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        # pooled CLIP-G text embedding (1280) + 6 size/crop time ids x addition_time_embed_dim (256)
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }
)

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2028.3M parameters): the MMDiT.
SD3_MEDIUM_TRANSFORMER = MappingProxyType(
    {
        "attention_head_dim": 64,
        "caption_projection_dim": 1536,
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 24,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "sample_size": 128,
    }
)
