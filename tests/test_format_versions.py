"""Format versions: the checked-in version-1 folder loads bit-identically forever; folders that use something new
are written with a higher version and refused by readers that do not know it; the lowest-version rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantdiff import serialization
from quantdiff.errors import FormatError
from quantdiff.nn import QuantizedLayer, use_integer_kernels
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.plan import QuantPlan
from quantdiff.quantize import quantize_denoiser
from quantdiff.serialization import load_quantized_denoiser, save_quantized
from quantdiff.versioning import Feature, check_version, lowest_version

V1_FOLDER = Path(__file__).parent / "data" / "v1-folder"  # written by quantdiff 0.1.0: tests/data/make_v1_folder.py


def test_checked_in_version_1_folder_loads_bit_identically(tmp_path):
    config = json.loads((V1_FOLDER / "quantdiff.json").read_text())
    assert config["format_version"] == 1 and config["quantdiff_version"] == "0.1.0"
    denoiser = load_quantized_denoiser(V1_FOLDER)
    stored = load_file(V1_FOLDER / "unet" / "quantized.safetensors")
    state = denoiser.state_dict()
    assert set(state) == set(stored)
    for name, tensor in stored.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    layers = [m for m in denoiser.modules() if isinstance(m, QuantizedLayer)]
    kinds = {(m.weight_spec.bits, m.weight_spec.granularity, m.input_spec is None) for m in layers}
    assert {(8, "channel", False), (4, "group", False), (8, "channel", True), (6, "tensor", False)} <= kinds

    with safe_open(V1_FOLDER / "expected.safetensors", "pt") as handle:
        recorded = handle.metadata()
        expected = {name: handle.get_tensor(name) for name in handle.keys()}
    with torch.no_grad():
        output = denoiser(expected["sample"], expected["timestep"], expected["encoder_hidden_states"]).sample
    same_machine = recorded == {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if same_machine:  # the float ops themselves are deterministic here
        assert torch.equal(output, expected["output"])
    else:  # another CPU's float kernels may round differently; the integers and scales are the same
        torch.testing.assert_close(output, expected["output"], rtol=1e-5, atol=1e-5)

    # Saving what was loaded writes version 1 again, with the very same tensors.
    base = tmp_path / "base"
    _base_folder_for(V1_FOLDER, base)
    save_quantized(denoiser, tmp_path / "again", base_path=base)
    again = json.loads((tmp_path / "again" / "quantdiff.json").read_text())
    assert again["format_version"] == 1 and again["plan"] == config["plan"] and again["recipe"] == config["recipe"]
    resaved = load_file(tmp_path / "again" / "unet" / "quantized.safetensors")
    assert set(resaved) == set(stored) and all(torch.equal(resaved[n], stored[n]) for n in stored)


def _base_folder_for(quantized: Path, base: Path) -> None:
    """A pipeline folder that holds just the denoiser config (all saving needs of a bare denoiser)."""
    (base / "unet").mkdir(parents=True)
    shutil.copy2(quantized / "unet" / "config.json", base / "unet" / "config.json")
    (base / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )


def _with_pre_scale(plan: QuantPlan, name: str) -> QuantPlan:
    layer = plan[name]
    return plan.with_layer(layer.with_extra("input_pre_scale", channels=layer.weight_shape[1]))


def test_a_folder_with_extras_is_version_2_and_refused_by_a_version_1_reader(tiny_folders, tmp_path, monkeypatch):
    pipe = load_pipeline(tiny_folders["sd15"])
    denoiser = denoiser_of(pipe)[1]
    info = quantize_denoiser(denoiser, "w8a16", progress=False)
    save_quantized(pipe, tmp_path / "plain", base_path=tiny_folders["sd15"])
    assert json.loads((tmp_path / "plain" / "quantdiff.json").read_text())["format_version"] == 1

    name = info.plan.quantized[3].name
    plan = _with_pre_scale(info.plan, name)
    channels = plan[name].extras["input_pre_scale"]["channels"]
    denoiser.get_submodule(name).set_layer_plan(plan[name], {"input_pre_scale": torch.linspace(0.5, 2, channels)})
    denoiser.quantdiff_info = type(info)(info.architecture, info.recipe, plan, info.calibration)
    save_quantized(pipe, tmp_path / "extras", base_path=tiny_folders["sd15"])
    config = json.loads((tmp_path / "extras" / "quantdiff.json").read_text())
    assert config["format_version"] == 2 and "extras" in config["plan"][name]
    loaded = load_quantized_denoiser(tmp_path / "extras")
    assert torch.equal(loaded.get_submodule(name).input_pre_scale, torch.linspace(0.5, 2, channels))

    monkeypatch.setattr(serialization, "FORMAT_VERSION", 1)  # a reader that knows only version 1
    with pytest.raises(
        FormatError, match="format version 2 .*newer than this quantdiff understands.*upgrade quantdiff"
    ):
        load_quantized_denoiser(tmp_path / "extras")
    assert load_quantized_denoiser(tmp_path / "plain") is not None  # what it does know still loads


def test_a_version_1_folder_edited_to_use_extras_is_refused(tiny_folders, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(V1_FOLDER, damaged)
    config = json.loads((damaged / "quantdiff.json").read_text())
    name = next(n for n, entry in config["plan"].items() if entry["weights"])
    config["plan"][name]["extras"] = {"input_pre_scale": {"channels": config["plan"][name]["weight_shape"][1]}}
    (damaged / "quantdiff.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="declares format version 1 but uses layer extras .* edited or damaged"):
        load_quantized_denoiser(damaged)
    config["format_version"] = 2  # consistent now, but the tensors the plan declares are not in the file
    (damaged / "quantdiff.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"does not match its plan: missing \[.*input_pre_scale"):
        load_quantized_denoiser(damaged)
    config["plan"][name]["extras"] = {"mystery": {}}
    (damaged / "quantdiff.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="unknown extra 'mystery'.*upgrade quantdiff"):
        load_quantized_denoiser(damaged)


def test_the_checked_in_folder_runs_on_the_integer_path():
    denoiser = load_quantized_denoiser(V1_FOLDER)
    with safe_open(V1_FOLDER / "expected.safetensors", "pt") as handle:
        expected = {name: handle.get_tensor(name) for name in handle.keys()}
    summary = use_integer_kernels(denoiser, attention="float32", weight_only="float32")  # fp32: exact
    with torch.no_grad():
        output = denoiser(expected["sample"], expected["timestep"], expected["encoder_hidden_states"]).sample
    # int8 layers on the kernel where this CPU computes them exactly, the others on the reference path
    assert len(summary.layers) == sum(isinstance(m, QuantizedLayer) for m in denoiser.modules())
    torch.testing.assert_close(output, expected["output"], rtol=1e-3, atol=1e-3)


def test_lowest_version_rule():
    features = (Feature("a.*.x", 2, "x"), Feature("b", 3, "b"), Feature("c.y", 2, "y"))
    assert lowest_version({"a": {"k": {"z": 1}}, "c": {}}, features) == 1
    assert lowest_version({"a": {"k": {"x": 0}}}, features) == 2
    assert lowest_version({"a": [{"x": False}]}, features) == 2  # lists match '*' too
    assert lowest_version({"a": [{"x": None}], "c": {"y": None}}, features) == 1  # a key holding null is absent
    assert lowest_version({"a": {}, "b": []}, features) == 3
    assert check_version({"c": {"y": 1}}, 2, 3, features, "doc") == 2
    with pytest.raises(ValueError, match="invalid format version True"):
        check_version({}, True, 3, features, "doc")
    with pytest.raises(ValueError, match="format version 4 by tool 9, newer .*up to version 3.*upgrade quantdiff"):
        check_version({}, 4, 3, features, "doc", "tool 9")
    with pytest.raises(ValueError, match=r"declares format version 1 but uses y \(c.y\), which needs version 2"):
        check_version({"c": {"y": 1}}, 1, 3, features, "doc")
