"""The activation algorithms: per-timestep ranges, SmoothQuant-style balancing, shortcut-split. Pure math
against closed forms, then each on tiny real pipelines: saved, loaded and run on the integer path."""

from __future__ import annotations

import json

import pytest
import torch
from kernel_check import KERNELS_EXPECTED
from torch import nn

from quantdiff.algorithms.shortcut_split import ShortcutSplit
from quantdiff.algorithms.smoothquant import (
    SmoothQuant,
    channel_absmax,
    fake_quantize_rows,
    quantized_output_error,
    search_alpha,
    smoothing_factors,
    weight_channel_max,
)
from quantdiff.algorithms.timestep_groups import TimestepGroups, group_edges
from quantdiff.calibration.taps import Taps
from quantdiff.errors import CalibrationError, RecipeError
from quantdiff.nn import QuantizedLayer, use_integer_kernels, use_reference
from quantdiff.nn.quantized import QUANTIZED_CLASSES
from quantdiff.pipelines.architectures import architecture_of, concat_split_points, norm_feeds_of
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.plan import LayerPlan
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe, TensorSpec
from quantdiff.serialization import load_quantized_denoiser, save_quantized

W8_INT = PRESETS["w8a8-int"].weights  # pair-safe: the int8 kernel is exact on every x86 CPU
A8 = TensorSpec(8, False, "tensor")
A4 = TensorSpec(4, False, "tensor")


# ----------------------------------------------------------------------------------------------- pure math
def test_group_edges_split_distinct_timesteps_evenly():
    assert group_edges([999, 999, 800, 600, 400, 200, 1], 2) == [500.0]
    assert group_edges([0, 10, 20, 30, 40, 50], 3) == [15.0, 35.0]
    assert group_edges([5.0, 7.0], 1) == []
    with pytest.raises(ValueError, match="3 timestep groups need at least 3 distinct timesteps, got 2"):
        group_edges([1, 1, 2], 3)


def test_smoothing_factors_follow_the_formula_and_move_outliers():
    act = torch.tensor([1.0, 100.0, 4.0, 0.0])
    weight = torch.tensor([[1.0, 1.0, 0.5, 2.0], [-2.0, 0.5, 0.25, 1.0]])  # (C_out, C_in)
    w_max = weight_channel_max(weight)
    assert torch.equal(w_max, torch.tensor([2.0, 1.0, 0.5, 2.0]))
    s = smoothing_factors(act, w_max, 0.5)
    torch.testing.assert_close(s, torch.tensor([1 / 2**0.5, 10.0, 2 / 0.5**0.5, 1.0]))  # dead channel keeps 1
    assert torch.equal(channel_absmax(torch.tensor([[[1.0, -3.0], [2.0, 0.5]]]), linear=True), torch.tensor([2.0, 3.0]))
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(channel_absmax(x, linear=False), x.abs().amax(dim=(0, 2, 3)))


def test_alpha_search_helps_on_an_outlier_channel_and_never_hurts():
    torch.manual_seed(0)
    rows = torch.randn(256, 32)
    rows[:, 3] *= 60  # one outlier input channel
    weight = torch.randn(16, 32) * 0.1
    act_max = rows.abs().amax(dim=0)
    naive = quantized_output_error(rows, [weight], torch.ones(32), W8_INT, A4)
    alpha, s = search_alpha(rows, act_max, [weight], (0.25, 0.5, 0.75), W8_INT, A4)
    assert alpha is not None and quantized_output_error(rows, [weight], s, W8_INT, A4) < 0.6 * naive
    flat = torch.randn(256, 32)  # no outlier: smoothing may not pay, and the search then leaves the layer alone
    alpha, s = search_alpha(flat, flat.abs().amax(dim=0), [weight], (1.0,), W8_INT, A8)
    if alpha is None:
        assert s is None
    else:
        assert quantized_output_error(flat, [weight], s, W8_INT, A8) < quantized_output_error(
            flat, [weight], torch.ones(32), W8_INT, A8
        )


@pytest.mark.parametrize(
    "spec",
    [
        TensorSpec(4, False, "token", dynamic=True, clip_ratio=0.9),
        TensorSpec(4, False, "group", group_size=16, dynamic=True),
        TensorSpec(4, True, "group", group_size=16, dynamic=True, clip_ratio=0.8),
        TensorSpec(6, False, "tensor", dynamic=True, clip_ratio=0.9),
    ],
    ids=["token-clip", "group", "group-sym-clip", "tensor-clip"],
)
def test_the_alpha_search_quantizes_rows_as_the_linear_layer_does(spec):
    """The search ranks alphas by the error of the layer's own input format: a Linear input's rows go through
    the same per-token / per-group / clipped quantization as the layer itself, bit for bit."""
    torch.manual_seed(4)
    rows = torch.randn(40, 48) * torch.linspace(0.2, 8.0, 48)  # (N, C_in)
    linear = nn.Linear(48, 8)
    plan = LayerPlan("l", "Linear", (8, 48), True, W8_INT, spec, "t")
    layer = QUANTIZED_CLASSES["Linear"].prepared(linear, plan)
    layer.convert()
    assert torch.equal(fake_quantize_rows(rows, spec, 48), layer.quantize_input(rows))


def test_options_out_of_range_are_refused_with_their_name():
    with pytest.raises(RecipeError, match=r"smoothquant.alphas\[\]=1.5 is invalid"):
        SmoothQuant(alphas=(0.5, 1.5))
    with pytest.raises(RecipeError, match="timestep_groups.groups=0 is invalid"):
        TimestepGroups(0)
    assert SmoothQuant(alphas=0.5).alphas == (0.5,)


# ------------------------------------------------------------------------------------ on tiny pipelines
def _assert_layers_match_on_the_integer_path(denoiser: nn.Module, names: list[str], records) -> None:
    """Each named layer on the int8 kernel vs its reference path, on inputs recorded from a replay."""
    inputs: dict[str, torch.Tensor] = {}
    with Taps(denoiser) as taps:
        for name in names:
            module = denoiser.get_submodule(name)
            # the tap sees the pre-scaled input; the layer's forward takes the raw one, so record that instead
            taps.on_block(name, lambda call, name=name: inputs.setdefault(name, call.args[0].detach().clone()))
        _outputs(denoiser, records.subset_by_index([0]))
    summary = use_integer_kernels(denoiser, attention="float32")
    on_kernel = {layer.name for layer in summary.integer}
    assert set(names) <= on_kernel, sorted(set(names) - on_kernel)[:3]
    with torch.no_grad():
        for name in names:
            module = denoiser.get_submodule(name)
            quality = sqnr_db(module.reference_forward(inputs[name]), module(inputs[name]))
            assert quality > 100, (name, quality)  # the same integers: fp32 rounding of the rescale only
    use_reference(denoiser)


def _quantized(folder: str, recipe: Recipe, calibration) -> nn.Module:
    denoiser = denoiser_of(load_pipeline(folder))[1]
    quantize_denoiser(denoiser, recipe, calibration, progress=False)
    return denoiser


def _outputs(denoiser, records):
    return list(records.replay(denoiser, progress=False))


@pytest.mark.parametrize("arch", ["sd15", "sd3"])
def test_smoothquant_folds_where_it_can_and_saves_what_it_cannot(arch, tiny_folders, calibration_sets, tmp_path):
    calibration, held_out = calibration_sets[arch]
    recipe = Recipe("sq", W8_INT, TensorSpec(6, False, "tensor"), algorithms=(SmoothQuant(),))
    denoiser = _quantized(tiny_folders[arch], recipe, calibration)
    plan = denoiser.quantdiff_info.plan
    pre_scaled = {layer.name for layer in plan.quantized if "input_pre_scale" in layer.extras}
    assert pre_scaled  # the search found layers where balancing pays
    feeds = norm_feeds_of(denoiser, architecture_of(denoiser))
    if arch == "sd15":  # layers behind an affine norm get their factors folded into it, never stored
        assert not pre_scaled & {name for names in feeds.values() for name in names}
        fresh = denoiser_of(load_pipeline(tiny_folders[arch]))[1]
        changed = [
            norm
            for norm in feeds
            if not torch.equal(denoiser.get_submodule(norm).weight, fresh.get_submodule(norm).weight)
        ]
        assert changed
    else:  # SD3's block norms are adaLN: nothing folds, every factor is stored
        assert not feeds
    outputs = _outputs(denoiser, held_out)
    save_quantized(denoiser, tmp_path / "q", base_path=tiny_folders[arch])
    loaded = load_quantized_denoiser(tmp_path / "q")
    for a, b in zip(outputs, _outputs(loaded, held_out), strict=True):
        assert torch.equal(a, b)
    fp = _outputs(denoiser_of(load_pipeline(tiny_folders[arch]))[1], held_out)
    naive = _outputs(_quantized(tiny_folders[arch], Recipe("naive", W8_INT, recipe.activations), calibration), held_out)
    balanced_db = sum(sqnr_db(r, o) for r, o in zip(fp, outputs, strict=True)) / len(fp)
    naive_db = sum(sqnr_db(r, o) for r, o in zip(fp, naive, strict=True)) / len(fp)
    assert balanced_db > naive_db + 1  # measured: sd15 21.0 vs 17.5 dB, sd3 53.6 vs 51.9 dB at W8A6
    if KERNELS_EXPECTED:
        _assert_layers_match_on_the_integer_path(loaded, sorted(pre_scaled), held_out)


def test_timestep_groups_observe_and_use_one_scale_per_group(tiny_folders, calibration_sets, tmp_path):
    calibration, held_out = calibration_sets["sd15"]
    recipe = Recipe("tg", W8_INT, A8, algorithms=(TimestepGroups(3),))
    denoiser = _quantized(tiny_folders["sd15"], recipe, calibration)
    layer = denoiser.get_submodule("down_blocks.0.resnets.0.conv1")
    assert isinstance(layer, QuantizedLayer) and layer.input_scale.shape == (3,)
    assert len(set(layer.input_scale.tolist())) == 3  # the groups did see different ranges
    edges = layer.timestep_edges.tolist()
    assert edges == group_edges([record.timestep for record in calibration], 3)
    outputs = _outputs(denoiser, held_out)
    save_quantized(denoiser, tmp_path / "q", base_path=tiny_folders["sd15"])
    assert json.loads((tmp_path / "q" / "quantdiff.json").read_text())["format_version"] == 2
    loaded = load_quantized_denoiser(tmp_path / "q")  # the loader attaches the step clock
    for a, b in zip(outputs, _outputs(loaded, held_out), strict=True):
        assert torch.equal(a, b)
    if KERNELS_EXPECTED:
        grouped = [name for name, m in loaded.named_modules() if isinstance(m, QuantizedLayer) and m.extras]
        _assert_layers_match_on_the_integer_path(loaded, grouped, held_out)
    with pytest.raises(CalibrationError, match="8 timestep groups need at least 8 distinct timesteps"):
        _quantized(tiny_folders["sd15"], Recipe("tg", W8_INT, A8, algorithms=(TimestepGroups(8),)), calibration)


def test_shortcut_split_gives_the_two_parts_their_own_scales(tiny_folders, calibration_sets, tmp_path):
    calibration, held_out = calibration_sets["sd15"]
    denoiser = _quantized(tiny_folders["sd15"], Recipe("split", W8_INT, A8, algorithms=(ShortcutSplit(),)), calibration)
    splits = concat_split_points(denoiser, architecture_of(denoiser))
    assert splits["up_blocks.0.resnets.0.conv_shortcut"] == 64 and splits["up_blocks.1.resnets.1.conv_shortcut"] == 32
    assert not any(name.endswith("conv1") for name in splits)  # after GroupNorm: the halves are aligned
    for name, at in splits.items():
        layer = denoiser.get_submodule(name)
        assert layer.layer_plan.extras["input_split"] == {"at": at} and layer.input_scale.shape == (2,)
    outputs = _outputs(denoiser, held_out)
    save_quantized(denoiser, tmp_path / "q", base_path=tiny_folders["sd15"])
    loaded = load_quantized_denoiser(tmp_path / "q")
    for a, b in zip(outputs, _outputs(loaded, held_out), strict=True):
        assert torch.equal(a, b)
    if KERNELS_EXPECTED:
        summary = use_integer_kernels(loaded, attention="float32")
        split_paths = {layer.name: layer for layer in summary.layers if layer.name in splits}
        assert all(layer.path == "integer" and "two kernels" in layer.reason for layer in split_paths.values())
        use_reference(loaded)
        _assert_layers_match_on_the_integer_path(loaded, sorted(splits), held_out)


def test_shortcut_split_is_refused_on_a_dit(tiny_folders, calibration_sets, tmp_path):
    from quantdiff.cli import main

    calibration, _ = calibration_sets["pixart"]
    with pytest.raises(RecipeError, match="'shortcut_split' applies to UNets.*remove it from the recipe"):
        _quantized(tiny_folders["pixart"], Recipe("split", W8_INT, A8, algorithms=(ShortcutSplit(),)), calibration)
    recipe = tmp_path / "split.yaml"
    recipe.write_text(json.dumps({**Recipe("split", W8_INT, A8, algorithms=(ShortcutSplit(),)).to_dict()}))
    code = main(
        [
            "--quiet",
            "quantize",
            tiny_folders["pixart"],
            "--recipe",
            str(recipe),
            "--num-prompts",
            "1",
            "--steps",
            "2",
            "--num-timesteps",
            "1",
            "--out",
            str(tmp_path / "q"),
        ]
    )
    assert code == 2 and not (tmp_path / "q").exists()
