"""clip_search: a clip ratio per dynamic-input layer from its own output error. The error against a direct
computation (Linear and a 3x3 convolution), the choice on hand-built cases where the answer is known, then on
tiny real pipelines: a per-layer plan that saves, loads and generates bit-identically."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from quantdiff.algorithms.clip_search import ClipSearch, best_clip_ratio, clip_output_errors
from quantdiff.calibration.taps import input_rows
from quantdiff.errors import RecipeError
from quantdiff.nn.inputs import fake_quantize_dynamic_input
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe, TensorSpec
from quantdiff.serialization import load_quantized_denoiser, save_quantized

A4_TOKEN = TensorSpec(4, False, "token", dynamic=True)
A4_GROUP = TensorSpec(4, False, "group", group_size=16, dynamic=True)
RATIOS = (1.0, 0.9, 0.8)


@pytest.mark.parametrize("spec", [A4_TOKEN, A4_GROUP], ids=["token", "group16"])
def test_the_error_is_the_output_error_of_the_quantized_input(spec):
    torch.manual_seed(0)
    x, weight = torch.randn(2, 40, 64), torch.randn(24, 64)  # (B, T, C_in), (C_out, C_in)
    errors = clip_output_errors(x, weight, spec, RATIOS, channel_dim=-1)
    for ratio, error in zip(RATIOS, errors, strict=True):
        x_q = fake_quantize_dynamic_input(x, -1, dataclasses.replace(spec, clip_ratio=ratio))
        expected = float(((F.linear(x_q, weight) - F.linear(x, weight)).double() ** 2).sum())
        assert error == pytest.approx(expected, rel=1e-4)
    # a 3x3 convolution: through im2col every output pixel counts once, as F.conv2d computes it
    conv = torch.nn.Conv2d(32, 8, 3, padding=1)
    image = torch.randn(2, 32, 6, 6)
    errors = clip_output_errors(
        image, conv.weight.detach().reshape(8, -1), spec, RATIOS, channel_dim=1, rows_of=lambda t: input_rows(conv, t)
    )
    for ratio, error in zip(RATIOS, errors, strict=True):
        q = fake_quantize_dynamic_input(image, 1, dataclasses.replace(spec, clip_ratio=ratio))
        expected = float((F.conv2d(q - image, conv.weight.detach(), padding=1).double() ** 2).sum())
        assert error == pytest.approx(expected, rel=1e-4)


def test_it_clips_where_the_outliers_do_not_matter_and_not_where_they_do():
    """Every token has one huge channel. If the weight ignores that channel, clipping it costs nothing and
    refines the rest: the smallest ratio wins. If the weight reads only that channel, clipping is all error
    and rounding the rest costs nothing: no clipping wins."""
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    x[:, 7] = 20.0
    ignores, reads_only = torch.randn(16, 64), torch.zeros(16, 64)
    ignores[:, 7] = 0
    reads_only[:, 7] = torch.randn(16)
    assert best_clip_ratio(clip_output_errors(x, ignores, A4_TOKEN, RATIOS, channel_dim=-1), RATIOS) == 0.8
    assert best_clip_ratio(clip_output_errors(x, reads_only, A4_TOKEN, RATIOS, channel_dim=-1), RATIOS) == 1.0
    assert best_clip_ratio(torch.tensor([2.0, 1.0, 1.0]), RATIOS) == 0.9  # a tie: the less clipping


def test_sampled_rows_are_the_same_rows_for_every_ratio():
    torch.manual_seed(2)
    x, weight = torch.randn(4096, 32), torch.randn(8, 32)
    full = clip_output_errors(x, weight, A4_TOKEN, RATIOS, channel_dim=-1)
    sampled = clip_output_errors(
        x, weight, A4_TOKEN, RATIOS, channel_dim=-1, max_rows=1024, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(sampled * 4, full, rtol=0.15)  # a quarter of the rows: about a quarter of the error
    assert torch.argmin(sampled) == torch.argmin(full)


def test_options_and_recipes_it_cannot_serve_are_refused(tiny_folders, calibration_sets):
    with pytest.raises(RecipeError, match=r"clip_search.ratios\[\]=1.2 is invalid"):
        ClipSearch(ratios=(0.9, 1.2))
    assert ClipSearch(ratios=0.9).ratios == (1.0, 0.9)  # no clipping is always a candidate
    static = Recipe("static", PRESETS["w8a8"].weights, TensorSpec(8, False, "tensor"), algorithms=(ClipSearch(),))
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    with pytest.raises(RecipeError, match="clip_search chooses clip ratios of dynamic inputs"):
        quantize_denoiser(denoiser, static, calibration_sets["sd15"][0], progress=False)


@pytest.mark.parametrize("arch", ["sd15", "sd3"])
def test_a_plan_with_searched_ratios_round_trips_and_is_no_worse(arch, tiny_folders, calibration_sets, tmp_path):
    calibration, held_out = calibration_sets[arch]
    weights = TensorSpec(8, True, "channel")

    def quantized(activations, algorithms=()):
        denoiser = denoiser_of(load_pipeline(tiny_folders[arch]))[1]
        quantize_denoiser(
            denoiser, Recipe("r", weights, activations, algorithms=algorithms), calibration, progress=False
        )
        return denoiser

    searched = quantized(A4_GROUP, (ClipSearch(),))
    ratios = {layer.activations.clip_ratio for layer in searched.quantdiff_info.plan.quantized if layer.activations}
    assert len(ratios) > 1, ratios  # layers differ: a per-layer choice, written into the plan

    def mean_sqnr(denoiser) -> float:
        fp = denoiser_of(load_pipeline(tiny_folders[arch]))[1]
        pairs = zip(held_out.replay(fp, progress=False), held_out.replay(denoiser, progress=False), strict=True)
        return sum(sqnr_db(r, o) for r, o in pairs) / len(held_out)

    fixed = {ratio: mean_sqnr(quantized(dataclasses.replace(A4_GROUP, clip_ratio=ratio))) for ratio in (1.0, 0.9)}
    assert mean_sqnr(searched) > min(fixed.values()) + 0.1, fixed
    outputs = list(held_out.replay(searched, progress=False))
    save_quantized(searched, tmp_path / "q", base_path=tiny_folders[arch])
    loaded = load_quantized_denoiser(tmp_path / "q")
    assert loaded.quantdiff_info.plan == searched.quantdiff_info.plan
    for a, b in zip(outputs, held_out.replay(loaded, progress=False), strict=True):
        assert torch.equal(a, b)
