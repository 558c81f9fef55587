"""MixDQ's mixed-precision search end to end: sensitivity -> integer programs -> a recipe with exact per-layer bits.

1. :func:`~quantdiff.search.sensitivity.measure_sensitivity` (cached, resumable, shardable);
2. per layer, the options ``(weight bits, input bits)``: content layers take weights from
   ``content_weight_bits`` (MixDQ: 2, 4, 8), quality layers from ``quality_weight_bits`` (4, 8), inputs from
   ``input_candidates`` (4, 8; 16 keeps an input in float); protected layers (architecture data) are fixed at
   8 / 8. An option's score is the sum of its weight's and its input's measured score, mapped by the
   objective (:func:`~quantdiff.search.allocation.noise_score` / ``damage_score``, or MixDQ's raw SQNR / SSIM);
3. the budgets: the parameter-weighted average weight bits (nominal bits, or the bits stored: 2- and 3-bit
   weights are stored as 4-bit nibbles) and the input-size-weighted average input bits, each split between
   the content and quality groups by MixDQ's ``k`` (:func:`~quantdiff.search.allocation.group_budgets`), so
   SSIM and SQNR scores are never traded against each other;
4. weights first: one integer program per ``k`` in ``weight_ks``; the distinct allocations are scored end to
   end (all layers quantized at once, images on the search's seeds, mean SSIM against float) and the best
   is kept; then the inputs the same way over ``input_ks`` with those weights fixed (MixDQ, phase 4);
5. the recipe: the base specs with one exact ``layers`` entry per searched layer, and ``bos_aware`` first
   among its algorithms when BOS-aware quantization is on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantdiff.errors import QuantDiffError
from quantdiff.recipe import LayerOverride, Recipe, TensorSpec
from quantdiff.search.allocation import (
    AllocationError,
    Budget,
    allocate,
    damage_score,
    group_budgets,
    noise_score,
)
from quantdiff.search.sensitivity import (
    CONTENT,
    FLOAT_BITS,
    INPUT,
    QUALITY,
    SQNR,
    SSIM,
    WEIGHT,
    LayerInfo,
    SensitivityHarness,
    SensitivityResults,
    SensitivitySettings,
    metric_of,
)

# MixDQ's sweeps of the content / quality split (integer_programming.py): weights over linspace(0.46, 1.36, 10);
# inputs over linspace(0.94, 1.09, 20), of which every fourth here (the spread is narrow).
# 1.0 (both groups at the target) is added to both.
WEIGHT_KS = tuple(sorted({1.0, *(round(float(k), 4) for k in np.linspace(0.46, 1.36, 10))}))
INPUT_KS = tuple(sorted({1.0, *(round(float(k), 4) for k in np.linspace(0.94, 1.09, 20)[::4])}))
PROTECTED_BITS = (8, 8)
COSTS = ("nominal", "stored")
OBJECTIVES = ("noise", "mixdq")


@dataclass(frozen=True)
class SearchSettings:
    """The budgets and the options (see the module docstring).

    Attributes:
        weight_bits: target average weight bits, weighted by parameters.
        input_bits: target average input bits, weighted by input size.
        content_weight_bits, quality_weight_bits, input_candidates: the options of each group.
        weight_ks, input_ks: MixDQ's sweeps of the split between the groups (``k``: content / quality bits).
        cost: ``"nominal"`` (bits x parameters, MixDQ) or ``"stored"`` (the bits the folder stores).
        objective: ``"noise"`` (sums of noise ratios / SSIM damage) or ``"mixdq"`` (sums of dB / SSIM).
        decoupled: score content layers by SSIM (MixDQ); ``False``: every layer by SQNR, one group.
        bos_aware: add ``bos_aware`` to the recipe (the sensitivity must have been measured with it).
        name: the recipe's name.
    """

    weight_bits: float
    input_bits: float = 8.0
    content_weight_bits: tuple[int, ...] = (2, 4, 8)
    quality_weight_bits: tuple[int, ...] = (4, 8)
    input_candidates: tuple[int, ...] = (4, 8)
    weight_ks: tuple[float, ...] = WEIGHT_KS
    input_ks: tuple[float, ...] = INPUT_KS
    cost: str = "nominal"
    objective: str = "noise"
    decoupled: bool = True
    bos_aware: bool = False
    name: str = "mixed"

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise QuantDiffError(f"cost {self.cost!r} is unknown: use one of {', '.join(COSTS)}")
        if self.objective not in OBJECTIVES:
            raise QuantDiffError(f"objective {self.objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
        if not 2 <= self.weight_bits <= 8 or not 2 <= self.input_bits <= FLOAT_BITS:
            raise QuantDiffError(
                f"weight bits {self.weight_bits} / input bits {self.input_bits}: use averages in 2..8 and 2..{FLOAT_BITS}"
            )


@dataclass(frozen=True)
class Candidate:
    """One allocation the integer programs produced: its split, budgets, bits per layer and end-to-end score."""

    phase: str
    k: float
    bits: Mapping[str, tuple[int, int]]
    objective: float
    budgets: Mapping[str, float]
    ssim: float | None = None
    alignment: float | None = None
    note: str = ""


@dataclass
class SearchResult:
    """What :func:`search_bits` found: the recipe, the chosen bits, every candidate and the timings."""

    recipe: Recipe
    bits: dict[str, tuple[int, int]]
    layers: list[LayerInfo]
    candidates: list[Candidate]
    averages: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def stored_bits(bits: int) -> int:
    """Bits a weight of ``bits`` takes in a quantized folder: 2- to 4-bit values are packed two per byte."""
    return 4 if TensorSpec(bits, True, "channel").packed else 8


def _weight_cost(bits: int, cost: str) -> int:
    return bits if cost == "nominal" else stored_bits(bits)


def layer_options(layer: LayerInfo, settings: SearchSettings, fixed_weight: int | None = None) -> list[tuple[int, int]]:
    """The ``(weight bits, input bits)`` options of ``layer`` (one, fixed, where it is protected)."""
    if layer.protected:
        return [PROTECTED_BITS]
    group = layer.group if settings.decoupled else QUALITY
    weights = settings.content_weight_bits if group == CONTENT else settings.quality_weight_bits
    if fixed_weight is not None:
        weights = (fixed_weight,)
    return list(itertools.product(weights, settings.input_candidates))


def option_score(
    results: SensitivityResults, layer: LayerInfo, option: tuple[int, int], settings: SearchSettings
) -> float:
    """The score of ``option`` for ``layer``: its weight's measured score plus its input's."""
    if layer.protected:
        return 0.0
    metric = metric_of(layer, settings.decoupled)
    total = 0.0
    for kind, bits in ((WEIGHT, option[0]), (INPUT, option[1])):
        if kind == INPUT and bits == FLOAT_BITS:
            value = math.inf if metric == SQNR else 1.0
        else:
            entry = results.value(layer.name, kind, bits, metric)
            if entry is None:
                raise QuantDiffError(
                    f"no {metric} sensitivity of {layer.name} ({kind} {bits}-bit) was measured: run the sensitivity "
                    "measurement with these candidates (every shard) first"
                )
            value = entry.value
        total += _score(value, metric, settings.objective)
    return total


def _score(value: float, metric: str, objective: str) -> float:
    if objective == "noise":
        return noise_score(value) if metric == SQNR else damage_score(value)
    if metric == SQNR:  # MixDQ sums dB; an exact (float) option gets a large finite value
        return min(value, 200.0) if not math.isnan(value) else -200.0
    return value


def _groups(layers: Sequence[LayerInfo], settings: SearchSettings) -> dict[str, list[int]]:
    if not settings.decoupled:
        return {QUALITY: list(range(len(layers)))}
    groups: dict[str, list[int]] = {CONTENT: [], QUALITY: []}
    for index, layer in enumerate(layers):
        groups[layer.group].append(index)
    return {group: members for group, members in groups.items() if members}


def _split(target: float, groups: Mapping[str, list[int]], sizes: Sequence[float], k: float) -> dict[str, float]:
    """Each group's average budget for ``target`` and split ``k`` (one group: the target itself)."""
    if set(groups) != {CONTENT, QUALITY}:
        return dict.fromkeys(groups, target)
    content = sum(sizes[i] for i in groups[CONTENT])
    quality = sum(sizes[i] for i in groups[QUALITY])
    b_content, b_quality = group_budgets(target, content, quality, k)
    return {CONTENT: b_content, QUALITY: b_quality}


def build_budgets(
    layers: Sequence[LayerInfo],
    options: Sequence[Sequence[tuple[int, int]]],
    settings: SearchSettings,
    k_weight: float,
    k_input: float,
) -> list[Budget]:
    """The weight and input budgets of each group for splits ``k_weight`` / ``k_input``."""
    groups = _groups(layers, settings)
    params = [float(layer.params) for layer in layers]
    inputs = [float(max(layer.input_size, 1)) for layer in layers]
    budgets = []
    for kind, sizes, target, k in (
        ("weight", params, settings.weight_bits, k_weight),
        ("input", inputs, settings.input_bits, k_input),
    ):
        targets = _split(target, groups, sizes, k)
        for group, members in groups.items():
            member_set = set(members)
            costs = [
                [
                    (_weight_cost(w, settings.cost) if kind == "weight" else a) * sizes[i] if i in member_set else 0.0
                    for w, a in options[i]
                ]
                for i in range(len(layers))
            ]
            total = sum(sizes[i] for i in members)
            budgets.append(Budget(f"{kind} bits ({group})", costs, targets[group] * total))
    return budgets


def averages(layers: Sequence[LayerInfo], bits: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Parameter-weighted average weight bits (nominal and stored) and input-size-weighted input bits."""
    params = sum(layer.params for layer in layers)
    inputs = sum(max(layer.input_size, 1) for layer in layers)
    return {
        "weight_bits": sum(bits[layer.name][0] * layer.params for layer in layers) / params,
        "weight_bits_stored": sum(stored_bits(bits[layer.name][0]) * layer.params for layer in layers) / params,
        "input_bits": sum(bits[layer.name][1] * max(layer.input_size, 1) for layer in layers) / inputs,
    }


def solve(
    results: SensitivityResults,
    settings: SearchSettings,
    k_weight: float,
    k_input: float,
    fixed_weights: Mapping[str, int] | None = None,
) -> tuple[dict[str, tuple[int, int]], float, dict[str, float]]:
    """One integer program: the bits per layer, the objective, and each budget's use."""
    layers = results.layers
    options = [layer_options(layer, settings, (fixed_weights or {}).get(layer.name)) for layer in layers]
    scores = [
        [option_score(results, layer, option, settings) for option in opts]
        for layer, opts in zip(layers, options, strict=True)
    ]
    budgets = build_budgets(layers, options, settings, k_weight, k_input)
    allocation = allocate(scores, budgets)
    bits = {layer.name: options[i][o] for i, (layer, o) in enumerate(zip(layers, allocation.choice, strict=True))}
    return bits, allocation.objective, allocation.used


def search_bits(
    results: SensitivityResults,
    settings: SearchSettings,
    harness: SensitivityHarness | None = None,
    *,
    base: SensitivitySettings,
) -> SearchResult:
    """Steps 2-5 of the module docstring on measured ``results``; ``harness`` scores candidates end to end
    (without one, the candidate with the best objective is kept, and ``notes`` says so)."""
    started = time.perf_counter()
    candidates: list[Candidate] = []
    notes: list[str] = []
    # One group, or a target at the widest option (every layer can have it): nothing to split.
    widest_weight = max((*settings.content_weight_bits, *settings.quality_weight_bits))
    split_weights = settings.decoupled and settings.weight_bits < widest_weight
    split_inputs = settings.decoupled and settings.input_bits < max(settings.input_candidates)
    weight_ks = settings.weight_ks if split_weights else (1.0,)
    input_ks = settings.input_ks if split_inputs else (1.0,)
    middle_input_k = 1.0
    chosen, scored_seconds = _phase(
        "weights",
        results,
        settings,
        weight_ks,
        lambda k: solve(results, settings, k, middle_input_k),
        harness,
        candidates,
        notes,
    )
    fixed = {name: bits[0] for name, bits in chosen.bits.items()}
    chosen, more_seconds = _phase(
        "inputs",
        results,
        settings,
        input_ks,
        lambda k: solve(results, settings, chosen.k, k, fixed),
        harness,
        candidates,
        notes,
    )
    recipe = mixed_recipe(chosen.bits, results.layers, base, settings)
    result = SearchResult(
        recipe, dict(chosen.bits), results.layers, candidates, averages(results.layers, chosen.bits), notes=notes
    )
    result.seconds = {
        "allocation": round(time.perf_counter() - started - scored_seconds - more_seconds, 2),
        "selection": round(scored_seconds + more_seconds, 2),
    }
    return result


def _phase(phase, results, settings, ks, solve_k, harness, candidates, notes) -> tuple[Candidate, float]:
    """Solve for every ``k``; score the distinct allocations end to end; return the best and the scoring time."""
    found: list[Candidate] = []
    for k in ks:
        try:
            bits, objective, used = solve_k(k)
        except AllocationError as error:
            notes.append(f"{phase}: k={k:g} skipped: {error}")
            continue
        if any(bits == other.bits for other in found):
            continue
        found.append(Candidate(phase, k, bits, objective, used))
    if not found:
        raise QuantDiffError(f"no {phase} allocation fits the budgets: {'; '.join(notes[-3:])}")
    seconds = 0.0
    if len(found) > 1 and harness is not None:
        started = time.perf_counter()
        scored = []
        for candidate in found:
            ssim, alignment = evaluate_allocation(harness, candidate.bits)
            scored.append(_replace(candidate, ssim=ssim, alignment=alignment))
        found = scored
        seconds = time.perf_counter() - started
        best = max(found, key=lambda c: (c.ssim, c.objective))
    else:
        best = max(found, key=lambda c: c.objective)
        if len(found) > 1:
            notes.append(f"{phase}: {len(found)} candidates, no end-to-end scoring: the best objective is kept")
    candidates += [_replace(c, note="chosen" if c is best else "") for c in found]
    return best, seconds


def _replace(candidate: Candidate, **changes: Any) -> Candidate:
    return dataclasses.replace(candidate, **changes)


def evaluate_allocation(harness: SensitivityHarness, bits: Mapping[str, tuple[int, int]]) -> tuple[float, float | None]:
    """Mean SSIM against float (and alignment) of images with every layer quantized at ``bits`` at once."""
    harness.references(SSIM)
    stand_ins = {name: harness.stand_in(name, w, a) for name, (w, a) in bits.items()}
    with harness.swapped(stand_ins):
        return harness.image_scores()


def mixed_recipe(
    bits: Mapping[str, tuple[int, int]],
    layers: Sequence[LayerInfo],
    base: SensitivitySettings,
    settings: SearchSettings,
) -> Recipe:
    """The recipe: ``base``'s specs, one exact entry per searched layer, ``bos_aware`` when on."""
    from quantdiff.algorithms.bos_aware import BOSAwareKV

    entries = {}
    for layer in layers:
        w, a = bits[layer.name]
        activations = None if a == FLOAT_BITS else {"bits": a}
        entries[layer.name] = LayerOverride(layer.name, weights={"bits": w}, activations=activations)
    return Recipe(
        settings.name,
        _bits(base.weights, 8),
        _bits(base.activations, 8),
        layers=entries,
        algorithms=(BOSAwareKV(),) if settings.bos_aware else (),
    )


def _bits(spec: TensorSpec, bits: int) -> TensorSpec:
    return dataclasses.replace(spec, bits=bits)
