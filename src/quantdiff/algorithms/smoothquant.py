"""Channel balancing (SmoothQuant; ViDiT-Q's and PTQ4DiT's channel balancing; msModelSlim's anti-outlier step).

A few input channels of a layer carry outliers that one per-tensor activation scale cannot cover. With a
per-input-channel factor ``s`` the product is unchanged, ``X W^T = (X / s)(W s)^T``, and the outliers move
from the activations into the weights, whose per-channel scales absorb them::

    s_j = max|X_j| ** alpha / max|W_{:, j}| ** (1 - alpha)          (SmoothQuant, eq. 4)

``alpha`` is searched per layer (or per group of layers that share an input) on sampled calibration inputs:
each candidate's quantized output error ``|fq(X / s) fq(W s)^T - X W^T|^2`` is measured, "no smoothing"
included, and the best kept, so a layer is only changed where the proxy says it helps. Where the layers'
input is the output of an affine norm that feeds only them (architecture data:
``pipelines/architectures.py`` ``norm_feeds``), ``1 / s`` folds into the norm's weight and bias and costs
nothing at run time; elsewhere it is stored as the layer's ``input_pre_scale`` extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.calibration.taps import Taps, input_rows
from quantdiff.errors import RecipeError
from quantdiff.nn.inputs import fake_quantize_dynamic_input
from quantdiff.nn.weights import dequantize_weight, quantize_weight
from quantdiff.observers import make_observer
from quantdiff.pipelines.architectures import norm_feeds_of
from quantdiff.primitives import channel_group_ranges, compute_qparams, fake_quantize
from quantdiff.progress import Progress
from quantdiff.recipe import TensorSpec

_EPS = 1e-5


def smoothing_factors(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """``s = act_max ** alpha / weight_max ** (1 - alpha)`` per input channel ``(C_in,)``; channels that never
    fire (or have no weight) keep 1."""
    s = act_max.clamp_min(_EPS) ** alpha / weight_max.clamp_min(_EPS) ** (1 - alpha)
    return torch.where((act_max > 0) & (weight_max > 0), s, torch.ones_like(s))


def channel_absmax(x: Tensor, *, linear: bool) -> Tensor:
    """``max |x|`` per input channel ``(C_in,)``: the last dim of a Linear input, dim 1 of a conv's (N, C, H, W)."""
    if linear:
        return x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
    x4 = x if x.dim() == 4 else x.unsqueeze(0)  # nn.Conv2d also takes (C, H, W)
    return x4.abs().amax(dim=(0, 2, 3))


def weight_channel_max(weight: Tensor) -> Tensor:
    """``max |W[:, j]|`` over output channels (and kernel taps) for each input channel: ``(C_in,)``."""
    w = weight.detach().abs().transpose(0, 1)  # (C_in, C_out, ...)
    return w.reshape(w.shape[0], -1).amax(dim=1)


def per_row(s: Tensor, reduction_size: int) -> Tensor:
    """Channel factors ``(C_in,)`` laid out along a weight row / im2col row ``(K,)`` (channel-major)."""
    return s.repeat_interleave(reduction_size // s.numel())


def fake_quantize_rows(rows: Tensor, spec: TensorSpec, channels: int) -> Tensor:
    """Input rows ``(N, K)`` of a layer with ``channels`` input channels fake-quantized as the layer will: per
    row for dynamic per-token specs, per row and channel group for per-token-group specs, else one range over
    all rows chosen by the spec's observer."""
    if spec.dynamic and spec.granularity != "group":  # per row or per tensor: as the layer does, bit for bit
        return fake_quantize_dynamic_input(rows, 1, spec)
    if spec.dynamic:
        # A convolution's im2col row is channel-major (each channel's kernel taps side by side): a run of
        # group_size channels is group_size * taps entries of the row. The layer groups each pixel's channels;
        # here one range covers the group's channels over all taps, a little wider (this only ranks alphas).
        taps = rows.shape[1] // channels
        low, high = channel_group_ranges(rows, 1, spec.group_size * taps)  # (N, K) each
        scale, zero_point = compute_qparams(low * spec.clip_ratio, high * spec.clip_ratio, spec.bits, spec.symmetric)
    else:
        observer = make_observer(spec.observer, spec.bits, spec.symmetric, **dict(spec.observer_options))
        observer.update(rows.reshape(1, -1))
        scale, zero_point = observer.qparams()
    return fake_quantize(rows, scale, zero_point, spec.bits, spec.symmetric)


def quantized_output_error(
    rows: Tensor, weights: list[Tensor], s: Tensor, weight_spec: TensorSpec, input_spec: TensorSpec
) -> float:
    """``sum_l |fq(X / s) fq(W_l s)^T - X W_l^T|^2`` for layers ``W_l`` that share the input rows ``X`` ``(N, K)``."""
    s_row = per_row(s, rows.shape[1])  # (K,)
    x_q = fake_quantize_rows(rows / s_row, input_spec, s.numel())  # (N, K)
    error = 0.0
    for weight in weights:
        shape = (1, -1) + (1,) * (weight.dim() - 2)
        scaled = weight * s.reshape(shape)  # W s, per input channel
        w_q = dequantize_weight(*quantize_weight(scaled, weight_spec), weight_spec, scaled.shape)
        w_flat, w_q_flat = weight.reshape(weight.shape[0], -1), w_q.reshape(weight.shape[0], -1)  # (C_out, K)
        error += float(((x_q @ w_q_flat.t() - rows @ w_flat.t()) ** 2).sum())
    return error


def search_alpha(
    rows: Tensor,
    act_max: Tensor,
    weights: list[Tensor],
    alphas: tuple[float, ...],
    weight_spec: TensorSpec,
    input_spec: TensorSpec,
) -> tuple[float | None, Tensor | None]:
    """The ``alpha`` (and its factors) with the least quantized output error; ``(None, None)`` when no
    smoothing is best."""
    weight_max = torch.stack([weight_channel_max(w) for w in weights]).amax(dim=0)  # (C_in,)
    ones = torch.ones_like(act_max)
    best_alpha, best_s = None, None
    best_error = quantized_output_error(rows, weights, ones, weight_spec, input_spec)
    for alpha in alphas:
        s = smoothing_factors(act_max, weight_max, alpha)
        error = quantized_output_error(rows, weights, s, weight_spec, input_spec)
        if error < best_error:
            best_alpha, best_s, best_error = alpha, s, error
    return best_alpha, best_s


@register_algorithm
@dataclass(frozen=True)
class SmoothQuant(AlgorithmConfig):
    """Per-input-channel balancing between activations and weights (see the module docstring).

    Attributes:
        alphas: migration strengths tried per layer (or per group of layers sharing a norm); one value
            fixes it. "No smoothing" is always a candidate.
        fold: fold the factors into the preceding affine norm where the architecture has one.
        max_rows: input rows (tokens / im2col pixels) sampled per layer for the search.
    """

    TYPE: ClassVar[str] = "smoothquant"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL

    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    fold: bool = True
    max_rows: int = 512

    def __post_init__(self) -> None:
        alphas = (self.alphas,) if isinstance(self.alphas, (int, float)) else self.alphas
        object.__setattr__(self, "alphas", tuple(alphas))
        if not self.alphas:
            raise RecipeError("smoothquant.alphas must list at least one migration strength in [0, 1]")
        for alpha in self.alphas:
            check_number("smoothquant.alphas[]", alpha, 0.0, 1.0)
        if not isinstance(self.fold, bool):
            raise RecipeError(f"smoothquant.fold={self.fold!r} must be true or false")
        check_number("smoothquant.max_rows", self.max_rows, 16, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        calibration = context.calibration_for(self)
        groups = self._groups(context)  # (norm or None, layer names): layers of a group share their input
        act_max: dict[str, Tensor] = {}
        rows: dict[str, list[Tensor]] = {}
        per_call = math.ceil(self.max_rows / max(len(calibration), 1))
        generator = torch.Generator().manual_seed(0)
        with Taps(context.denoiser) as taps:
            for _, names in groups:
                module = context.module(names[0])

                def observe(x: Tensor, name: str = names[0], module=module) -> None:
                    x = x.detach().float()
                    seen = channel_absmax(x, linear=module.layer_plan.layer_type == "Linear")  # (C_in,)
                    act_max[name] = seen if name not in act_max else torch.maximum(act_max[name], seen)
                    sample = input_rows(module, x)  # (N, K)
                    if sample.shape[0] > per_call:
                        sample = sample[torch.randperm(sample.shape[0], generator=generator)[:per_call]]
                    rows.setdefault(name, []).append(sample)

                taps.on_layer_input(names[0], observe)
            for _ in calibration.replay(context.denoiser, progress=context.progress, desc="smoothquant statistics"):
                pass
        for norm, names in Progress(
            groups, desc="smoothquant search", unit="group", enabled=context.progress, leave=False
        ):
            if names[0] not in act_max:
                continue  # never ran during calibration: observation will say so
            layers = [context.plan[name] for name in names]
            weights = [context.module(name).weight.detach().float() for name in names]
            sample = torch.cat(rows.pop(names[0]))[: self.max_rows]
            alpha, s = search_alpha(
                sample, act_max[names[0]], weights, self.alphas, layers[0].weights, layers[0].activations
            )
            if s is None:
                continue
            with torch.no_grad():
                for name in names:
                    module = context.module(name)
                    scaled = module.weight * s.reshape((1, -1) + (1,) * (module.weight.dim() - 2))  # W s
                    context.replace_tensor(module, "weight", scaled)
                if norm is not None:
                    norm_module = context.denoiser.get_submodule(norm)
                    context.replace_tensor(norm_module, "weight", norm_module.weight / s)  # the norm outputs X / s
                    if norm_module.bias is not None:
                        context.replace_tensor(norm_module, "bias", norm_module.bias / s)
                else:
                    context.add_extra(names[0], "input_pre_scale", {"input_pre_scale": 1 / s}, channels=s.numel())

    def _groups(self, context: QuantizationContext) -> list[tuple[str | None, tuple[str, ...]]]:
        """Layers to balance, grouped by the norm they share (folding) or alone (stored pre-scale)."""
        candidates = {
            layer.name
            for layer in context.plan.quantized
            if layer.activations is not None and (layer.layer_type == "Linear" or _groups_of(context, layer.name) == 1)
        }
        groups: list[tuple[str | None, tuple[str, ...]]] = []
        if self.fold:
            for norm, names in norm_feeds_of(context.denoiser, context.architecture).items():
                specs = [(context.plan[n].weights, context.plan[n].activations) for n in names if n in context.plan]
                if all(name in candidates for name in names) and all(spec == specs[0] for spec in specs):
                    groups.append((norm, names))
                    candidates -= set(names)
        groups += [(None, (name,)) for name in sorted(candidates, key=_module_order(context))]
        return groups


def _groups_of(context: QuantizationContext, name: str) -> int:
    return int(getattr(context.module(name), "groups", 1))


def _module_order(context: QuantizationContext):
    order = {layer.name: index for index, layer in enumerate(context.plan.layers)}
    return lambda name: order[name]
