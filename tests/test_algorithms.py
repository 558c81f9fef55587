"""The algorithm slot end to end, with algorithms defined here (not shipped): recipe file -> plan -> quantize
-> save -> load -> generate, stored extras included; and the rules of the slot (stages, registry, errors)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml
from safetensors import safe_open

from quantdiff.algorithms import AlgorithmConfig, QuantizationContext, Stage, algorithm_types, register_algorithm
from quantdiff.algorithms.base import check_number
from quantdiff.calibration.taps import Taps
from quantdiff.errors import CalibrationError, RecipeError
from quantdiff.generate import generate, load_any_pipeline
from quantdiff.nn import QuantizedLayer, QuantizedWeight
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe, load_recipe
from quantdiff.serialization import load_quantized_denoiser, read_quantized_folder, save_quantized


def channel_scales(channel_max: torch.Tensor, strength: float) -> torch.Tensor:
    """The pure math of the test algorithm: ``v_j = max|X_j| ** -strength``, normalised to geometric mean 1."""
    v = channel_max.clamp_min(1e-5) ** -strength  # (C_in,)
    return v / v.log().mean().exp()


@register_algorithm
@dataclass(frozen=True)
class InputChannelScale(AlgorithmConfig):
    """Test algorithm: multiply each planned layer's input by a stored per-channel vector and divide its
    weight by it (an exact re-parametrisation in floating point; the quantizer then sees other ranges)."""

    TYPE: ClassVar[str] = "test-input-channel-scale"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL

    strength: float = 0.5

    def __post_init__(self) -> None:
        check_number("strength", self.strength, 0.0, 1.0)

    def apply(self, context: QuantizationContext) -> None:
        channel_max: dict[str, torch.Tensor] = {}
        with Taps(context.denoiser) as taps:
            for layer, _ in context.layers():
                channel = -1 if layer.layer_type == "Linear" else 1  # (..., C_in) or (N, C_in, H, W)

                def observe(x, name=layer.name, channel=channel):
                    seen = x.detach().abs().transpose(0, channel).reshape(x.shape[channel], -1).amax(dim=1)  # (C_in,)
                    channel_max[name] = torch.maximum(channel_max.get(name, seen), seen)

                taps.on_layer_input(layer.name, observe)
            for _ in context.calibration_for(self).replay(context.denoiser, progress=False):
                pass
        for layer, module in context.layers():
            v = channel_scales(channel_max[layer.name], self.strength)
            shape = (1, -1) if layer.layer_type == "Linear" else (1, -1, 1, 1)
            with torch.no_grad():
                module.weight.div_(v.reshape(shape))
            context.add_extra(layer.name, "input_pre_scale", {"input_pre_scale": v}, channels=v.numel())


@register_algorithm
@dataclass(frozen=True)
class RoundTowardZero(AlgorithmConfig):
    """Test algorithm: integer weights truncated toward zero instead of rounded to nearest."""

    TYPE: ClassVar[str] = "test-round-toward-zero"
    STAGE: ClassVar[Stage] = Stage.WEIGHT_ROUNDING
    NEEDS_CALIBRATION: ClassVar[bool] = False

    def apply(self, context: QuantizationContext) -> None:
        for layer, module in context.layers():
            w = module.weight.detach().float().reshape(layer.out_features, -1)  # (C_out, K), per channel
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
            q = torch.trunc(w / scale).to(torch.int8)
            context.round_weight(layer.name, QuantizedWeight(q, scale, None), by=self)


@register_algorithm
@dataclass(frozen=True)
class WidenRanges(AlgorithmConfig):
    """Test algorithm (calibration stage): every observed input scale times ``factor``."""

    TYPE: ClassVar[str] = "test-widen-ranges"
    STAGE: ClassVar[Stage] = Stage.CALIBRATION
    factor: float = 2.0

    def apply(self, context: QuantizationContext) -> None:
        for name, (scale, zero_point) in list(context.input_qparams.items()):
            context.input_qparams[name] = (scale * self.factor, zero_point)


@register_algorithm
@dataclass(frozen=True)
class CountConverted(AlgorithmConfig):
    """Test algorithm (converted stage): checks that it sees integer layers; records nothing."""

    TYPE: ClassVar[str] = "test-count-converted"
    STAGE: ClassVar[Stage] = Stage.CONVERTED
    NEEDS_CALIBRATION: ClassVar[bool] = False
    seen: ClassVar[list[int]] = []

    def apply(self, context: QuantizationContext) -> None:
        prepared = [name for (layer, module) in context.layers() if module.is_prepared for name in [layer.name]]
        assert not prepared, prepared
        CountConverted.seen.append(len(context.layers()))


def test_algorithm_with_stored_extras_goes_from_recipe_file_to_generated_image(
    tiny_folders, calibration_sets, tmp_path
):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "name": "w8a8-scaled",
                "weights": PRESETS["w8a8"].weights.to_dict(),
                "activations": PRESETS["w8a8"].activations.to_dict(),
                "algorithms": [{"_type": "test-input-channel-scale", "strength": 0.5}],
            }
        )
    )
    recipe = load_recipe(recipe_file)
    assert recipe.algorithms == (InputChannelScale(0.5),) and recipe.format_version == 3
    calibration, held_out = calibration_sets["sd15"]
    pipe = load_pipeline(tiny_folders["sd15"])
    _, denoiser = denoiser_of(pipe)
    reference = list(held_out.replay(denoiser, progress=False))
    info = quantize_denoiser(denoiser, recipe, calibration, progress=False)
    scaled = [layer for layer in info.plan.quantized if "input_pre_scale" in layer.extras]
    assert len(scaled) == len(info.plan.quantized) == 177
    outputs = list(held_out.replay(denoiser, progress=False))
    quality = min(sqnr_db(r, o) for r, o in zip(reference, outputs, strict=True))
    assert quality > 15  # still a working W8A8 model: the extras take part in the forward

    save_quantized(pipe, tmp_path / "q", base_path=tiny_folders["sd15"])
    folder = read_quantized_folder(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "quantdiff.json").read_text())
    assert config["format_version"] == 2 and config["recipe"]["algorithms"][0]["_type"] == "test-input-channel-scale"
    with safe_open(folder.weights_path, "pt") as handle:
        stored = handle.get_tensor(f"{scaled[0].name}.input_pre_scale")
    assert stored.shape == (scaled[0].extras["input_pre_scale"]["channels"],) and not torch.all(stored == 1)

    loaded = load_quantized_denoiser(tmp_path / "q")
    assert loaded.quantdiff_info.plan == info.plan and loaded.quantdiff_info.recipe == recipe
    for name, tensor in denoiser.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    for a, b in zip(outputs, held_out.replay(loaded, progress=False), strict=True):
        assert torch.equal(a, b)
    image, _ = generate(pipe, "a cat wearing a hat", steps=3, seed=1, progress=False)
    loaded_image, parameters = generate(
        load_any_pipeline(tmp_path / "q", execution="reference"), "a cat wearing a hat", steps=3, seed=1, progress=False
    )
    assert image.tobytes() == loaded_image.tobytes() and parameters["quantization"].startswith("W8A8")

    # The stored vector matters: the same recipe without the algorithm gives another model.
    plain = load_pipeline(tiny_folders["sd15"])
    quantize_denoiser(denoiser_of(plain)[1], PRESETS["w8a8"], calibration, progress=False)
    plain_outputs = list(held_out.replay(denoiser_of(plain)[1], progress=False))
    assert not all(torch.equal(a, b) for a, b in zip(outputs, plain_outputs, strict=True))


def test_float_model_stage_is_an_exact_reparametrisation(tiny_folders, calibration_sets):
    """Before conversion the prepared model with the extras computes what the float model computed."""
    from quantdiff.algorithms.base import QuantizationContext as Context
    from quantdiff.pipelines.architectures import architecture_of
    from quantdiff.plan import resolve_plan
    from quantdiff.quantize import prepare, run_algorithms

    calibration, held_out = calibration_sets["sd3"]
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd3"]))[1]
    reference = list(held_out.replay(denoiser, progress=False))
    plan = resolve_plan(denoiser, PRESETS["w8a8"], architecture_of(denoiser))
    prepare(denoiser, plan)
    context = Context(denoiser, plan, architecture_of(denoiser), calibration, progress=False)
    run_algorithms(context, [InputChannelScale(1.0)], Stage.FLOAT_MODEL)
    assert all("input_pre_scale" in layer.extras for layer in context.plan.quantized)
    for a, b in zip(reference, held_out.replay(denoiser, progress=False), strict=True):
        assert sqnr_db(a, b) > 90  # float rounding only


def test_every_stage_runs_in_order_and_weight_rounding_is_stored(tiny_folders, calibration_sets, tmp_path):
    calibration, _ = calibration_sets["pixart"]
    recipe = Recipe(
        "staged",
        PRESETS["w8a8-minmax"].weights,
        PRESETS["w8a8-minmax"].activations,
        algorithms=(InputChannelScale(0.25), WidenRanges(3.0), RoundTowardZero(), CountConverted()),
    )
    baseline = Recipe("baseline", recipe.weights, recipe.activations, algorithms=(InputChannelScale(0.25),))
    pipe, plain = load_pipeline(tiny_folders["pixart"]), load_pipeline(tiny_folders["pixart"])
    CountConverted.seen.clear()
    info = quantize_denoiser(denoiser_of(pipe)[1], recipe, calibration, progress=False)
    quantize_denoiser(denoiser_of(plain)[1], baseline, calibration, progress=False)
    assert CountConverted.seen == [len(info.plan.quantized)]
    staged, reference = denoiser_of(pipe)[1], denoiser_of(plain)[1]
    for layer in info.plan.quantized:
        module, base = staged.get_submodule(layer.name), reference.get_submodule(layer.name)
        # calibration stage: the observed scale, widened 3x
        torch.testing.assert_close(module.input_scale, base.input_scale * 3, rtol=0, atol=0)
        # weight rounding: truncation never rounds away from zero, and differs from nearest somewhere
        q, nearest = module.weight_q.int(), base.weight_q.int()
        assert torch.all(q.abs() <= nearest.abs() + 1) and not torch.equal(q, nearest)
    save_quantized(pipe, tmp_path / "q", base_path=tiny_folders["pixart"])
    loaded = load_quantized_denoiser(tmp_path / "q")
    for name, tensor in staged.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_recipe_rules_for_algorithms(tmp_path):
    with pytest.raises(RecipeError, match="list the algorithms in the order their stages run"):
        Recipe("x", PRESETS["w8a8"].weights, None, algorithms=(RoundTowardZero(), InputChannelScale()))
    with pytest.raises(RecipeError, match="strength=2 is invalid: use a number >= 0.0 and <= 1.0"):
        InputChannelScale(2)
    base = {"name": "x", "weights": PRESETS["w8a8"].weights.to_dict(), "activations": None}
    with pytest.raises(RecipeError, match="unknown algorithm _type 'nope'; known algorithms: .*test-round-toward-zero"):
        Recipe.from_dict({**base, "algorithms": [{"_type": "nope"}]})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['alpha'\]"):
        Recipe.from_dict({**base, "algorithms": [{"_type": "test-input-channel-scale", "alpha": 1}]})
    with pytest.raises(RecipeError, match="config version 2 is newer .* upgrade quantdiff"):
        Recipe.from_dict({**base, "algorithms": [{"_type": "test-round-toward-zero", "_version": 2}]})
    with pytest.raises(RecipeError, match="uses algorithms .* needs version 3"):
        Recipe.from_dict({**base, "_version": 2, "algorithms": [{"_type": "test-round-toward-zero"}]})
    recipe = Recipe("x", PRESETS["w8a8"].weights, None, algorithms=(InputChannelScale(0.3), RoundTowardZero()))
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["_version"] == 3 and data["algorithms"][0] == {
        "_type": "test-input-channel-scale",
        "_version": 1,
        "strength": 0.3,
    }
    assert Recipe.from_dict(data) == recipe and recipe.needs_calibration
    assert "test-input-channel-scale" in algorithm_types()
    # weight-only + an algorithm that replays calibration data: quantize says which algorithm needs it
    with pytest.raises(CalibrationError, match="runs algorithms that replay it"):
        quantize_denoiser(torch.nn.Sequential(), recipe)


def test_registry_rejects_what_it_could_not_load():
    with pytest.raises(TypeError, match="frozen dataclass"):

        @register_algorithm
        @dataclass
        class Mutable(AlgorithmConfig):
            TYPE: ClassVar[str] = "test-mutable"
            STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL

    with pytest.raises(TypeError, match="already registered"):

        @register_algorithm
        @dataclass(frozen=True)
        class Twin(AlgorithmConfig):
            TYPE: ClassVar[str] = "test-round-toward-zero"
            STAGE: ClassVar[Stage] = Stage.WEIGHT_ROUNDING


def test_prepared_layers_only_round_in_the_weight_rounding_stage(tiny_folders):
    from quantdiff.pipelines.architectures import architecture_of
    from quantdiff.plan import resolve_plan
    from quantdiff.quantize import prepare

    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    plan = resolve_plan(denoiser, PRESETS["w8a16"], architecture_of(denoiser))
    prepare(denoiser, plan)
    context = QuantizationContext(denoiser, plan, architecture_of(denoiser))
    layer, module = context.layers()[0]
    assert isinstance(module, QuantizedLayer) and module.is_prepared
    with pytest.raises(RuntimeError, match="weight-rounding stage"):
        context.round_weight(layer.name, QuantizedWeight(module.weight, module.weight, None), by=RoundTowardZero())
