"""Writes tests/data/v1-folder: a quantized folder in format version 1, kept as a compatibility fixture.

The checked-in copy was written by quantdiff 0.1.0 at commit 71e16f4, before the algorithm layer existed;
tests/test_format_versions.py loads it with today's code and requires the same tensors and outputs. Run
this only to understand how it was made: re-running it with a newer quantdiff would defeat the test.

    python tests/data/make_v1_folder.py OUT_DIR

The denoiser is a micro SD1.5-layout UNet (8 channels, random weights) so the folder stays a few tens
of KB. One recipe covers the v1 layer kinds: int8 symmetric per-channel weights with static asymmetric
int8 inputs, asymmetric 4-bit per-group weights (zero points, packed), weight-only 8-bit layers, a
per-tensor 6-bit layer and ignored layers. ``expected.safetensors`` holds one input and the output the
quantized denoiser gave for it (reference path), with the torch version and CPU capability it ran on.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from quantdiff.calibration import CalibrationRecord, CalibrationSet
from quantdiff.pipelines.loading import config_hash
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import LayerOverride, Recipe, TensorSpec
from quantdiff.serialization import save_quantized
from quantdiff.testing.tiny import save_tiny_pipeline

MICRO_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type=None,
    block_out_channels=(8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=2,
    cross_attention_dim=8,
)

RECIPE = Recipe(
    name="v1-fixture",
    weights=TensorSpec(bits=8, symmetric=True, granularity="channel"),
    activations=TensorSpec(bits=8, symmetric=False, granularity="tensor"),
    overrides=(
        LayerOverride(
            "down_blocks.1.*", weights={"bits": 4, "symmetric": False, "granularity": "group", "group_size": 8}
        ),
        LayerOverride("*.attn2.to_k", activations=None),
        LayerOverride("*.attn2.to_v", weights={"bits": 6, "granularity": "tensor"}),
        LayerOverride("up_blocks.0.upsamplers.*", skip=True),
    ),
)


def _inputs(generator: torch.Generator) -> dict:
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 4, 8, generator=generator),
    }


def main(out: Path) -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    base = save_tiny_pipeline("sd15", work / "base", seed=0)
    shutil.rmtree(base / "unet")
    UNet2DConditionModel(**MICRO_UNET).save_pretrained(base / "unet")
    denoiser = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    generator = torch.Generator().manual_seed(0)
    records = [CalibrationRecord(_inputs(generator), i, 0, 500.0) for i in range(3)]
    calibration = CalibrationSet(records, {"denoiser_config_hash": config_hash(denoiser.config), "mode": "fixture"})
    quantize_denoiser(denoiser, RECIPE, calibration, progress=False)
    save_quantized(denoiser, work / "q", base_path=base)
    out.mkdir(parents=True)
    shutil.copy2(work / "q" / "quantdiff.json", out / "quantdiff.json")
    shutil.copytree(work / "q" / "unet", out / "unet")
    inputs = _inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = denoiser(**inputs).sample
    metadata = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    save_file({**inputs, "output": output}, out / "expected.safetensors", metadata=metadata)
    shutil.rmtree(work)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
