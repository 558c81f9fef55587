"""The command line: the full flow, and one clear error with no output left behind for each bad input."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from quantdiff.cli import main
from quantdiff.recipe import PRESETS


def _no_output(parent, name):
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    return leftovers == []


def test_calibrate_quantize_generate_inspect(tiny_folders, tmp_path, capsys):
    model = tiny_folders["sd15"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\n# a comment\n\nportrait of a fisherman\n")
    assert (
        main(
            [
                "--quiet",
                "calibrate",
                model,
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "calib"),
                "--steps",
                "4",
                "--num-timesteps",
                "2",
            ]
        )
        == 0
    )
    assert "recorded 4 denoiser calls (2 prompts x 2 timesteps" in capsys.readouterr().out
    assert (
        main(
            [
                "--quiet",
                "quantize",
                model,
                "--calib",
                str(tmp_path / "calib"),
                "--recipe",
                "w8a8",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "saved W8A8 (w8a8) quantized denoiser" in out and "stored" in out
    for name, path in (("fp", model), ("q", str(tmp_path / "q"))):
        assert (
            main(
                [
                    "--quiet",
                    "generate",
                    path,
                    "--prompt",
                    "a cat wearing a hat",
                    "--seed",
                    "0",
                    "--steps",
                    "3",
                    "--out",
                    str(tmp_path / f"{name}.png"),
                ]
            )
            == 0
        )
    fp, q = Image.open(tmp_path / "fp.png"), Image.open(tmp_path / "q.png")
    assert fp.size == q.size == (64, 64)
    assert "Seed: 0" in q.text["parameters"] and "Quantization: W8A8 (w8a8)" in q.text["parameters"]
    assert "Quantization" not in fp.text["parameters"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["layer", "type", "shape", "weights", "inputs", "fp32", "stored"]
    assert "down_blocks.0.resnets.0.conv1" in table and "int8 sym channel minmax" in table
    assert "layers: 177 of 181 Linear/Conv2d quantized" in table
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized"] and report["label"] == "W8A8"
    totals = report["totals"]
    assert totals["stored_bytes"] == (tmp_path / "q" / "unet" / "quantized.safetensors").stat().st_size - _header(
        tmp_path / "q"
    )
    # recomputed from the float UNet: a quantized layer stores 1 byte per weight, an fp32 scale per output
    # channel, its fp32 bias and a static input scale and zero point; everything else stays fp32
    from quantdiff.pipelines.loading import load_pipeline

    unet = load_pipeline(model).unet
    params = sum(p.numel() for p in unet.parameters())
    planned = {layer["name"] for layer in report["layers"] if layer["weights"] is not None}
    quantized = [m for name, m in unet.named_modules() if name in planned]
    assert len(quantized) == 177
    expected = 4 * params - sum(3 * m.weight.numel() - 4 * m.weight.shape[0] for m in quantized)
    assert totals["params"] == params and totals["fp32_bytes"] == 4 * params
    assert expected <= totals["stored_bytes"] <= expected + 8 * len(quantized)  # + input scale and zero point
    assert totals["ratio_vs_fp32"] == pytest.approx(totals["stored_bytes"] / (4 * params), rel=1e-12)


def test_generate_runs_int8_kernels_by_default_and_agrees_with_the_reference_path(tiny_folders, tmp_path, capsys):
    import numpy as np
    from kernel_check import KERNELS_EXPECTED

    from quantdiff.evaluation.metrics import psnr

    model, out = tiny_folders["sd15"], tmp_path / "q"
    calibration = ["--num-prompts", "2", "--steps", "3", "--num-timesteps", "2", "--mode", "noise"]
    assert main(["--quiet", "quantize", model, "--recipe", "w8a8-int", *calibration, "--out", str(out)]) == 0
    capsys.readouterr()
    images = {}
    for execution in ("auto", "integer", "reference"):
        args = ["generate", str(out), "--prompt", "a cat", "--steps", "3", "--out", str(tmp_path / f"{execution}.png")]
        assert main([*args, *(["--execution", execution] if execution != "auto" else [])]) == 0  # auto: default
        err = capsys.readouterr().err
        images[execution] = np.asarray(Image.open(tmp_path / f"{execution}.png"))
        if execution == "reference":
            assert "reference (fake-quant) execution" in err
        elif execution == "auto":  # each layer on the kernel or the float path, whichever was faster here
            assert "auto execution: " in err and " of 177 quantized layers on int8 kernels" in err
        elif KERNELS_EXPECTED:  # pair-safe weights: every layer takes the kernel on any x86 CPU
            assert "integer execution: 177 of 177 quantized layers on int8 kernels" in err
    for execution in ("auto", "integer"):
        quality = psnr(images[execution], images["reference"])
        print(f"tiny sd15, 3 steps: {execution} vs reference image PSNR {quality:.1f} dB")
        assert quality >= 30  # the quality measured in simulation is what the deployed path gives
    from quantdiff.errors import QuantDiffError
    from quantdiff.generate import load_any_pipeline

    with pytest.raises(QuantDiffError, match="execution 'fast' is unknown: use one of auto, integer, reference"):
        load_any_pipeline(out, execution="fast")


def _header(folder):
    data = (folder / "unet" / "quantized.safetensors").read_bytes()
    return 8 + int.from_bytes(data[:8], "little")


def test_quantize_on_the_fly_and_dry_run_inspect(tiny_folders, tmp_path, capsys):
    model = tiny_folders["pixart"]
    assert (
        main(
            [
                "--quiet",
                "quantize",
                model,
                "--recipe",
                "w4a8",
                "--num-prompts",
                "2",
                "--steps",
                "3",
                "--num-timesteps",
                "2",
                "--mode",
                "noise",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "q" / "quantdiff.json").read_text())
    assert config["calibration"]["mode"] == "noise" and len(config["calibration"]["prompts"]) == 2
    capsys.readouterr()
    assert main(["inspect", model, "--recipe", "w4a8", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    real = json.loads(capsys.readouterr().out)
    assert dry["totals"]["stored_bytes"] == real["totals"]["stored_bytes"] and not dry["quantized"]


@pytest.fixture()
def not_a_pipeline(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"jpeg")
    return folder


def _run_failing(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_folder(tmp_path, capsys):
    err = _run_failing(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "q")], capsys)
    assert err == f"quantdiff quantize: error: model folder '{tmp_path / 'nope'}' does not exist"
    assert _no_output(tmp_path, "q")


BUNDLED_LIST = "(bundled: digits-sd, digits-sd3, digits-sd-turbo, tiny-sd15, tiny-sdxl, tiny-sd3, tiny-pixart)"


def test_a_mistyped_name_lists_the_bundled_names_and_suggests_the_closest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = _run_failing(["generate", "digits-sdx", "--prompt", "x"], capsys)
    assert err == (
        "quantdiff generate: error: model folder 'digits-sdx' does not exist, and it is not a bundled model name: "
        f"did you mean 'digits-sd'? {BUNDLED_LIST}"
    )
    err = _run_failing(["calibrate", "tiny-sdx", "--out", "calib"], capsys)
    assert err == (
        "quantdiff calibrate: error: model folder 'tiny-sdx' does not exist, and it is not a bundled model name: "
        f"did you mean 'tiny-sdxl'? {BUNDLED_LIST}"
    )
    err = _run_failing(["inspect", "my-model"], capsys)
    assert err == (
        "quantdiff inspect: error: model folder 'my-model' does not exist, and it is not a bundled model name "
        + BUNDLED_LIST
    )
    assert not (tmp_path / "image.png").exists() and _no_output(tmp_path, "calib")

    # The Python API takes folders: a bundled name there says how to get its folder.
    from quantdiff.errors import PipelineError
    from quantdiff.pipelines.loading import read_pipeline_folder

    with pytest.raises(PipelineError) as raised:
        read_pipeline_folder("digits-sd")
    assert str(raised.value) == (
        "model folder 'digits-sd' does not exist; 'digits-sd' is a bundled model name: "
        "pass resolve_model('digits-sd') (quantdiff.pipelines.bundled)"
    )


def test_not_a_pipeline(not_a_pipeline, tmp_path, capsys):
    err = _run_failing(["calibrate", str(not_a_pipeline), "--out", str(tmp_path / "calib")], capsys)
    assert "is not a diffusers pipeline folder: it has no model_index.json" in err
    assert _no_output(tmp_path, "calib")


def test_unknown_recipe(tiny_folders, tmp_path, capsys):
    err = _run_failing(["quantize", tiny_folders["sd15"], "--recipe", "w3a7", "--out", str(tmp_path / "q")], capsys)
    assert f"unknown recipe 'w3a7': use a preset ({', '.join(PRESETS)})" in err
    assert _no_output(tmp_path, "q")


def test_bits_out_of_range(tiny_folders, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: odd\nweights: {bits: 12, symmetric: true, granularity: channel}\nactivations: null\n")
    err = _run_failing(
        ["quantize", tiny_folders["sd15"], "--recipe", str(recipe), "--out", str(tmp_path / "q")], capsys
    )
    assert "bits=12 is out of range: use an integer from 2 to 8" in err
    assert _no_output(tmp_path, "q")


def test_calibration_recorded_on_another_model(tiny_folders, calibration_sets, tmp_path, capsys):
    calibration_sets["sd15"][0].save(tmp_path / "calib")
    err = _run_failing(
        ["--quiet", "quantize", tiny_folders["sdxl"], "--calib", str(tmp_path / "calib"), "--out", str(tmp_path / "q")],
        capsys,
    )
    assert "calibration data was recorded on another model" in err and "run `quantdiff calibrate` on this model" in err
    assert _no_output(tmp_path, "q")


@pytest.fixture(scope="module")
def quantized_folder(tiny_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q"
    assert main(["--quiet", "quantize", tiny_folders["sd3"], "--recipe", "w8a16", "--out", str(out)]) == 0
    return out


def test_corrupt_safetensors(quantized_folder, tmp_path, capsys):
    import shutil

    damaged = shutil.copytree(quantized_folder, tmp_path / "q")
    weights = damaged / "transformer" / "quantized.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    err = _run_failing(["--quiet", "generate", str(damaged), "--prompt", "x", "--out", str(tmp_path / "x.png")], capsys)
    assert "corrupt or truncated" in err and "re-run quantize" in err
    assert not (tmp_path / "x.png").exists()


def test_newer_format_version(quantized_folder, tmp_path, capsys):
    import shutil

    damaged = shutil.copytree(quantized_folder, tmp_path / "q")
    config = json.loads((damaged / "quantdiff.json").read_text())
    config["format_version"] = 7
    (damaged / "quantdiff.json").write_text(json.dumps(config))
    err = _run_failing(["inspect", str(damaged)], capsys)
    assert "format version 7" in err and "upgrade quantdiff" in err
    err = _run_failing(["--quiet", "generate", str(damaged), "--prompt", "x", "--out", str(tmp_path / "x.png")], capsys)
    assert "upgrade quantdiff" in err and not (tmp_path / "x.png").exists()


def test_existing_output_is_not_overwritten(quantized_folder, tiny_folders, capsys):
    before = (quantized_folder / "quantdiff.json").read_text()
    err = _run_failing(["quantize", tiny_folders["sd3"], "--recipe", "w8a16", "--out", str(quantized_folder)], capsys)
    assert "already exists" in err and "--overwrite" in err
    assert (quantized_folder / "quantdiff.json").read_text() == before


def test_inspect_execution_shows_kernel_paths_and_widened_int4(tiny_folders, tmp_path, capsys, monkeypatch, request):
    from kernel_check import KERNELS_EXPECTED, SUPPORT
    from kernel_layout import packed_int8_bounds

    from quantdiff.nn.kernels import packed_support

    # oneDNN's widened int4: the path where the packed kernels cannot run (tests/test_int4_kernels.py has theirs)
    monkeypatch.setenv("QUANTDIFF_NO_EXTENSION", "1")
    packed_support.cache_clear()
    request.addfinalizer(packed_support.cache_clear)  # later tests find the extension again

    from quantdiff.nn import native_bf16
    from quantdiff.recipe import Recipe, TensorSpec

    recipe = Recipe(
        "w4a8-channel", TensorSpec(bits=4, symmetric=True, granularity="channel"), PRESETS["w8a8"].activations
    )
    recipe_path = tmp_path / "w4a8-channel.json"
    recipe_path.write_text(json.dumps(recipe.to_dict()))
    model, out = tiny_folders["sd15"], tmp_path / "q"
    args = ["--num-prompts", "2", "--steps", "3", "--num-timesteps", "2", "--mode", "noise", "--out", str(out)]
    assert main(["--quiet", "quantize", model, "--recipe", str(recipe_path), *args]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--execution", "integer", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    execution, totals = report["execution"], report["totals"]
    quantized = [layer for layer in report["layers"] if layer["weights"] is not None]
    assert execution["integer_layers"] + execution["reference_layers"] == totals["quantized_layers"] == len(quantized)
    if KERNELS_EXPECTED:
        assert execution["integer_layers"] == execution["widened_layers"] == len(quantized)
        assert all(layer["path"] == "integer" and layer["widened"] for layer in quantized)
        # the kernel holds int8 (1 byte per weight) in place of the packed 4-bit weight (half a byte)
        extra = execution["held_bytes"] - totals["stored_bytes"]
        half_bytes = sum(math.prod(layer["shape"]) for layer in quantized) / 2
        saturates = SUPPORT.saturates
        blocking = sum(  # what oneDNN's packed layout adds to one byte per weight
            packed_int8_bounds(layer["shape"][0], math.prod(layer["shape"][1:]), saturates)[1]
            - math.prod(layer["shape"])
            for layer in quantized
        )
        assert half_bytes - len(quantized) <= extra <= half_bytes + blocking
        assert execution["ratio_vs_fp32"] == pytest.approx(execution["held_bytes"] / totals["fp32_bytes"])
        assert execution["attention"] == ("bfloat16-large" if native_bf16()[0] else "float32")
    assert main(["inspect", str(out), "--execution", "integer"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[-2:] == ["cpu", "path"] and "held in integer mode" in table
    if KERNELS_EXPECTED:
        assert "int8 kernel (int4 widened)" in table
    # plain --execution: auto, the default of generate and serve, settled by one denoising step
    assert main(["inspect", str(out), "--execution", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    auto = report["execution"]
    assert auto["mode"] == "auto"
    assert auto["integer_layers"] + auto["float_layers"] + auto["reference_layers"] == len(quantized)
    floats = {layer["name"] for layer in report["layers"] if layer.get("path") == "float"}
    assert len(floats) == auto["float_layers"]
    assert auto["float_bytes"] == 4 * sum(math.prod(layer["shape"]) for layer in quantized if layer["name"] in floats)
    print(f"inspect --execution (auto), tiny sd15 W4A8: {len(floats)} float, {auto['integer_layers']} int8 kernel")
    assert main(["inspect", model, "--execution"]) == 2
    assert "--execution needs a quantized folder" in capsys.readouterr().err
