"""The denoisers ``quantdiff bench`` measures: their specs (published configs and tiny test configs), the
random-weight builder, the inputs of one call and the calibration set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from quantdiff.calibration.dataset import CalibrationRecord, CalibrationSet
from quantdiff.errors import QuantDiffError
from quantdiff.pipelines.loading import config_hash
from quantdiff.pipelines.reference_configs import SD3_MEDIUM_TRANSFORMER, SD15_UNET, SDXL_UNET
from quantdiff.testing.configs import TINY_TRANSFORMER_SD3, TINY_UNET_SD15, TINY_UNET_SDXL


@dataclass(frozen=True)
class DenoiserSpec:
    """A denoiser to benchmark: its diffusers class, config and text-conditioning shape.

    Attributes:
        name: id used on the command line (``sd15``, ``sdxl``, ``sd3``, ``tiny-sd15``, ...).
        title: human name for reports.
        class_name: ``UNet2DConditionModel`` or ``SD3Transformer2DModel``.
        config: constructor config (published ``config.json`` values for the real models).
        text_tokens: tokens of ``encoder_hidden_states`` the pipeline passes (SD3: 77 CLIP + 256 T5).
        source: where the config comes from.
    """

    name: str
    title: str
    class_name: str
    config: Mapping[str, Any]
    text_tokens: int
    source: str

    @property
    def is_unet(self) -> bool:
        return self.class_name == _UNET

    def check_latent(self, side: int) -> None:
        """Raise :class:`QuantDiffError` unless the denoiser accepts a ``side`` x ``side`` latent."""
        if self.is_unet:
            multiple = 2 ** (len(self.config["block_out_channels"]) - 1)  # one halving per down block but the last
            largest = None
        else:
            multiple = int(self.config["patch_size"])
            largest = int(self.config["pos_embed_max_size"]) * multiple
        if side < multiple or side % multiple:
            raise QuantDiffError(f"{self.name}: latent size {side} must be a positive multiple of {multiple}")
        if largest is not None and side > largest:
            raise QuantDiffError(f"{self.name}: latent size {side} is above its position table ({largest})")


_UNET, _MMDIT = "UNet2DConditionModel", "SD3Transformer2DModel"
DENOISERS: Mapping[str, DenoiserSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            DenoiserSpec("sd15", "SD1.5 UNet (860M)", _UNET, SD15_UNET, 77, "runwayml/stable-diffusion-v1-5"),
            DenoiserSpec("sdxl", "SDXL UNet (2.57B)", _UNET, SDXL_UNET, 77, "stabilityai/stable-diffusion-xl-base-1.0"),
            DenoiserSpec(
                "sd3",
                "SD3-Medium MMDiT (2.03B)",
                _MMDIT,
                SD3_MEDIUM_TRANSFORMER,
                77 + 256,  # 77 CLIP + 256 T5 tokens
                "stabilityai/stable-diffusion-3-medium-diffusers",
            ),
            # The tiny denoisers of the test pipelines (quantdiff.testing.configs): for tests and smoke runs.
            DenoiserSpec("tiny-sd15", "tiny SD1.5-layout UNet", _UNET, TINY_UNET_SD15, 77, "quantdiff tiny"),
            DenoiserSpec("tiny-sdxl", "tiny SDXL-layout UNet", _UNET, TINY_UNET_SDXL, 77, "quantdiff tiny"),
            DenoiserSpec("tiny-sd3", "tiny SD3-layout MMDiT", _MMDIT, TINY_TRANSFORMER_SD3, 77 + 16, "quantdiff tiny"),
        )
    }
)


def build_denoiser(spec: DenoiserSpec, seed: int = 0) -> nn.Module:
    """The denoiser of ``spec`` in fp32 eval mode with seeded random weights, deterministic across processes.

    Parameters are created empty (accelerate's ``init_empty_weights`` when installed, so the library's own
    init is not paid for and then overwritten) and filled once, in module order, from one generator:
    Linear / Conv2d weights N(0, 1/fan_in) (bell-shaped like trained weights, so quantization error and
    the pair-safe cost are realistic; activations keep their scale through each layer), norm scales 1 and
    shifts 0, everything else N(0, 0.02). Buffers (e.g. SD3's position table) keep their computed values.
    """
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    try:
        from accelerate import init_empty_weights

        empty = init_empty_weights(include_buffers=False)
    except ImportError:
        empty = contextlib.nullcontext()
    with empty:
        model = cls.from_config(dict(spec.config))
    generator = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                data = torch.empty(param.shape, dtype=torch.float32) if param.is_meta else param.data.float()
                if isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight":
                    data.normal_(0.0, data[0].numel() ** -0.5, generator=generator)  # fan_in = in/groups * kh * kw
                elif isinstance(module, norms) or "norm" in type(module).__name__.lower():
                    data.fill_(1.0 if name == "weight" else 0.0)
                else:
                    data.normal_(0.0, 0.02, generator=generator)
                module._parameters[name] = nn.Parameter(data, requires_grad=False)
    return model.float().eval().requires_grad_(False)


def denoiser_inputs(spec: DenoiserSpec, latent: int, batch: int, timestep: float, seed: int) -> dict[str, Any]:
    """Keyword arguments of one denoiser call: Gaussian latent and text embeddings of the real shapes.

    UNets get an int64 timestep (DDPM-style, 0..999), SD3 a float one (flow matching: sigma x 1000). SDXL's
    size conditioning (``time_ids``) holds the image size the latent stands for (x8), no crop.
    """
    generator = torch.Generator().manual_seed(seed)
    config = spec.config
    channels = int(config["in_channels"])
    sample = torch.randn(batch, channels, latent, latent, generator=generator)  # (B, C, h, w)
    if spec.is_unet:
        text = torch.randn(
            batch, spec.text_tokens, int(config["cross_attention_dim"]), generator=generator
        )  # (B, T, D)
        inputs: dict[str, Any] = {
            "sample": sample,
            "timestep": torch.full((batch,), int(round(timestep)), dtype=torch.int64),
            "encoder_hidden_states": text,
        }
        if config.get("addition_embed_type") == "text_time":
            pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
            pixels = float(latent * 8)
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, generator=generator),  # (B, pooled)
                "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).expand(batch, 6).clone(),
            }
    else:
        text = torch.randn(batch, spec.text_tokens, int(config["joint_attention_dim"]), generator=generator)
        inputs = {
            "hidden_states": sample,
            "timestep": torch.full((batch,), float(timestep)),
            "encoder_hidden_states": text,  # (B, T, 4096)
            "pooled_projections": torch.randn(batch, int(config["pooled_projection_dim"]), generator=generator),
        }
    inputs["return_dict"] = False
    return inputs


def cast_inputs(inputs: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """A denoiser call's kwargs on ``device`` with floating-point tensors in ``dtype`` (None: unchanged); integer
    tensors (UNet timesteps) keep their dtype, non-tensors pass through."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else None)
    if isinstance(inputs, Mapping):
        return {key: cast_inputs(item, device, dtype) for key, item in inputs.items()}
    return inputs


def calibration_timesteps(count: int) -> list[float]:
    """``count`` timesteps evenly spread over (0, 1000), noisiest first: 4 -> 875, 625, 375, 125."""
    return [1000.0 * (count - i - 0.5) / count for i in range(count)]


EVAL_TIMESTEP = 500.0
EVAL_SEED_OFFSET = 1000  # the evaluation input's seed is seed + 1000; calibration input i uses seed + 1 + i


def bench_calibration(
    spec: DenoiserSpec, denoiser: nn.Module, latent: int, batch: int, count: int, seed: int
) -> CalibrationSet:
    """The calibration set quantdiff and PT2E both use: ``count`` random inputs at spread timesteps."""
    records = [
        CalibrationRecord(denoiser_inputs(spec, latent, batch, t, seed + 1 + i), i, i, t)
        for i, t in enumerate(calibration_timesteps(count))
    ]
    info = {
        "model": f"bench:{spec.name}",
        "denoiser_class": spec.class_name,
        "denoiser_config_hash": config_hash(denoiser.config),
        "mode": "bench-random",
        "step_indices": list(range(count)),
        "timesteps": calibration_timesteps(count),
        "prompts": [],
        "seed": seed,
    }
    return CalibrationSet(records, info)


def parameter_count(spec: DenoiserSpec) -> int:
    """Parameters of ``spec``'s denoiser, counted on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, spec.class_name).from_config(dict(spec.config))
    return sum(p.numel() for p in model.parameters())
