"""Folders crafted by someone else, and writes cut short: each ends in quantdiff's one-line error (or, where
the README's Reliability policy allows it, loads with a warning).

Real folders of a tiny SD1.5 pipeline are built once (a W8A16 quantized folder and a recorded calibration
set), copied per test and damaged the way an attacker or an unlucky disk would.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantdiff.calibration import CalibrationSet, capture_calibration
from quantdiff.errors import CalibrationError, FormatError, QuantDiffError, RecipeError
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import Recipe, TensorSpec, load_recipe
from quantdiff.serialization import (
    load_quantized_denoiser,
    load_quantized_pipeline,
    read_quantized_folder,
    save_quantized,
)
from quantdiff.testing.tiny import save_tiny_pipeline

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    pipeline = save_tiny_pipeline("sd15", root / "sd15", seed=0)
    pipe = load_pipeline(pipeline)
    calibration = capture_calibration(
        pipe, ["a red fox", "a lighthouse"], num_inference_steps=2, num_timesteps=1, model_path=pipeline, progress=False
    )
    calibration.save(root / "calib")
    _, unet = denoiser_of(pipe)
    quantize_denoiser(unet, "w8a16", progress=False)
    save_quantized(pipe, root / "q", base_path=pipeline)
    return {"pipeline": pipeline, "quantized": root / "q", "calibration": root / "calib"}


@pytest.fixture
def quantized(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["quantized"], tmp_path / "q"))


@pytest.fixture
def calibration(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["calibration"], tmp_path / "calib"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- base path


def test_a_relative_base_path_is_refused(quantized):
    _edit_json(quantized / "quantdiff.json", lambda c: c["base"].update(path="../../sd15"))
    with pytest.raises(FormatError) as error:
        read_quantized_folder(quantized)
    assert _one_line(error) == (
        f"{quantized / 'quantdiff.json'} is malformed (base.path '../../sd15' is relative: quantdiff writes '.' "
        "(self-contained) or the base pipeline folder's absolute path, so set it to that absolute path): the folder "
        "is damaged, re-run quantize"
    )


def test_an_absolute_base_path_to_a_folder_that_is_not_a_pipeline_is_refused(quantized, tmp_path):
    _edit_json(quantized / "quantdiff.json", lambda c: c["base"].update(path=str(tmp_path)))
    with pytest.raises(FormatError) as error:
        load_quantized_pipeline(quantized)
    assert _one_line(error).startswith(f"the base pipeline folder '{tmp_path}' recorded in ")
    assert str(error.value).endswith(
        "is gone: move it back, or quantize again with --copy-components for a self-contained folder"
    )


def test_an_absolute_base_path_to_another_pipeline_loads_with_a_warning(built, quantized, tmp_path):
    other = Path(shutil.copytree(built["pipeline"], tmp_path / "other"))
    _edit_json(other / "scheduler" / "scheduler_config.json", lambda c: c.update(steps_offset=0))
    _edit_json(quantized / "quantdiff.json", lambda c: c["base"].update(path=str(other)))
    with pytest.warns(UserWarning, match=f"the base pipeline folder '{other}' changed since quantization"):
        pipe = load_quantized_pipeline(quantized)
    assert Path(pipe.name_or_path) == other


@pytest.mark.parametrize("value", [["x"], "", "/tmp/\x00x", 3])
def test_a_base_path_that_is_not_a_path_is_refused(quantized, value):
    _edit_json(quantized / "quantdiff.json", lambda c: c["base"].update(path=value))
    with pytest.raises(FormatError, match=r"is malformed \(base.path must be a non-empty path string"):
        read_quantized_folder(quantized)


def test_a_component_name_leaving_the_folder_is_refused(quantized):
    _edit_json(quantized / "quantdiff.json", lambda c: c["denoiser"].update(component="../../unet"))
    with pytest.raises(FormatError) as error:
        read_quantized_folder(quantized)
    assert "(a sd15 denoiser is component 'unet' of class 'UNet2DConditionModel', not '../../unet' of class" in (
        _one_line(error)
    )


def test_a_class_other_than_the_architectures_is_refused(quantized):
    _edit_json(quantized / "quantdiff.json", lambda c: c["denoiser"].update({"class": "DiffusionPipeline"}))
    with pytest.raises(FormatError, match="not 'unet' of class 'DiffusionPipeline'"):
        read_quantized_folder(quantized)


# ---------------------------------------------------------------------------------------------- symlinks


def test_a_symlink_leaving_the_quantized_folder_is_refused(quantized, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(quantized / "unet" / "quantized.safetensors", outside)
    (quantized / "unet" / "quantized.safetensors").symlink_to(outside)
    with pytest.raises(FormatError) as error:
        load_quantized_denoiser(quantized)
    assert _one_line(error) == (
        f"'{quantized / 'unet' / 'quantized.safetensors'}' resolves to '{outside}', outside the folder "
        f"'{quantized}' (a symlink or '..' leaving it): quantdiff only reads files inside the folder; copy the "
        "file in (cp -L) if you trust it"
    )


def test_a_symlink_inside_the_folder_is_followed(quantized):
    (quantized / "unet" / "real.safetensors").write_bytes((quantized / "unet" / "quantized.safetensors").read_bytes())
    (quantized / "unet" / "quantized.safetensors").unlink()
    (quantized / "unet" / "quantized.safetensors").symlink_to("real.safetensors")
    assert load_quantized_denoiser(quantized).conv_in.weight.shape == (32, 4, 3, 3)


def test_a_symlinked_quantdiff_json_leaving_the_folder_is_refused(quantized, tmp_path):
    shutil.move(quantized / "quantdiff.json", tmp_path / "elsewhere.json")
    (quantized / "quantdiff.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(FormatError, match="outside the folder"):
        read_quantized_folder(quantized)


def test_a_calibration_shard_symlinked_outside_is_refused(calibration, tmp_path):
    shutil.move(calibration / "records-00000.safetensors", tmp_path / "shard.safetensors")
    (calibration / "records-00000.safetensors").symlink_to(tmp_path / "shard.safetensors")
    with pytest.raises(CalibrationError, match="resolves to .* outside the folder"):
        CalibrationSet.load(calibration)


@pytest.mark.parametrize("name", ["../records-00000.safetensors", "/etc/passwd", "records-00000.safetensors/.."])
def test_a_shard_name_that_is_a_path_is_refused(calibration, name):
    _edit_json(calibration / "index.json", lambda i: i["records"][0].update(shard=name))
    with pytest.raises(CalibrationError) as error:
        CalibrationSet.load(calibration)
    assert _one_line(error) == (
        f"calibration index {calibration / 'index.json'} is malformed (record 0 names shard {name!r}, not a "
        "records-NNNNN.safetensors file): re-run calibrate"
    )


# ---------------------------------------------------------------------------------------------- safetensors


def _safetensors(header: dict, body: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + body


@pytest.mark.parametrize(
    "content",
    [
        _safetensors({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16)),
        _safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}, bytes(16)),
        _safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(16)),
        _safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), declared=2**62),
        _safetensors({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)),
        b"",
    ],
    ids=["huge-shape", "offset-past-the-file", "offsets-shifted", "huge-header-length", "negative-shape", "empty"],
)
def test_a_crafted_safetensors_header_is_refused(quantized, content):
    path = quantized / "unet" / "quantized.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError) as error:
        load_quantized_denoiser(quantized)
    assert _one_line(error).startswith(f"'{path}' is corrupt or truncated (")
    assert str(error.value).endswith("): re-run quantize")


def test_an_integer_tensor_of_another_integer_dtype_is_refused(quantized):
    path = quantized / "unet" / "quantized.safetensors"
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if n.endswith("weight_q"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path, metadata={"format": "quantdiff"})
    with pytest.raises(FormatError) as error:
        load_quantized_denoiser(quantized)
    shape = tuple(tensors[name].shape)
    assert _one_line(error) == (
        f"'{path}': tensor {name!r} is {shape} torch.int32, the model expects {shape} torch.int8; re-run quantize"
    )


# ---------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"format_version": 1' + "0" * 5000 + "}", "it holds an integer of more than 4300 digits"),
        ("[" * 100_000 + "]" * 100_000, "it is nested too deeply"),
        ('{"a": ' * 5000 + "1" + "}" * 5000, "it is nested too deeply"),
    ],
    ids=["huge-number", "deep-list", "deep-object"],
)
def test_hostile_json_is_refused_by_every_loader(quantized, calibration, tmp_path, text, reason):
    (quantized / "quantdiff.json").write_text(text)
    with pytest.raises(FormatError, match=re.escape(f"quantdiff.json is not readable JSON ({reason})")) as error:
        read_quantized_folder(quantized)
    _one_line(error)
    (calibration / "index.json").write_text(text)
    with pytest.raises(CalibrationError, match=re.escape(f"index.json is not readable JSON ({reason})")):
        CalibrationSet.load(calibration)
    (tmp_path / "recipe.json").write_text(text)
    with pytest.raises(RecipeError, match=re.escape(f"is not valid JSON: {reason}")):
        load_recipe(tmp_path / "recipe.json")


def test_huge_floats_and_nan_in_a_recipe_are_refused(tmp_path):
    recipe = {"name": "x", "weights": {"bits": 1e999, "symmetric": True, "granularity": "channel"}, "activations": None}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=r"bits=inf is out of range: use an integer from 2 to 8"):
        load_recipe(tmp_path / "r.json")


def test_a_yaml_recipe_with_odd_types_is_refused_in_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\nweights: {bits: 8, symmetric: true, granularity: channel}\n"
                                     "activations: null\nignore: 2024-01-01\n? [a, b]\n: 1\n")  # fmt: skip
    with pytest.raises(RecipeError) as error:
        load_recipe(tmp_path / "r.yaml")
    assert _one_line(error) == (
        f"recipe file '{tmp_path / 'r.yaml'}' is not valid YAML: while constructing a mapping in \"<byte string>\", "
        'line 1, column 1 found unhashable key in "<byte string>", line 5, column 3'
    )


def test_an_oversized_json_file_is_refused_before_it_is_read(quantized):
    with open(quantized / "quantdiff.json", "r+b") as handle:
        handle.truncate(257 * 2**20)  # sparse: no disk space used
    with pytest.raises(FormatError, match=r"quantdiff.json is 257 MiB, larger than any JSON quantdiff reads"):
        read_quantized_folder(quantized)


# ---------------------------------------------------------------------------------------------- recipes, plans


def test_recipe_globs_that_match_nothing_are_allowed_with_a_warning(built):
    pipe = load_pipeline(built["pipeline"])
    _, unet = denoiser_of(pipe)
    recipe = Recipe(
        name="typo",
        weights=TensorSpec(bits=8, symmetric=True, granularity="channel"),
        activations=None,
        ignore=("down_blocks.9.*",),
    )
    with pytest.warns(UserWarning, match=r"recipe 'typo': pattern\(s\) \['down_blocks.9.\*'\] matched no layer"):
        info = quantize_denoiser(unet, recipe, progress=False)
    assert len(info.plan.quantized) > 0


def test_a_plan_naming_a_layer_the_model_lacks_is_refused(quantized):
    def rename(config):
        name = next(n for n, layer in config["plan"].items() if layer["weights"] is not None)
        config["plan"] = {("up_blocks.7.x" if n == name else n): v for n, v in config["plan"].items()}

    _edit_json(quantized / "quantdiff.json", rename)
    with pytest.raises(FormatError) as error:
        load_quantized_denoiser(quantized)
    assert "does not match its UNet2DConditionModel: layer 'up_blocks.7.x' is planned as" in _one_line(error)
    assert str(error.value).endswith("the model has no such layer; re-run quantize")


def test_a_plan_with_another_shape_than_the_model_is_refused(quantized):
    def widen(config):
        layer = next(layer for layer in config["plan"].values() if layer["layer_type"] == "Linear")
        layer["weight_shape"] = [4096, 4096]

    _edit_json(quantized / "quantdiff.json", widen)
    with pytest.raises(FormatError, match=r"is planned as Linear \(4096, 4096\), the model has Linear \(\d+, \d+\)"):
        load_quantized_denoiser(quantized)


# ---------------------------------------------------------------------------------------------- calibration


def _rewrite_shard(folder: Path, change) -> None:
    path = folder / "records-00000.safetensors"
    tensors = load_file(path)
    for key in list(tensors):
        tensors[key] = change(key, tensors[key])
    save_file(tensors, path, metadata={"format": "quantdiff-calibration"})


def test_calibration_tensors_with_the_right_names_and_wrong_shapes_are_refused(built, calibration):
    _rewrite_shard(
        calibration, lambda key, t: t[:, :3].contiguous() if key.endswith("/sample") else t
    )  # 3 latent channels
    loaded = CalibrationSet.load(calibration)  # consistent within itself, so it loads
    _, unet = denoiser_of(load_pipeline(built["pipeline"]))
    with pytest.raises(CalibrationError) as error:
        quantize_denoiser(unet, "w8a8", loaded, progress=False)
    message = _one_line(error)
    assert message.startswith(f"calibration data from '{built['pipeline']}' does not fit this UNet2DConditionModel (")
    assert "recorded sample (2, 3, 16, 16), timestep (), encoder_hidden_states (2, 77, 32)" in message
    assert message.endswith("): run `quantdiff calibrate` on this model")


def test_calibration_records_of_different_shapes_are_refused(calibration):
    _rewrite_shard(calibration, lambda key, t: t[:1] if key == "000001/encoder_hidden_states" else t)
    with pytest.raises(CalibrationError) as error:
        CalibrationSet.load(calibration)
    assert _one_line(error) == (
        f"calibration data in '{calibration}' is inconsistent: record 1 has 'encoder_hidden_states' as "
        "(1, 77, 32) float32, record 0 as (2, 77, 32) float32; re-run calibrate"
    )


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda r: r.update(prompt_index="0"), "prompt_index must be a non-negative integer, got '0'"),
        (lambda r: r.update(timestep=float("inf")), "timestep must be a finite number, got inf"),
        (lambda r: r.update(tensors={"sample": "000000/nope"}), "record 0: tensor '000000/nope' is not in"),
        (lambda r: r.update(values={"a.b": [1]}), "record 0: 'values' must map argument paths to plain JSON values"),
        (lambda r: r.update(values={"a..b": 1}), "argument path 'a..b' is not a dotted Python name"),
    ],
    ids=["string-index", "infinite-timestep", "missing-tensor", "list-value", "empty-name"],
)
def test_a_malformed_calibration_index_is_refused(calibration, edit, reason):
    _edit_json(calibration / "index.json", lambda index: edit(index["records"][0]))
    with pytest.raises(CalibrationError, match="is malformed \\(" + reason.replace("(", "\\(")) as error:
        CalibrationSet.load(calibration)
    _one_line(error)


# ---------------------------------------------------------------------------------------------- interrupted writes


# The CLI in a child that stops itself (SIGSTOP, from a Python audit hook) at one exact moment of writing its
# output, so the test kills it there with SIGKILL every time instead of racing it: "marker" is the opening of the
# file that marks a finished folder (written last), "rename" the move of the complete folder into place.
_STOPPING_CLI = """
import os, signal, sys
point = sys.argv[1]
def hook(event, args):
    if point == "marker" and event == "open" and str(args[0]).endswith(("quantdiff.json", "index.json")) \\
            and ".partial-" in str(args[0]) and "w" in str(args[1]):
        os.kill(os.getpid(), signal.SIGSTOP)
    if point == "rename" and event == "os.rename" and ".partial-" in str(args[0]):
        os.kill(os.getpid(), signal.SIGSTOP)
sys.addaudithook(hook)
from quantdiff.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _kill_at(point: str, arguments: list[str]) -> None:
    """Run ``quantdiff ARGUMENTS``, SIGKILL it when it stops itself at ``point``."""
    process = subprocess.Popen([sys.executable, "-c", _STOPPING_CLI, point, *arguments], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    child = psutil.Process(process.pid)
    deadline = time.time() + 300
    while child.status() != psutil.STATUS_STOPPED:
        assert process.poll() is None, f"it ended before {point}: {process.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["marker", "rename"])
@pytest.mark.parametrize("verb", ["calibrate", "quantize"])
def test_kill_9_while_writing_leaves_no_output(built, tmp_path, verb, point):
    out = tmp_path / "out"
    arguments = ["--quiet", verb, str(built["pipeline"]), "--out", str(out)]
    if verb == "calibrate":
        arguments += ["--num-prompts", "2", "--steps", "2", "--num-timesteps", "1"]
    else:
        arguments += ["--recipe", "w8a16", "--copy-components"]
    _kill_at(point, arguments)
    assert not out.exists()  # nothing at the final path: a later run with the same --out starts afresh
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]  # hidden, deletable
    if point == "marker":  # the marker file is not there yet: no loader takes the folder for a finished one
        if verb == "calibrate":
            with pytest.raises(CalibrationError, match="is not a calibration folder: it has no index.json"):
                CalibrationSet.load(partial)
        else:
            with pytest.raises(FormatError, match="is not a quantdiff folder: it has no quantdiff.json"):
                read_quantized_folder(partial)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**10, 16 * 2**10))  # writes past 16 KiB fail with EFBIG


@pytest.mark.parametrize("verb", ["calibrate", "quantize"])
def test_a_full_disk_gives_one_clear_line_and_leaves_nothing(built, tmp_path, verb):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "quantdiff.cli", "--quiet", verb, str(built["pipeline"]), "--out", str(out)]
    if verb == "calibrate":
        command += ["--num-prompts", "2", "--steps", "2", "--num-timesteps", "1"]
    else:
        command += ["--recipe", "w8a16"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"quantdiff {verb}: error: could not write '{out}': File too large; nothing was written: free some space "
        "(or raise the file-size limit) on that disk, or choose another --out, and run again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_space_left_on_device_is_reported(tmp_path):
    from quantdiff.atomic import atomic_directory

    with pytest.raises(QuantDiffError) as error:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "full").symlink_to("/dev/full")
            with open(staging / "full", "wb") as handle:
                handle.write(b"x")
    assert _one_line(error) == (
        f"could not write '{tmp_path / 'out'}': No space left on device; nothing was written: free some space "
        "(or raise the file-size limit) on that disk, or choose another --out, and run again"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_finished_output_is_readable_by_others(built, tmp_path):
    """mkdtemp makes its folder 0700; the finished folder gets the usual permissions instead."""
    mask = os.umask(0o022)
    os.umask(mask)
    CalibrationSet.load(built["calibration"]).save(tmp_path / "copy")
    assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o777 & ~mask
