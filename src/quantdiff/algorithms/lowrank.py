"""Low-rank branch (SVDQuant, Li et al. 2024): ``W = L_up L_down + R``, the branch in 16 bits, ``R`` quantized.

After smoothing has moved activation outliers into the weights, those weights have a few large singular
directions that a 4-bit grid cannot represent. SVDQuant keeps the top ``rank`` singular directions of the
(smoothed) weight as a small floating-point branch and quantizes only the residual ``R``, whose range is
much narrower. Here the branch is the layer's ``lowrank`` extra: ``lowrank_down`` ``(r, C_in[, kh, kw])``
(a convolution with the layer's own geometry) and ``lowrank_up`` ``(C_out, r)``, stored in ``dtype``; it
computes on the layer's (pre-scaled) floating-point input and adds to the quantized output. The residual is
taken against the stored, rounded factors, so before quantization the layer computes what it computed
before up to float rounding. List it after ``smoothquant`` in a recipe (both run in the float-model stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.errors import RecipeError

BRANCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lowrank_split(weight: Tensor, rank: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """``(up, down, residual)`` with ``up @ down + residual == weight`` (residual against the rounded factors).

    Args:
        weight: ``(C_out, K)`` floating-point weight.
        rank: directions kept in the branch.
        dtype: storage dtype of the factors.

    Returns:
        ``up`` ``(C_out, r)`` and ``down`` ``(r, K)`` in ``dtype`` (the singular values split evenly between
        them), and the float32 residual ``(C_out, K)``.
    """
    w = weight.detach().to(torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (C_out, m), (m,), (m, K)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(dtype)  # (C_out, r)
    down = (root[:, None] * vh[:rank]).to(dtype)  # (r, K)
    residual = w - up.float() @ down.float()
    return up, down, residual


@register_algorithm
@dataclass(frozen=True)
class LowRank(AlgorithmConfig):
    """A floating-point low-rank branch per quantized layer (see the module docstring).

    Attributes:
        rank: directions kept per layer (capped at a quarter of the layer's smaller dimension).
        dtype: storage dtype of the branch: ``float16`` (SVDQuant's 16 bits), ``bfloat16`` or ``float32``.
    """

    TYPE: ClassVar[str] = "lowrank"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL
    NEEDS_CALIBRATION: ClassVar[bool] = False

    rank: int = 16
    dtype: str = "float16"

    def __post_init__(self) -> None:
        check_number("lowrank.rank", self.rank, 1, integer=True)
        if self.dtype not in BRANCH_DTYPES:
            raise RecipeError(f"lowrank.dtype={self.dtype!r} is unknown: use one of {', '.join(BRANCH_DTYPES)}")

    def apply(self, context: QuantizationContext) -> None:
        for layer, module in context.layers():
            if getattr(module, "groups", 1) != 1:
                continue  # a grouped convolution's weight is not one matrix
            c_out, k = layer.out_features, layer.reduction_size
            rank = min(self.rank, max(1, min(c_out, k) // 4))
            up, down, residual = lowrank_split(module.weight.reshape(c_out, k), rank, BRANCH_DTYPES[self.dtype])
            context.replace_tensor(module, "weight", residual.reshape(module.weight.shape))
            tensors = {"lowrank_down": down.reshape(rank, *layer.weight_shape[1:]), "lowrank_up": up}
            context.add_extra(layer.name, "lowrank", tensors, rank=rank, dtype=self.dtype)
