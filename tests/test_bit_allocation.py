"""The integer program of the bit search against exhaustive search on small instances, its budgets, MixDQ's group
split, and the recipe it turns into (accepted by quantize, exact per-layer bits)."""

from __future__ import annotations

import itertools
import random

import pytest

from quantdiff.recipe import Recipe, load_recipe
from quantdiff.search.allocation import (
    AllocationError,
    Budget,
    allocate,
    damage_score,
    evaluate_choice,
    feasible,
    group_budgets,
    noise_score,
)
from quantdiff.search.mixed import SearchSettings, averages, build_budgets, layer_options, mixed_recipe, solve
from quantdiff.search.sensitivity import (
    CONTENT,
    INPUT,
    QUALITY,
    SQNR,
    SSIM,
    WEIGHT,
    Entry,
    LayerInfo,
    SensitivityResults,
    SensitivitySettings,
)


def _brute_force(scores, budgets):
    best = None
    for choice in itertools.product(*(range(len(row)) for row in scores)):
        candidate = evaluate_choice(scores, budgets, choice)
        if feasible(candidate, budgets) and (best is None or candidate.objective > best.objective + 1e-12):
            best = candidate
    return best


def _instance(rng: random.Random, layers: int):
    bits = [(2, 4), (2, 4, 8), (4, 8), (4, 8), (2, 4, 8)]
    options = [bits[i % len(bits)] for i in range(layers)]
    sizes = [rng.randint(1, 20) for _ in range(layers)]
    # more bits never hurt, with diminishing returns that differ per layer
    scores = [[-rng.uniform(0.5, 3.0) * 2.0 ** (-b) for b in opts] for opts in options]
    target = rng.uniform(3.0, 6.0)
    weights = Budget(
        "weight bits", [[b * s for b in opts] for opts, s in zip(options, sizes, strict=True)], target * sum(sizes)
    )
    # a second, independent budget on a subset (as a group budget is)
    half = set(range(0, layers, 2))
    group = Budget(
        "weight bits (even layers)",
        [[b * sizes[i] if i in half else 0.0 for b in opts] for i, opts in enumerate(options)],
        rng.uniform(3.5, 6.0) * sum(sizes[i] for i in half),
    )
    return scores, [weights, group]


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force_and_respects_budgets(seed):
    rng = random.Random(seed)
    scores, budgets = _instance(rng, layers=rng.randint(3, 7))
    expected = _brute_force(scores, budgets)
    if expected is None:
        with pytest.raises(AllocationError):
            allocate(scores, budgets)
        return
    result = allocate(scores, budgets)
    assert feasible(result, budgets)
    assert result.objective == pytest.approx(expected.objective, abs=1e-9)
    for budget in budgets:
        assert result.used[budget.name] <= budget.limit + 1e-6


def test_lower_bounds_and_fixed_layers():
    scores = [[0.0, 1.0], [0.0], [0.0, 2.0]]  # the middle layer has one option: fixed
    costs = [[1.0, 3.0], [5.0], [1.0, 3.0]]
    free = allocate(scores, [Budget("b", costs, 9.0)])
    assert free.choice == (0, 0, 1) and free.used["b"] == 9.0
    assert allocate(scores, [Budget("b", costs, 11.0)]).choice == (1, 0, 1)
    # a lower bound forces spending: the best of the choices that use at least 11 is both upgrades
    forced = allocate([[0.0, -1.0], [0.0], [0.0, -2.0]], [Budget("b", costs, 11.0, lower=11.0)])
    assert forced.choice == (1, 0, 1)


def test_infeasible_budget_says_what_the_cheapest_choice_takes():
    with pytest.raises(AllocationError, match=r"budget 'weights' of 3 cannot be met: its cheapest choice takes 4"):
        allocate([[0.0, 1.0], [0.0, 1.0]], [Budget("weights", [[2.0, 4.0], [2.0, 4.0]], 3.0)])


def test_group_split_keeps_the_weighted_average_at_the_target():
    for k in (0.46, 1.0, 1.36):
        content, quality = group_budgets(4.0, content_size=30.0, quality_size=70.0, k=k)
        assert content == pytest.approx(k * quality)
        assert (30 * content + 70 * quality) / 100 == pytest.approx(4.0)


def test_scores_order_damage():
    assert noise_score(40.0) > noise_score(20.0) > noise_score(5.0)
    assert noise_score(float("inf")) == 0.0 and noise_score(10.0) == pytest.approx(-0.1)
    assert damage_score(1.0) == 0.0 and damage_score(0.9) > damage_score(0.5)


# --------------------------------------------------------------------------- from sensitivities to a recipe
def _results() -> SensitivityResults:
    """Four layers: a quality layer that 4-bit weights hurt (20 dB) and one they barely touch (45 dB), a
    content layer fine at 2 bits and one that is not."""
    layers = [
        LayerInfo("a", QUALITY, 100, 50),
        LayerInfo("b", QUALITY, 100, 50),
        LayerInfo("c", CONTENT, 100, 50),
        LayerInfo("d", CONTENT, 100, 50),
        LayerInfo("conv_in", QUALITY, 10, 5, protected=True),
    ]
    values = {
        ("a", WEIGHT, 4, SQNR): 20.0,
        ("a", WEIGHT, 8, SQNR): 45.0,
        ("b", WEIGHT, 4, SQNR): 45.0,
        ("b", WEIGHT, 8, SQNR): 60.0,
        ("c", WEIGHT, 2, SSIM): 0.98,
        ("c", WEIGHT, 4, SSIM): 0.995,
        ("c", WEIGHT, 8, SSIM): 0.999,
        ("d", WEIGHT, 2, SSIM): 0.40,
        ("d", WEIGHT, 4, SSIM): 0.97,
        ("d", WEIGHT, 8, SSIM): 0.999,
    }
    for name, metric in (("a", SQNR), ("b", SQNR), ("c", SSIM), ("d", SSIM)):
        values[(name, INPUT, 8, metric)] = 40.0 if metric == SQNR else 0.999
        values[(name, INPUT, 4, metric)] = 15.0 if metric == SQNR else 0.9
    entries = {}
    for (name, kind, bits, metric), value in values.items():
        entry = Entry(name, kind, bits, metric, value)
        entries[entry.key] = entry
    return SensitivityResults(layers, entries)


def test_allocation_spends_bits_where_they_are_measured_to_matter():
    results = _results()
    settings = SearchSettings(weight_bits=6.1, input_bits=8.0)
    bits, _, used = solve(results, settings, 1.0, 1.0)
    # the sensitive quality layer takes 8 bits, paid by the other; the content layer that 2 bits ruin keeps 8,
    # the robust one gives up half
    assert bits == {"a": (8, 8), "b": (4, 8), "c": (4, 8), "d": (8, 8), "conv_in": (8, 8)}
    # less for the content group (k < 1): the robust content layer goes down to 2 bits, the other stays at 8
    assert solve(results, settings, 0.85, 1.0)[0]["c"] == (2, 8)
    options = [layer_options(layer, settings) for layer in results.layers]
    for budget in build_budgets(results.layers, options, settings, 1.0, 1.0):
        assert used[budget.name] <= budget.limit + 1e-6
    assert averages(results.layers, bits)["weight_bits"] <= 6.1 + 1e-9


def test_recipe_has_exact_entries_and_loads(tmp_path):
    import yaml

    results = _results()
    settings = SearchSettings(weight_bits=5.0, input_candidates=(4, 8, 16), bos_aware=True, name="mixed-test")
    bits = {"a": (8, 16), "b": (4, 8), "c": (2, 4), "d": (8, 8), "conv_in": (8, 8)}
    recipe = mixed_recipe(bits, results.layers, SensitivitySettings(), settings)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    loaded = load_recipe(path)
    assert isinstance(loaded, Recipe) and loaded.to_dict() == recipe.to_dict()
    assert [a.TYPE for a in loaded.algorithms] == ["bos_aware"]
    for name, (w, a) in bits.items():
        weights, activations = loaded.specs_for(loaded.layers[name])
        assert weights.bits == w and weights.granularity == "channel" and weights.symmetric
        assert (activations is None) if a == 16 else (activations.bits == a)
