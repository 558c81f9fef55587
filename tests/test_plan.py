"""Plan resolution: every Linear/Conv2d is a candidate; rules apply in the documented order."""

from __future__ import annotations

import json

import pytest
from torch import nn

from quantdiff.errors import RecipeError
from quantdiff.pipelines.architectures import ARCHITECTURES, architecture_of
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.plan import QuantPlan, resolve_plan
from quantdiff.recipe import PRESETS, LayerOverride, Recipe


@pytest.fixture(scope="module")
def unet(tiny_folders):
    return denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]


def test_architecture_detection(tiny_folders):
    expected = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3", "pixart": "pixart"}
    for arch, folder in tiny_folders.items():
        assert architecture_of(denoiser_of(load_pipeline(folder))[1]).name == expected[arch]


def test_every_linear_and_conv_is_planned(unet):
    plan = resolve_plan(unet, PRESETS["w8a8"], ARCHITECTURES["sd15"])
    candidates = [name for name, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert [layer.name for layer in plan] == candidates
    assert any(layer.layer_type == "Conv2d" and layer.quantized for layer in plan)
    skipped = {layer.name for layer in plan if not layer.quantized}
    assert skipped == {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    assert plan["conv_in"].reason.startswith("default ignore: first layer")


def test_rule_order_override_then_ignore_then_default(unet):
    recipe = Recipe(
        "custom",
        PRESETS["w8a8"].weights,
        PRESETS["w8a8"].activations,
        ignore=("*.attn2.*",),
        overrides=(
            LayerOverride("conv_in", weights={"bits": 6}),  # beats the default ignore list
            LayerOverride(
                "*.attn2.to_q", weights={"bits": 4, "granularity": "group", "group_size": 64}
            ),  # beats ignore
            LayerOverride("*.ff.net.2", activations=None),
            LayerOverride("*.ff.*", skip=True),  # never reached for ff.net.2: first match wins
        ),
    )
    plan = resolve_plan(unet, recipe, ARCHITECTURES["sd15"])
    assert plan["conv_in"].weights.bits == 6 and plan["conv_in"].reason == "override 'conv_in'"
    to_q = plan["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"]
    assert (to_q.weights.bits, to_q.weights.group_size) == (4, 64)
    assert not plan["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].quantized
    ff2 = plan["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    assert ff2.weights.bits == 8 and ff2.activations is None
    assert not plan["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"].quantized
    assert not plan["conv_out"].quantized


def test_default_ignore_can_be_turned_off(unet):
    recipe = Recipe("all", PRESETS["w8a16"].weights, None, use_default_ignore=False)
    plan = resolve_plan(unet, recipe, ARCHITECTURES["sd15"])
    assert all(layer.quantized for layer in plan)


def test_unmatched_patterns_warn(unet):
    recipe = Recipe("typo", PRESETS["w8a16"].weights, None, ignore=("down_block.*",))
    with pytest.warns(UserWarning, match=r"\['down_block.\*'\] matched no layer"):
        resolve_plan(unet, recipe, ARCHITECTURES["sd15"])


def test_plan_json_round_trip(unet):
    plan = resolve_plan(unet, PRESETS["w4a8"], ARCHITECTURES["sd15"])
    assert QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize("arch", ["sd3", "pixart", "sdxl"])
def test_default_ignore_lists_match_real_layers(tiny_folders, arch):
    denoiser = denoiser_of(load_pipeline(tiny_folders[arch]))[1]
    plan = resolve_plan(denoiser, PRESETS["w8a8"], ARCHITECTURES[arch])
    skipped = {layer.name for layer in plan if not layer.quantized}
    for rule in ARCHITECTURES[arch].default_ignore:
        assert any(__import__("fnmatch").fnmatchcase(name, rule.pattern) for name in skipped), rule.pattern
    assert len(plan.quantized) > len(skipped)


def test_exact_layer_entries_come_first_and_round_trip(unet, tmp_path):
    """A machine-made plan as a recipe: one exact entry per layer, ahead of every glob rule."""
    names = [layer.name for layer in resolve_plan(unet, PRESETS["w8a8"], ARCHITECTURES["sd15"]).quantized]
    entries = {name: LayerOverride(name, weights={"bits": 4 + (i % 2) * 4}) for i, name in enumerate(names)}
    entries["conv_in"] = LayerOverride("conv_in", weights={"bits": 8})  # default-ignored: an exact entry wins
    entries[names[1]] = LayerOverride(names[1], skip=True)
    recipe = Recipe(
        "mixed",
        PRESETS["w8a8"].weights,
        PRESETS["w8a8"].activations,
        overrides=(LayerOverride("*", weights={"bits": 2}),),
        layers=entries,
    )
    plan = resolve_plan(unet, recipe, ARCHITECTURES["sd15"])
    assert plan[names[0]].weights.bits == 4 and plan[names[2]].weights.bits == 4 and plan[names[3]].weights.bits == 8
    assert not plan[names[1]].quantized and plan[names[1]].reason == "layer entry (skip)"
    assert plan["conv_in"].weights.bits == 8 and plan["conv_in"].reason == "layer entry"
    assert plan["conv_out"].weights.bits == 2  # no entry: the glob rules apply after the entries
    assert plan["conv_out"].reason == "override '*'"
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["_version"] == 3 and data["layers"][names[0]] == {
        "skip": False,
        "weights": {"bits": 4},
        "activations": {},
    }
    assert Recipe.from_dict(data) == recipe
    with pytest.warns(UserWarning, match="1 exact layer entry name no Linear / Conv2d layer.*'not.a.layer'"):
        resolve_plan(
            unet,
            Recipe("x", PRESETS["w8a8"].weights, None, layers={"not.a.layer": LayerOverride("not.a.layer")}),
            ARCHITECTURES["sd15"],
        )
    with pytest.raises(RecipeError, match="mapping of skip / weights / activations"):
        Recipe.from_dict({**data, "layers": {names[0]: {"pattern": "*"}}})


def test_rule_order_on_a_dit(tiny_folders):
    """SD3's MMDiT: the same order on transformer layer names; each rule's reason names the rule that won."""
    transformer = denoiser_of(load_pipeline(tiny_folders["sd3"]))[1]
    recipe = Recipe(
        "dit",
        PRESETS["w8a8"].weights,
        PRESETS["w8a8"].activations,
        ignore=("transformer_blocks.*.attn.to_*", "proj_out"),
        overrides=(
            LayerOverride("transformer_blocks.0.attn.to_q", weights={"bits": 4}),  # beats the ignore glob
            LayerOverride("context_embedder", weights={"bits": 6}),  # beats the default ignore list
            LayerOverride("transformer_blocks.1.ff.*", skip=True),
            LayerOverride("transformer_blocks.*.ff.net.2", activations=None),  # after the skip: not reached for 1
        ),
        layers={"transformer_blocks.1.attn.to_k": LayerOverride("transformer_blocks.1.attn.to_k")},
    )
    plan = resolve_plan(transformer, recipe, ARCHITECTURES["sd3"])
    to_q = plan["transformer_blocks.0.attn.to_q"]
    assert to_q.weights.bits == 4 and to_q.reason == "override 'transformer_blocks.0.attn.to_q'"
    assert (
        plan["context_embedder"].weights.bits == 6 and plan["context_embedder"].reason == "override 'context_embedder'"
    )
    # the exact layer entry comes before the ignore glob that also matches it
    assert plan["transformer_blocks.1.attn.to_k"].quantized and plan["transformer_blocks.1.attn.to_k"].reason == (
        "layer entry"
    )
    # the recipe's ignore glob before the default ignore list on the same layer
    assert not plan["transformer_blocks.0.attn.to_k"].quantized
    assert plan["transformer_blocks.0.attn.to_k"].reason == "ignore 'transformer_blocks.*.attn.to_*'"
    assert not plan["proj_out"].quantized and plan["proj_out"].reason == "ignore 'proj_out'"
    # first matching override wins
    assert not plan["transformer_blocks.1.ff.net.2"].quantized
    assert plan["transformer_blocks.1.ff.net.2"].reason == "skip 'transformer_blocks.1.ff.*'"
    ff2 = plan["transformer_blocks.0.ff.net.2"]
    assert ff2.weights.bits == 8 and ff2.activations is None
    assert ff2.reason == "override 'transformer_blocks.*.ff.net.2'"
    # no rule: the default ignore list, then the recipe's specs
    assert plan["norm_out.linear"].reason.startswith("default ignore: final adaLN modulation")
    assert plan["pos_embed.proj"].reason.startswith("default ignore: patch-embedding conv")
    assert plan["transformer_blocks.0.attn.add_q_proj"].reason == "recipe dit"


def test_ignore_glob_and_default_ignore_on_the_same_layer(unet):
    """A recipe glob that matches a default-ignored layer: the recipe's ignore is the reason reported, the
    layer stays floating point, and the glob counts as used (no 'matched no layer' warning)."""
    import warnings

    recipe = Recipe("g", PRESETS["w8a8"].weights, PRESETS["w8a8"].activations, ignore=("conv_*",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = resolve_plan(unet, recipe, ARCHITECTURES["sd15"])
    assert not plan["conv_in"].quantized and plan["conv_in"].reason == "ignore 'conv_*'"
    assert not plan["conv_out"].quantized and plan["conv_out"].reason == "ignore 'conv_*'"
    # the same glob with the default list turned off still keeps both in floating point
    off = resolve_plan(
        unet,
        Recipe("g", recipe.weights, recipe.activations, ignore=("conv_*",), use_default_ignore=False),
        ARCHITECTURES["sd15"],
    )
    assert not off["conv_in"].quantized and off["conv_in"].reason == "ignore 'conv_*'"
    # and without the glob the default list decides, with its own reason
    default = resolve_plan(unet, PRESETS["w8a8"], ARCHITECTURES["sd15"])
    assert default["conv_in"].reason.startswith("default ignore: first layer")
