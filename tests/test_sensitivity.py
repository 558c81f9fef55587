"""Metric-decoupled sensitivity on a tiny real SD 1.5 pipeline: a deliberately bad layer ranks most sensitive,
shards merge into exactly the single-process result, a resumed run measures only what is missing, and the
``search`` verb writes a recipe that ``quantize`` accepts, with its report and plots."""

from __future__ import annotations

import json

import pytest
import torch

from quantdiff.calibration import capture_calibration
from quantdiff.cli import main
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.search.sensitivity import (
    CONTENT,
    QUALITY,
    SQNR,
    SSIM,
    WEIGHT,
    SensitivityHarness,
    SensitivitySettings,
    measure_sensitivity,
    missing_entries,
    shard_file,
)

BAD = "down_blocks.0.attentions.0.proj_in"
# six quality layers (the bad one among them) and two content layers of the first down block
LAYERS = (
    "down_blocks.0.attentions.0.proj_*",
    "down_blocks.0.resnets.0.*",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
)
# the verb's test searches fewer layers and candidates: one self-attention, one cross-attention key, a feed-forward
CLI_LAYERS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
)
SETTINGS = SensitivitySettings(
    weight_bits=(4,), input_bits=(8,), records=2, images=2, steps=2, batch_size=2, layers=LAYERS
)
PROMPTS = ["a red fox in the snow", "a watercolor lighthouse on a cliff", "a bowl of ramen, overhead photo"]
CAPTURE = dict(num_inference_steps=4, num_timesteps=2, seed=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.one_torch_thread


def _with_bad_layer(folder: str):
    """The tiny pipeline with one input channel of ``proj_in`` moved into its weights: the GroupNorm before it
    scales that channel down 1000x and the 1x1 conv scales its weights up 1000x. The float model computes the
    same; 4-bit weights per output channel spend their range on the 1000x column and round the rest to zero."""
    pipe = load_pipeline(folder)
    unet = denoiser_of(pipe)[1]
    norm, proj_in = unet.get_submodule("down_blocks.0.attentions.0.norm"), unet.get_submodule(BAD)
    with torch.no_grad():
        norm.weight[3] /= 1000
        norm.bias[3] /= 1000
        proj_in.weight[:, 3] *= 1000
    return pipe


@pytest.fixture(scope="module")
def calibration(tiny_folders):
    """A small calibration set of the tiny SD 1.5 pipeline (3 prompts x 2 recorded steps, both guidance branches)."""
    pipe = load_pipeline(tiny_folders["sd15"])
    return capture_calibration(pipe, PROMPTS, model_path=tiny_folders["sd15"], **CAPTURE)


@pytest.fixture(scope="module")
def setup(tiny_folders, calibration):
    return _with_bad_layer(tiny_folders["sd15"]), calibration, tiny_folders["sd15"]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    pipe, calibration, folder = setup
    cache = tmp_path_factory.mktemp("single")
    return measure_sensitivity(pipe, calibration, SETTINGS, cache, model=folder, progress=False), cache


def test_groups_metrics_and_the_bad_layer_ranks_most_sensitive(single):
    results, _ = single
    groups = {layer.name: layer.group for layer in results.layers}
    assert groups[BAD] == QUALITY and groups["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == CONTENT
    assert groups["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"] == CONTENT
    assert missing_entries(results, SETTINGS) == []
    for entry in results.entries.values():
        assert entry.metric == (SSIM if groups[entry.layer] == CONTENT else SQNR)
    weight4 = sorted((e.value, e.layer) for e in results.entries.values() if e.kind == WEIGHT and e.metric == SQNR)
    (worst, name), (runner_up, _) = weight4[0], weight4[1]
    assert name == BAD and worst < runner_up - 10, weight4[:3]


def test_shards_merge_into_the_single_process_result(setup, single, tmp_path):
    pipe, calibration, folder = setup
    results, _ = single
    first = measure_sensitivity(pipe, calibration, SETTINGS, tmp_path, shard=(0, 2), model=folder, progress=False)
    assert missing_entries(first, SETTINGS)  # the other shard's layers are not measured yet
    merged = measure_sensitivity(pipe, calibration, SETTINGS, tmp_path, shard=(1, 2), model=folder, progress=False)
    assert shard_file(tmp_path, (0, 2)).is_file() and shard_file(tmp_path, (1, 2)).is_file()
    assert merged.layers == results.layers
    assert merged.entries == results.entries  # every value bit for bit (timings are not compared)


class _CountingHarness(SensitivityHarness):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured: list[str] = []

    def measure(self, layer, kind, bits, metric):
        self.measured.append(f"{layer}|{kind}{bits}|{metric}")
        return super().measure(layer, kind, bits, metric)


def test_a_resumed_run_measures_only_what_is_missing(setup, single, tmp_path):
    pipe, calibration, folder = setup
    results, cache = single
    path = shard_file(cache, (0, 1))
    data = json.loads(path.read_text())
    dropped = sorted(data["entries"])[:3]  # as if the run had been stopped before these
    for key in dropped:
        del data["entries"][key]
    copy = tmp_path / "cache"
    copy.mkdir()
    shard_file(copy, (0, 1)).write_text(json.dumps(data))
    harness = _CountingHarness(pipe, calibration, SETTINGS, model=folder, progress=False)
    resumed = measure_sensitivity(pipe, calibration, SETTINGS, copy, model=folder, progress=False, harness=harness)
    assert sorted(harness.measured) == dropped
    assert resumed.entries == results.entries
    again = _CountingHarness(pipe, calibration, SETTINGS, model=folder, progress=False)
    measure_sensitivity(pipe, calibration, SETTINGS, copy, model=folder, progress=False, harness=again)
    assert again.measured == []


def test_search_verb_writes_a_recipe_that_quantize_accepts(tiny_folders, calibration, tmp_path):
    folder = tiny_folders["sd15"]
    calibration.save(tmp_path / "calib")
    out = tmp_path / "mixed.yaml"
    common = ["search", folder, "--calib", str(tmp_path / "calib"), "--weight-bits", "4", "--out", str(out)]
    small = ["--records", "2", "--images", "2", "--steps", "2", "--batch-size", "2", "--layers", ",".join(CLI_LAYERS)]
    small += ["--weight-candidates", "4,8", "--content-weight-bits", "4,8", "--act-candidates", "8"]
    assert main(["--quiet", *common, *small, "--shard", "1/2"]) == 0  # one shard: the cache only
    assert not out.exists()
    assert main(["--quiet", *common, *small]) == 0  # measures what is missing, allocates, writes
    for suffix in (".search.json", ".search.md", ".sensitivity.png", ".allocation.png"):
        assert (tmp_path / f"mixed{suffix}").stat().st_size > 0, suffix
    report = json.loads((tmp_path / "mixed.search.json").read_text())
    assert report["averages"]["weight_bits"] <= 4.0 + 1e-9
    assert report["bos_aware"].startswith("on:")
    quantized = tmp_path / "q"
    assert (
        main(
            [
                "--quiet",
                "quantize",
                folder,
                "--recipe",
                str(out),
                "--calib",
                str(tmp_path / "calib"),
                "--out",
                str(quantized),
            ]
        )
        == 0
    )
    stored = json.loads((quantized / "quantdiff.json").read_text())
    for name, (w, a) in report["bits"].items():
        assert stored["plan"][name]["weights"]["bits"] == w
        assert stored["plan"][name]["activations"]["bits"] == a
    assert "bos_kv" in stored["plan"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]["extras"]
