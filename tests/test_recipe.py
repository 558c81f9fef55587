"""Recipes: presets, file formats, validation messages."""

from __future__ import annotations

import dataclasses
import json

import pytest

from quantdiff.errors import RecipeError
from quantdiff.recipe import PRESETS, LayerOverride, Recipe, TensorSpec, load_recipe


def test_presets_have_the_documented_bits():
    labels = {name: recipe.label for name, recipe in PRESETS.items()}
    assert labels == {
        "w8a8": "W8A8",
        "w8a8-minmax": "W8A8",
        "w8a8-int": "W8A8",
        "w8a6": "W8A6",
        "w8a6-minmax": "W8A6",
        "w8a4": "W8A4",
        "w8a4-minmax": "W8A4",
        "w4a8": "W4A8",
        "w4a8-minmax": "W4A8",
        "w4a6": "W4A6",
        "w4a6-minmax": "W4A6",
        "w4a4": "W4A4",
        "w4a4-minmax": "W4A4",
        "w3a8": "W3A8",
        "w2a8": "W2A8",
        "w8a16": "W8A16",
        "w4a16": "W4A16",
    }
    for name in ("w8a6", "w8a4", "w4a6", "w4a4"):  # the best measured recipes below 8-bit activations
        spec = PRESETS[name].activations
        assert spec.dynamic and spec.granularity == ("group" if spec.bits == 4 else "token")
        twin = PRESETS[f"{name}-minmax"]  # ... and their naive twins: min-max, static, no algorithms
        assert twin.label == PRESETS[name].label and not twin.algorithms and twin.activations.observer == "minmax"
        assert twin.weights.observer == "minmax" and not twin.activations.dynamic
    assert [a.TYPE for a in PRESETS["w4a4"].algorithms] == ["smoothquant", "rotation", "gptq"]
    assert [a.TYPE for a in PRESETS["w8a4"].algorithms] == ["smoothquant", "clip_search"]
    assert PRESETS["w8a4"].activations.group_size == 16 and PRESETS["w4a4"].activations.clip_ratio == 0.9
    assert [a.TYPE for a in PRESETS["w2a8"].algorithms] == ["adaround"] and PRESETS["w2a8"].weights.group_size == 64
    assert PRESETS["w8a8-int"].weights.pair_safe and not PRESETS["w8a8"].weights.pair_safe
    assert PRESETS["w4a16"].weights.granularity == "group" and PRESETS["w4a16"].weights.group_size == 128
    assert PRESETS["w8a16"].activations is None
    assert PRESETS["w8a8-minmax"].activations.observer == "minmax"


@pytest.mark.parametrize("name", list(PRESETS))
def test_recipe_dict_round_trip_is_exact(name):
    recipe = PRESETS[name]
    data = json.loads(json.dumps(recipe.to_dict()))
    # the lowest format version that expresses the recipe: 4 for per-token groups of inputs, 3 for algorithms and
    # dynamic inputs, 2 for pair-safe weights
    dynamic = recipe.activations is not None and recipe.activations.dynamic
    grouped = dynamic and recipe.activations.granularity == "group"
    expected = 4 if grouped else 3 if recipe.algorithms or dynamic else 2 if recipe.weights.pair_safe else 1
    assert data["_type"] == "Recipe" and data["_version"] == expected
    assert Recipe.from_dict(data) == recipe


def test_recipe_files_json_and_yaml(tmp_path):
    text = """
name: mine
weights: {bits: 6, symmetric: true, granularity: group, group_size: 64, observer: mse, observer_options: {p: 2.0}}
activations: {bits: 8, symmetric: false, granularity: tensor, observer: percentile, observer_options: {percentile: 99.9}}
ignore: ["*.attn2.to_k"]
overrides:
  - {pattern: "down_blocks.0.*", weights: {bits: 8, granularity: channel, group_size: null}}
  - {pattern: "up_blocks.*.proj_out", activations: null}
"""
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.weights == TensorSpec(6, True, "group", 64, "mse", {"p": 2.0})
    assert recipe.label == "W6A8"
    searched = dataclasses.replace(recipe, layers={"conv_in": LayerOverride("conv_in", weights={"bits": 2})})
    assert searched.label == "mixed (base W6A8)"  # bits differ per layer: the base format alone would mislead
    assert recipe.specs_for(recipe.overrides[0])[0].bits == 8
    assert recipe.specs_for(recipe.overrides[1])[1] is None
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(tmp_path / "r.json") == recipe


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 9}, "bits=9 is out of range: use an integer from 2 to 8"),
        ({"bits": 1}, "bits=1 is out of range"),
        ({"granularity": "row"}, "granularity='row' is unknown"),
        ({"granularity": "group"}, "granularity 'group' needs group_size"),
        ({"group_size": 64}, "group_size=64 only applies to granularity 'group'"),
        ({"observer": "magic"}, "observer='magic' is unknown"),
        ({"observer_options": {"percentile": 99.0}}, "observer 'minmax' rejects its options"),
    ],
)
def test_impossible_tensor_specs_say_what_to_change(change, message):
    data = {**PRESETS["w8a8"].weights.to_dict(), **change}
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TensorSpec.from_dict(data)


def test_unknown_keys_are_named():
    data = PRESETS["w8a8"].to_dict()
    data["weight_bits"] = 4
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['weight_bits'\]"):
        Recipe.from_dict(data)
    data = PRESETS["w8a8"].to_dict()
    data["weights"]["nbits"] = 4
    with pytest.raises(RecipeError, match=r"weights: unknown key\(s\) \['nbits'\]"):
        Recipe.from_dict(data)


def test_activations_are_per_tensor_or_dynamic_per_token():
    with pytest.raises(RecipeError, match="granularity 'channel' is not supported"):
        Recipe("x", weights=PRESETS["w8a8"].weights, activations=TensorSpec(8, False, "channel"))
    with pytest.raises(RecipeError, match="set dynamic true"):
        TensorSpec(8, False, "token")
    with pytest.raises(RecipeError, match="activation options"):
        Recipe("x", weights=TensorSpec(8, True, "token", dynamic=True), activations=PRESETS["w8a8"].activations)
    token = Recipe("x", weights=PRESETS["w8a8"].weights, activations=TensorSpec(8, False, "token", dynamic=True))
    assert not token.needs_calibration  # dynamic inputs have nothing to observe


def test_newer_recipe_version_is_refused():
    data = PRESETS["w8a8"].to_dict()
    data["_version"] = 99
    with pytest.raises(RecipeError, match="newer than this quantdiff understands"):
        Recipe.from_dict(data)


def test_unknown_recipe_names_the_presets(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'w3a3': use a preset"):
        load_recipe("w3a3")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")


def test_override_with_bad_field_fails_at_construction():
    with pytest.raises(RecipeError, match=r"unknown weights field\(s\) \['nbits'\]"):
        LayerOverride("x", weights={"nbits": 4})
    with pytest.raises(RecipeError, match="out of range"):
        Recipe(
            "x",
            PRESETS["w8a8"].weights,
            PRESETS["w8a8"].activations,
            overrides=(LayerOverride("x", weights={"bits": 12}),),
        )
