"""Per-timestep activation ranges: one static input scale per group of denoising timesteps.

Activation ranges drift with the timestep (Q-Diffusion, TFMQ-DM's finite-set calibration, TDQ, ViDiT-Q's
time ranges): early, noisy steps and late, detailed ones see different input distributions, and one
calibrated scale per layer has to cover both. Here the timesteps of the calibration set are split into
``groups`` groups of (nearly) equal size, adjacent in time; each quantized layer with static inputs gets
the ``timestep_groups`` extra (its ``input_scale`` becomes a table, one entry per group, plus the group
edges), observation keeps one observer per group (``quantize.observe_inputs``), and at inference the layer
takes the scale of the group of the denoiser's current timestep (read by the step clock, so any scheduler
and step count works). A timestep between two calibrated groups goes to the nearer group's side of the
midpoint edge; one outside the calibrated range takes the first or last group.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.errors import CalibrationError


def group_edges(timesteps: Sequence[float], groups: int) -> list[float]:
    """Ascending edges that split the distinct ``timesteps`` into ``groups`` runs of (nearly) equal length.

    Each edge is the midpoint between the last timestep of one group and the first of the next, so a
    timestep ``t`` belongs to group ``g`` when ``edges[g-1] <= t < edges[g]`` (``bisect_right``).

    Raises:
        ValueError: fewer distinct timesteps than groups.
    """
    distinct = sorted(set(float(t) for t in timesteps))
    if len(distinct) < groups:
        raise ValueError(f"{groups} timestep groups need at least {groups} distinct timesteps, got {len(distinct)}")
    bounds = [round(i * len(distinct) / groups) for i in range(groups + 1)]  # start index of each group
    return [(distinct[bounds[g] - 1] + distinct[bounds[g]]) / 2 for g in range(1, groups)]


@register_algorithm
@dataclass(frozen=True)
class TimestepGroups(AlgorithmConfig):
    """Static input scales per group of timesteps (see the module docstring).

    Attributes:
        groups: number of timestep groups; 1 is one scale per layer (plain static quantization).
    """

    TYPE: ClassVar[str] = "timestep_groups"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL

    groups: int = 4

    def __post_init__(self) -> None:
        check_number("timestep_groups.groups", self.groups, 1, 64, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        if self.groups == 1:
            return
        calibration = context.calibration_for(self)
        try:
            edges = group_edges([record.timestep for record in calibration], self.groups)
        except ValueError as error:
            raise CalibrationError(
                f"timestep_groups: {error} in the calibration data: record more timesteps per prompt "
                "(`quantdiff calibrate --num-timesteps`) or use fewer groups"
            ) from None
        edge_tensor = torch.tensor(edges, dtype=torch.float32)  # (G-1,)
        split = []
        for layer, _ in context.layers():
            if not layer.static_input:
                continue  # dynamic inputs follow every timestep already; weight-only ones have no input scale
            if "input_split" in layer.extras:
                split.append(layer.name)
                continue
            context.add_extra(layer.name, "timestep_groups", {"timestep_edges": edge_tensor}, groups=self.groups)
        if split:
            warnings.warn(
                f"timestep_groups: {len(split)} layer(s) with a split input keep one scale per part for every "
                f"timestep (the two extras both replace the input scale), e.g. {split[0]}",
                stacklevel=2,
            )
