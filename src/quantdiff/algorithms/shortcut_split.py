"""Shortcut-splitting (Q-Diffusion, section 2.2): one input scale per part of a concatenated input.

In a UNet's up blocks each resnet's input is ``cat([hidden, skip], dim=1)``: the deep feature and a skip
connection from the encoder, whose ranges differ widely (Q-Diffusion measured them bimodal). One per-tensor
scale must cover the larger of the two, wasting levels on the other. Here the layers that see the raw join
(each up resnet's ``conv_shortcut``; ``conv1`` sees it after GroupNorm, which aligns the halves; the split
points come from the architecture data, ``pipelines.architectures.concat_split_points``) get the
``input_split`` extra: one calibrated scale for channels ``[:at]`` and one for ``[at:]``. Weights keep their
per-output-channel scales. On the integer path the layer runs as two kernels, one per part, whose outputs
add up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, register_algorithm
from quantdiff.errors import RecipeError
from quantdiff.pipelines.architectures import concat_split_points


@register_algorithm
@dataclass(frozen=True)
class ShortcutSplit(AlgorithmConfig):
    """One input scale per part of the skip concatenations of a UNet (see the module docstring)."""

    TYPE: ClassVar[str] = "shortcut_split"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL
    NEEDS_CALIBRATION: ClassVar[bool] = False  # it changes the plan; observation then calibrates both parts

    def apply(self, context: QuantizationContext) -> None:
        splits = concat_split_points(context.denoiser, context.architecture)
        if not splits:
            raise RecipeError(
                f"algorithm 'shortcut_split' applies to UNets, whose up blocks concatenate skip connections: this "
                f"{context.architecture.title} has none; remove it from the recipe"
            )
        combined = []
        for name, at in splits.items():
            if name not in context.plan or not context.plan[name].static_input:
                continue  # kept in floating point, weight-only or dynamic: no stored input scale to split
            if "timestep_groups" in context.plan[name].extras:
                combined.append(name)
                continue
            context.add_extra(name, "input_split", {}, at=at)
        if combined:
            warnings.warn(
                f"shortcut_split: {len(combined)} layer(s) already have per-timestep input scales and keep them "
                f"unsplit (the two extras both replace the input scale), e.g. {combined[0]}",
                stacklevel=2,
            )
