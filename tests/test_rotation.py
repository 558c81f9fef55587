"""Hadamard input rotation (algorithms/rotation.py): the pure math, a layer with loud channels, a real pipeline."""

from __future__ import annotations

import pytest
import torch
from kernel_check import KERNELS_EXPECTED, kernel_vs_reference_db
from torch import nn

from quantdiff.algorithms.base import QuantizationContext, Stage
from quantdiff.algorithms.lowrank import LowRank
from quantdiff.algorithms.rotation import Rotation, rotation_block
from quantdiff.algorithms.smoothquant import SmoothQuant
from quantdiff.errors import RecipeError
from quantdiff.nn.quantized import QUANTIZED_CLASSES
from quantdiff.pipelines.architectures import architecture_of
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.plan import LayerPlan, resolve_plan
from quantdiff.primitives import hadamard_matrix, rotate_channels, sqnr_db
from quantdiff.quantize import prepare, quantize_denoiser, run_algorithms
from quantdiff.recipe import PRESETS, Recipe, TensorSpec
from quantdiff.serialization import load_quantized_denoiser, read_quantized_folder, save_quantized

A4_TOKEN = TensorSpec(4, False, "token", dynamic=True)


def test_hadamard_blocks_are_orthogonal_and_rotation_is_its_own_inverse():
    for size in (1, 2, 16, 64, 256):
        h = hadamard_matrix(size).double()
        assert torch.allclose(h @ h, torch.eye(size, dtype=torch.float64), atol=1e-6) and torch.equal(h, h.T)
    assert [rotation_block(c) for c in (320, 640, 1280, 96, 64, 4, 77)] == [64, 128, 256, 32, 64, 4, 1]
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    assert torch.allclose(rotate_channels(rotate_channels(x, -1, 32), -1, 32), x, atol=1e-12)
    w, pixels = torch.randn(7, 96, 3, 3, dtype=torch.float64), torch.randn(2, 96, 4, 4, dtype=torch.float64)
    rotated = nn.functional.conv2d(rotate_channels(pixels, 1, 32), rotate_channels(w, 1, 32))
    assert torch.allclose(rotated, nn.functional.conv2d(pixels, w), atol=1e-10)  # (x H) . (w H) = x . w
    with pytest.raises(ValueError, match="power-of-two size"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="blocks of 64 do not divide 96 channels"):
        rotate_channels(x, -1, 64)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rotation_spreads_loud_channels_so_4_bit_tokens_fit(kind):
    """A few channels 30x louder than the rest set each token's range; rotated, the energy is spread over all
    64 channels of the block and the same per-token 4-bit format loses far less."""
    torch.manual_seed(3)
    channels = 64
    layer = nn.Linear(channels, 48) if kind == "linear" else nn.Conv2d(channels, 48, 3, padding=1)
    x = torch.randn(4, 16, channels) if kind == "linear" else torch.randn(2, channels, 6, 6)
    loud = torch.ones(channels)
    loud[[3, 17, 40]] = 30.0
    x = x * (loud if kind == "linear" else loud[:, None, None])
    with torch.no_grad():
        reference = layer(x)
    results = {}
    for rotated in (False, True):
        plan = LayerPlan(
            "l", type(layer).__name__, tuple(layer.weight.shape), True, PRESETS["w8a8"].weights, A4_TOKEN, "t"
        )
        module = QUANTIZED_CLASSES[type(layer).__name__].prepared(layer, plan)
        if rotated:
            with torch.no_grad():
                module.weight.copy_(rotate_channels(module.weight, 1, 64))
            module.set_layer_plan(plan.with_extra("input_rotation", block=64), {})
        module.convert()
        with torch.no_grad():
            results[rotated] = sqnr_db(reference, module(x))
    assert results[True] > results[False] + 5, results  # measured +6.0 (Linear) and +5.6 dB (3x3 conv)


def _recipe(*algorithms) -> Recipe:
    return Recipe("rot", PRESETS["w8a8"].weights, A4_TOKEN, algorithms=algorithms)


def test_rotation_on_a_pipeline_keeps_the_float_model_saves_and_runs_on_the_kernel(
    tiny_folders, calibration_sets, tmp_path
):
    calibration, held_out = calibration_sets["sd15"]
    recipe = Recipe(
        "rot",
        PRESETS["w8a8"].weights,
        TensorSpec(8, False, "token", dynamic=True),
        algorithms=(SmoothQuant(), Rotation()),
    )
    fp = list(held_out.replay(denoiser_of(load_pipeline(tiny_folders["sd15"]))[1], progress=False))
    prepared = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    architecture = architecture_of(prepared)
    plan = resolve_plan(prepared, recipe, architecture)
    prepare(prepared, plan)
    context = QuantizationContext(prepared, plan, architecture, calibration, progress=False)
    run_algorithms(context, recipe.algorithms, Stage.FLOAT_MODEL)
    rotated = [layer for layer in context.plan.quantized if "input_rotation" in layer.extras]
    assert rotated and all(layer.extras["input_rotation"]["block"] >= 16 for layer in rotated)
    for a, b in zip(fp, held_out.replay(prepared, progress=False), strict=True):
        assert sqnr_db(a, b) > 60  # weights and inputs rotated: the same function up to float rounding

    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    quantize_denoiser(denoiser, recipe, calibration, progress=False)
    outputs = list(held_out.replay(denoiser, progress=False))
    save_quantized(denoiser, tmp_path / "q", base_path=tiny_folders["sd15"])
    assert read_quantized_folder(tmp_path / "q").config["format_version"] == 4
    loaded = load_quantized_denoiser(tmp_path / "q")
    for a, b in zip(outputs, held_out.replay(loaded, progress=False), strict=True):
        assert torch.equal(a, b)
    if not KERNELS_EXPECTED:
        return
    name = next(layer.name for layer in rotated if layer.layer_type == "Linear")
    assert kernel_vs_reference_db(loaded, name, held_out) > 100  # the same integers: the kernel sees the rotated input


def test_rotation_after_lowrank_is_refused_and_options_are_checked(tiny_folders, calibration_sets):
    calibration, _ = calibration_sets["sd15"]
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    with pytest.raises(RecipeError, match="list 'rotation' first"):
        quantize_denoiser(denoiser, _recipe(LowRank(rank=2), Rotation()), calibration, progress=False)
    with pytest.raises(RecipeError, match="rotation.min_block=1 is invalid"):
        Rotation(min_block=1)
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    with pytest.warns(UserWarning, match=r"rotation: \d+ layer\(s\) keep their input unrotated: blocks of fewer than "):
        quantize_denoiser(denoiser, _recipe(Rotation(min_block=4096)), calibration, progress=False)
    assert not any("input_rotation" in layer.extras for layer in denoiser.quantdiff_info.plan.quantized)
