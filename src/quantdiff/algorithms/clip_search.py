"""A clip ratio per layer for dynamic input ranges, chosen by each layer's output error on calibration data.

Dynamic 4-bit inputs (per token, or per token and channel group) are scaled to each call's own range; shrinking
that range by a ``clip_ratio`` (QuaRot and Atom: a fixed 0.9) saturates the few largest values and rounds the
rest more finely. Whether that pays depends on the layer and the model: on the bundled models a fixed 0.9 costs
the MMDiT (digits-sd3) 9-12 points of alignment at W8A4 / W4A4. Here each layer gets the
candidate ratio with the least error of its own output over replayed calibration calls,

    err(r) = sum_calls |(fq_r(X) - X) W^T|^2      (fq_r: the layer's dynamic quantization at clip r)

with ``X`` as the layer quantizes it (after a smoothing pre-scale or rotation) and ``W`` its floating-point
weight (a convolution's error through im2col, so every output pixel counts once). The chosen ratio is written
into the layer's input spec (``clip_ratio``), so the plan says what each layer does and nothing new is stored.
What the output error does not see: at W4A4 on digits-sd (with rotation and GPTQ) the search keeps every range
unclipped and loses 10-18 points of alignment to a fixed 0.9 at the same PSNR (README, digits-sd3 paragraph),
which is why the ``w8a4`` preset runs it and ``w4a4`` does not.
In the spirit of AWQ's per-layer clip search (there for weights) and the output-error proxy of
:mod:`quantdiff.algorithms.smoothquant`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.calibration.taps import Taps, even_spread, input_rows
from quantdiff.errors import RecipeError
from quantdiff.nn.inputs import fake_quantize_dynamic_input
from quantdiff.recipe import TensorSpec


def clip_output_errors(
    x: Tensor,
    weight: Tensor,
    spec: TensorSpec,
    ratios: Sequence[float],
    *,
    channel_dim: int,
    rows_of: Callable[[Tensor], Tensor] | None = None,
    max_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``|(fq_r(x) - x) W^T|^2`` for each clip ratio ``r``: ``(len(ratios),)`` float64.

    Args:
        x: one call's input as the layer quantizes it (Linear ``(..., C_in)``, Conv2d ``(N, C_in, H, W)``).
        weight: the layer's floating-point weight, ``(C_out, K)`` (a convolution's reshaped channel-major).
        spec: the layer's dynamic input spec; its ``clip_ratio`` is replaced by each candidate.
        ratios: candidate clip ratios in (0, 1].
        channel_dim: ``x``'s channel dimension.
        rows_of: maps an input-shaped tensor to the rows ``(N, K)`` the weight multiplies (Conv2d: im2col,
            :func:`quantdiff.calibration.taps.input_rows`); None: ``t.reshape(-1, K)`` (Linear).
        max_rows: measure on at most this many rows, the same random ones for every ratio (bounds the cost).
        generator: draws those rows.
    """
    rows_of = rows_of or (lambda t: t.reshape(-1, t.shape[-1]))
    errors = torch.empty(len(ratios), dtype=torch.float64)
    index = None
    for i, ratio in enumerate(ratios):
        difference = fake_quantize_dynamic_input(x, channel_dim, dataclasses.replace(spec, clip_ratio=ratio)) - x
        rows = rows_of(difference)  # (N, K)
        if index is None and max_rows is not None and rows.shape[0] > max_rows:
            index = torch.randperm(rows.shape[0], generator=generator)[:max_rows]
        if index is not None:
            rows = rows[index]
        errors[i] = float((rows @ weight.t()).double().square().sum())  # (N, C_out), summed
    return errors


def best_clip_ratio(errors: Tensor, ratios: Sequence[float]) -> float:
    """The ratio with the least error; on a tie the larger one (less clipping)."""
    best = min(range(len(ratios)), key=lambda i: (float(errors[i]), -ratios[i]))
    return float(ratios[best])


@register_algorithm
@dataclass(frozen=True)
class ClipSearch(AlgorithmConfig):
    """Choose each dynamic-input layer's ``clip_ratio`` from ``ratios`` (see the module docstring).

    Attributes:
        ratios: candidate clip ratios in (0, 1]; 1 (no clipping) is always among them.
        records: calibration records replayed (an even spread of the set).
        max_rows: output rows (tokens / pixels) measured per layer and call, drawn at random.
    """

    TYPE: ClassVar[str] = "clip_search"
    STAGE: ClassVar[Stage] = Stage.CALIBRATION

    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
    records: int = 32
    max_rows: int = 1024

    def __post_init__(self) -> None:
        ratios = (self.ratios,) if isinstance(self.ratios, (int, float)) else tuple(self.ratios)
        for ratio in ratios:
            check_number("clip_search.ratios[]", ratio, 0.0, 1.0, low_open=True)
        object.__setattr__(self, "ratios", tuple(sorted({1.0, *ratios}, reverse=True)))
        check_number("clip_search.records", self.records, 1, integer=True)
        check_number("clip_search.max_rows", self.max_rows, 16, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        layers = [
            layer
            for layer in context.plan.quantized
            if layer.activations is not None
            and layer.activations.dynamic
            and getattr(context.module(layer.name), "groups", 1) == 1  # im2col rows: one group only
        ]
        if not layers:
            raise RecipeError(
                "clip_search chooses clip ratios of dynamic inputs, and no quantized layer has them: set "
                "activations.dynamic true (per token or per token group), or remove clip_search (static ranges "
                "are clipped by the observer: 'mse' or 'percentile')"
            )
        calibration = context.calibration_for(self)
        spread = even_spread(len(calibration), self.records)
        errors = {layer.name: torch.zeros(len(self.ratios), dtype=torch.float64) for layer in layers}
        generator = torch.Generator().manual_seed(0)
        with Taps(context.denoiser) as taps:
            for layer in layers:
                module = context.module(layer.name)
                weight = module.weight.detach().float().reshape(layer.out_features, -1)  # (C_out, K)
                linear = layer.layer_type == "Linear"

                def measure(
                    x: Tensor, name=layer.name, spec=layer.activations, module=module, weight=weight, linear=linear
                ) -> None:
                    x = x.detach().float()
                    errors[name] += clip_output_errors(
                        x,
                        weight,
                        spec,
                        self.ratios,
                        channel_dim=-1 if linear else x.dim() - 3,  # (N, C, H, W) or (C, H, W)
                        rows_of=None if linear else (lambda t, module=module: input_rows(module, t)),
                        max_rows=self.max_rows,
                        generator=generator,
                    )

                taps.on_layer_input(layer.name, measure)
            replay = calibration.subset_by_index(spread).replay(
                context.denoiser, progress=context.progress, desc="clip_search"
            )
            for _ in replay:
                pass
        for layer in layers:
            if not errors[layer.name].any():
                continue  # never ran during calibration: keeps the recipe's ratio
            ratio = best_clip_ratio(errors[layer.name], self.ratios)
            if ratio != layer.activations.clip_ratio:
                activations = dataclasses.replace(layer.activations, clip_ratio=ratio)
                context.replace_layer(dataclasses.replace(layer, activations=activations))
