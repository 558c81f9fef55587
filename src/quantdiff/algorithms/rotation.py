"""Hadamard input rotation (QuaRot, Ashkboos et al. 2024; the rotation half of ViDiT-Q's channel balancing).

For an orthogonal ``H``, ``W x = (W H)(H^T x)``: the layer keeps ``W H`` (quantized as usual) and rotates every
input token (a convolution: every pixel) by ``H^T`` before quantizing it. A token whose energy sits in a few
loud channels comes out with it spread over all channels of the block, so one range per token (or per group)
fits the rest of the token far better: QuaRot made 4-bit LLM inputs work this way, and ViDiT-Q rotates the
timestep-varying part of DiT activations after scaling away the static part (SmoothQuant-style).

``H`` is block diagonal: a normalized Sylvester Hadamard matrix (symmetric, so ``H^T = H``) on each run of ``b``
input channels, ``b`` the largest power of two dividing ``C_in`` (64 for 320 channels, 256 for 1280, all of
them for 32 or 64). It costs ``b`` multiply-adds per input value and nothing is stored: the layer's
``input_rotation`` extra holds ``b`` and rebuilds ``H``. Where rotation stands among the other float-model
algorithms: after ``smoothquant`` (scaling first, then the scaled input is rotated), before ``lowrank`` (the
branch is split from the rotated weight). Layers whose input is split in two parts (``shortcut_split``) keep
their input unrotated: rotation would mix the parts that get separate scales.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.errors import RecipeError
from quantdiff.primitives import rotate_channels


def rotation_block(channels: int) -> int:
    """The Hadamard block size for ``channels`` input channels: the largest power of two that divides it."""
    return channels & -channels


@register_algorithm
@dataclass(frozen=True)
class Rotation(AlgorithmConfig):
    """Rotate each quantized layer's input channels by a block Hadamard matrix (see the module docstring).

    Attributes:
        min_block: layers whose block would be smaller (e.g. 4 latent channels, or an odd width) keep their
            input unrotated: a few channels have little to spread over.
    """

    TYPE: ClassVar[str] = "rotation"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL
    NEEDS_CALIBRATION: ClassVar[bool] = False

    min_block: int = 16

    def __post_init__(self) -> None:
        check_number("rotation.min_block", self.min_block, 2, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        skipped: dict[str, list[str]] = {}
        for layer, module in context.layers():
            if "lowrank" in layer.extras:
                raise RecipeError(
                    "algorithm 'rotation' runs after 'lowrank' in this recipe: list 'rotation' first, so that the "
                    "low-rank branch is split from the rotated weight"
                )
            block = rotation_block(layer.weight_shape[1] * getattr(module, "groups", 1))
            reason = None
            if getattr(module, "groups", 1) != 1:
                reason = "grouped convolution (a rotation would mix its groups)"
            elif "input_split" in layer.extras:
                reason = "input split in two parts by shortcut_split (a rotation would mix them)"
            elif block < self.min_block:
                reason = f"blocks of fewer than min_block={self.min_block} channels"
            if reason is not None:
                skipped.setdefault(reason, []).append(layer.name)
                continue
            with torch.no_grad():  # W -> W H along the input channels: the output is unchanged
                context.replace_tensor(module, "weight", rotate_channels(module.weight, 1, block))
            context.add_extra(layer.name, "input_rotation", {}, block=block)
        for reason, names in skipped.items():
            warnings.warn(
                f"rotation: {len(names)} layer(s) keep their input unrotated: {reason}, e.g. {names[0]}",
                stacklevel=2,
            )
