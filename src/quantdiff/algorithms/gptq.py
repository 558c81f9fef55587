"""GPTQ (Frantar et al., 2023): integer weights that correct each column's rounding error with the layer's
input Hessian, instead of rounding every weight to its nearest grid point.

For a layer with inputs ``X`` (rows: tokens, or im2col pixels of a convolution) the output error of a
weight change is ``|X dW^T|^2``, a quadratic form in ``H = X^T X``. GPTQ quantizes the columns of ``W`` one
at a time (in blocks of ``block_size``, lazily updating the rest) and spreads each column's error over the
columns not yet quantized, in proportion to the inverse Hessian (its upper Cholesky factor, after damping
the diagonal by ``damping`` x its mean). With ``act_order`` the columns with the largest ``diag(H)`` (the
inputs that carry the most energy) go first. Scales come from the spec's observer: per tensor or channel
from the original weight, per group from the weights as updated when the group is reached (from the
original weight with ``act_order``, so that groups stay contiguous in the stored layout).

``H`` is accumulated by the calibration taps over a replay (:func:`quantdiff.calibration.taps.
accumulate_second_moments`); layers are processed in batches whose ``K x K`` accumulators fit
``max_hessian_mib`` (a layer larger than that gets a replay of its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.calibration.taps import accumulate_second_moments
from quantdiff.errors import RecipeError
from quantdiff.nn.weights import QuantizedWeight
from quantdiff.observers import make_observer
from quantdiff.primitives import dequantize, pack_int4, quantize
from quantdiff.progress import Progress
from quantdiff.recipe import TensorSpec


def _observed(rows: Tensor, spec: TensorSpec) -> tuple[Tensor, Tensor]:
    """The spec's observer on ``rows`` ``(R, n)``: scale and zero point per row ``(R,)``."""
    observer = make_observer(spec.observer, spec.bits, spec.symmetric, **dict(spec.observer_options))
    observer.update(rows)
    return observer.qparams()


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: TensorSpec,
    *,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = False,
    overwrite_hessian: bool = False,
) -> QuantizedWeight:
    """GPTQ-rounded integer weight in quantdiff's stored layout (:mod:`quantdiff.nn.weights`).

    Args:
        weight: ``(C_out, K)`` floating-point weight (a convolution's reshaped, channel-major).
        hessian: ``(K, K)`` ``sum X^T X`` of the layer's input rows (any positive factor: it cancels).
        spec: the weight spec (bits, symmetric, per tensor / channel / group, observer).
        block_size: columns quantized before the lazy update of the rest.
        damping: fraction of ``mean(diag(H))`` added to the diagonal (numerical stability).
        act_order: quantize columns in order of decreasing ``diag(H)``.
        overwrite_hessian: factorize in ``hessian``'s own memory (a float64 tensor the caller no longer
            needs) instead of a copy: SD1.5's widest convolution (K = 2560 x 3 x 3) has a 4 GiB Hessian.
    """
    if spec.pair_safe:
        raise RecipeError("gptq: pair-safe weights are chosen by their own search; use plain int8 weights with gptq")
    w = weight.detach().to(torch.float32).clone()  # (C_out, K)
    c_out, k = w.shape
    h = hessian.detach().to(torch.float64, copy=not overwrite_hessian)  # (K, K)
    dead = torch.diag(h) == 0  # inputs that never fired: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    group = spec.group_size if spec.granularity == "group" else None
    groups = spec.scale_shape(c_out, k)[1]
    scale = torch.empty(c_out, groups)
    zero_point = torch.zeros(c_out, groups, dtype=torch.int32)
    if spec.granularity == "tensor":
        s, z = _observed(w.reshape(1, -1), spec)
        scale[:], zero_point[:] = s, z
    elif spec.granularity == "channel":
        scale[:, 0], zero_point[:, 0] = _observed(w, spec)
    elif act_order:  # static groups from the original weight
        for g in range(groups):
            scale[:, g], zero_point[:, g] = _observed(w[:, g * group : (g + 1) * group], spec)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    if act_order:
        w = w[:, order]
        h.copy_(h[order]).copy_(h[:, order])  # in place: one K x K temporary at a time
    h.diagonal().add_(damping * torch.diag(h).mean())
    u = _upper_cholesky_of_inverse_(h).to(torch.float32)  # (K, K)
    del h
    q = torch.empty(c_out, k, dtype=torch.int32)
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = w[:, start:stop].clone()  # (C_out, B)
        errors = torch.zeros_like(block)
        for i in range(stop - start):
            column = int(order[start + i])
            g = column // group if group else 0
            if group and not act_order and column % group == 0:  # a new group: its scale from the weights now
                head = block[:, i : i + group]  # (C_out, <= group)
                upcoming = torch.cat([head, w[:, stop : stop + group - head.shape[1]]], dim=1)
                scale[:, g], zero_point[:, g] = _observed(upcoming, spec)
            values = block[:, i]  # (C_out,)
            q_col = quantize(values, scale[:, g], zero_point[:, g], spec.bits, spec.symmetric)
            q[:, start + i] = q_col.to(torch.int32)
            error = (values - dequantize(q_col, scale[:, g], zero_point[:, g])) / u[start + i, start + i]
            block[:, i:] -= error[:, None] * u[start + i, start + i : stop][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ u[start:stop, stop:]
    q = q[:, torch.argsort(order)]  # back to the weight's column order
    q = q.to(torch.int8 if spec.symmetric else torch.uint8)
    if spec.packed:
        q = pack_int4(q)  # (C_out, ceil(K/2))
    rows = spec.scale_shape(c_out, k)[0]
    scale = scale[:rows].contiguous()
    return QuantizedWeight(q.contiguous(), scale, None if spec.symmetric else zero_point[:rows].contiguous())


def _upper_cholesky_of_inverse_(h: Tensor) -> Tensor:
    """The upper Cholesky factor of ``h^-1``, written over ``h`` (positive definite, float64).

    Each step's result is copied back into ``h`` so that at most two ``K x K`` matrices are alive at once,
    not the four of chaining the calls (a 4 GiB Hessian would need 16 GiB).
    """
    h.copy_(torch.linalg.cholesky(h))  # lower L, h = L L^T
    h.copy_(torch.cholesky_inverse(h))  # h^-1
    return h.copy_(torch.linalg.cholesky(h, upper=True))


@register_algorithm
@dataclass(frozen=True)
class GPTQ(AlgorithmConfig):
    """GPTQ weight rounding for every quantized layer (see the module docstring).

    Attributes:
        block_size: columns per lazy-update block (128 as in the paper).
        damping: diagonal damping, as a fraction of the mean of ``diag(H)``.
        act_order: quantize the columns with the largest input energy first.
        max_hessian_mib: memory for the ``K x K`` accumulators of one replay; layers beyond it wait for
            the next replay.
    """

    TYPE: ClassVar[str] = "gptq"
    STAGE: ClassVar[Stage] = Stage.WEIGHT_ROUNDING

    block_size: int = 128
    damping: float = 0.01
    act_order: bool = False
    max_hessian_mib: int = 2048

    def __post_init__(self) -> None:
        check_number("gptq.block_size", self.block_size, 1, integer=True)
        check_number("gptq.damping", self.damping, 0.0, 1.0, low_open=True)
        if not isinstance(self.act_order, bool):
            raise RecipeError(f"gptq.act_order={self.act_order!r} must be true or false")
        check_number("gptq.max_hessian_mib", self.max_hessian_mib, 1, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        calibration = context.calibration_for(self)
        layers = [layer for layer, module in context.layers() if not layer.weights.pair_safe]
        if len(layers) < len(context.plan.quantized):
            raise RecipeError("gptq: pair-safe weights are chosen by their own search; use plain int8 weights")
        batches, batch, used = [], [], 0
        for layer in layers:
            size = layer.reduction_size**2 * 8  # float64 accumulator
            if batch and used + size > self.max_hessian_mib * 2**20:
                batches.append(batch)
                batch, used = [], 0
            batch.append(layer)
            used += size
        if batch:
            batches.append(batch)
        with Progress(total=len(layers), desc="gptq", unit="layer", enabled=context.progress, leave=False) as bar:
            for number, batch in enumerate(batches):
                desc = f"gptq statistics {number + 1}/{len(batches)}"
                moments = accumulate_second_moments(
                    context.denoiser, [layer.name for layer in batch], calibration, progress=context.progress, desc=desc
                )
                for layer in batch:
                    if layer.name not in moments:
                        continue  # never ran: convert rounds it to nearest, observation reports it
                    weight = context.module(layer.name).weight.detach().reshape(layer.out_features, -1)
                    rounded = gptq_quantize(
                        weight,
                        moments.pop(layer.name).total,
                        layer.weights,
                        block_size=self.block_size,
                        damping=self.damping,
                        act_order=self.act_order,
                        overwrite_hessian=True,
                    )
                    context.round_weight(layer.name, rounded, by=self)
                    bar.update()
