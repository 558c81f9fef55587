"""quantdiff analyze: per-layer statistics of real tiny denoisers, checked against inputs captured here."""

from __future__ import annotations

import fnmatch
import json
import math

import pytest
import torch
from torch import nn

from quantdiff.analysis import TimestepGrouping, analyze_denoiser, write_analysis
from quantdiff.analysis.statistics import abs_percentile
from quantdiff.calibration import CalibrationRecord, CalibrationSet
from quantdiff.cli import main
from quantdiff.pipelines.architectures import architecture_of
from quantdiff.pipelines.loading import denoiser_of, load_pipeline

PLOTS = ("sqnr_by_layer.png", "absmax_by_group.png", "channels_worst.png")


def _denoiser(folder: str) -> nn.Module:
    return denoiser_of(load_pipeline(folder))[1]


def _two_prompts(calibration: CalibrationSet) -> CalibrationSet:
    """The records of the first two prompts (every recorded timestep): enough for each check, half the time."""
    prompts = sorted({record.prompt_index for record in calibration})[:2]
    return calibration.subset_by_index([i for i, r in enumerate(calibration) if r.prompt_index in prompts])


def _candidate_layers(denoiser: nn.Module) -> list[str]:
    return [name for name, module in denoiser.named_modules() if type(module) in (nn.Linear, nn.Conv2d)]


def _check_output_folder(out) -> dict:
    for name in ("report.json", "report.md", *PLOTS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "sqnr_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    for plot in PLOTS:
        assert f"]({plot})" in markdown, plot  # embedded by relative path
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------------------- pure parts


def test_timestep_groups_have_equal_numbers_of_timesteps_and_midpoint_edges():
    groups = TimestepGrouping.of([981.0, 801.0, 601.0, 401.0, 201.0, 21.0, 801.0, 1.0, 501.0], 4)
    assert groups.timesteps == ((1.0, 21.0), (201.0, 401.0), (501.0, 601.0), (801.0, 981.0))
    assert groups.edges == (111.0, 451.0, 701.0)
    # The same lookup a quantized layer's per-group scales use: edges[g-1] <= t < edges[g].
    assert [groups.group_of(t) for t in (0.0, 21.0, 111.0, 450.9, 601.0, 999.0)] == [0, 0, 1, 1, 2, 3]
    uneven = TimestepGrouping.of([5.0, 4.0, 3.0, 2.0, 1.0], 4)
    assert [len(members) for members in uneven.timesteps] == [1, 1, 2, 1]  # group_edges' rounding
    assert len(TimestepGrouping.of([10.0, 20.0], 4)) == 2  # fewer distinct timesteps than groups


def test_abs_percentile_is_the_nearest_rank():
    values = torch.arange(1, 1001, dtype=torch.float32)  # 1..1000
    assert abs_percentile(values, 99.9) == 999.0
    assert abs_percentile(values, 100.0) == 1000.0
    assert abs_percentile(values, 50.0) == 500.0


# ------------------------------------------------------------------------------------ every architecture


def test_analyze_writes_every_layer_of_each_tiny_architecture(arch, tiny_folders, calibration_sets, tmp_path):
    calibration = _two_prompts(calibration_sets[arch][0])
    denoiser = _denoiser(tiny_folders[arch])
    architecture = architecture_of(denoiser)
    report = analyze_denoiser(denoiser, calibration, timestep_groups=4, progress=False)
    out = write_analysis(report, tmp_path / "analysis")
    document = _check_output_folder(out)

    names = _candidate_layers(denoiser)
    assert [layer["name"] for layer in document["layers"]] == names  # every layer, in module order
    distinct = sorted({record.timestep for record in calibration})
    assert len(document["timestep_groups"]) == min(4, len(distinct))
    assert sorted(t for group in document["timestep_groups"] for t in group["timesteps"]) == distinct

    for layer in document["layers"]:
        rule = next((r for r in architecture.default_ignore if fnmatch.fnmatchcase(layer["name"], r.pattern)), None)
        assert layer["default_ignore"] == (rule.reason if rule else None), layer["name"]
        if not layer["calls"]:
            continue
        assert sum(group["calls"] for group in layer["input_range_by_group"]) == layer["calls"]
        in_channels = layer["weight_shape"][1] if layer["type"] == "Conv2d" else layer["weight_shape"][-1]
        assert layer["channels"]["count"] == in_channels
        absmax = layer["input_range"]["absmax"]
        assert layer["channels"]["top"][0]["max_abs"] == pytest.approx(absmax)
        assert layer["sqnr_db"]["8"] > layer["sqnr_db"]["4"]
        if layer["type"] == "Conv2d":
            assert layer["tokens"] is None

    assert document["ranking"]["by"] == "median_channel" and document["ranking"]["bits"] == 4
    ranking = document["ranking"]["worst_first"]
    by_name = {layer["name"]: layer for layer in document["layers"]}
    keys = [(by_name[name]["sqnr_db_median_channel"]["4"], by_name[name]["sqnr_db"]["4"]) for name in ranking]
    assert keys == sorted(keys)
    assert set(ranking) | set(document["never_called"]) == set(names)
    if arch in ("sd15", "sdxl"):  # cross-attention keys / values read the text encoder's output itself
        readers = {layer["name"] for layer in document["layers"] if layer["reads_text_tokens"]}
        assert readers and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in readers)
        assert all(by_name[name]["tokens"]["token0_over_others"]["mean"] > 0 for name in readers)
        assert (out / "tokens_text_layers.png").is_file()


# ------------------------------------------------------------------------ numbers recomputed independently


def _captured_inputs(denoiser: nn.Module, name: str, calibration: CalibrationSet) -> list[tuple[float, torch.Tensor]]:
    """(timestep, input) of every call of layer ``name``, replaying one record at a time."""
    seen: list[torch.Tensor] = []
    handle = denoiser.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    captured = []
    try:
        for index, record in enumerate(calibration):
            before = len(seen)
            for _ in calibration.subset_by_index([index]).replay(denoiser, progress=False):
                pass
            captured += [(record.timestep, x) for x in seen[before:]]
    finally:
        handle.remove()
    return captured


def _sqnr_min_max_asymmetric(inputs: list[torch.Tensor], bits: int, channel_dim: int) -> tuple[float, float]:
    """Per-tensor asymmetric min-max fake quantization written out in float64, energies summed over calls:
    the tensor's SQNR and the median over channels of each channel's."""
    low = min(float(x.min()) for x in inputs)
    high = max(float(x.max()) for x in inputs)
    low, high = min(low, 0.0), max(high, 0.0)
    qmax = 2**bits - 1
    scale = (high - low) / qmax
    zero_point = min(max(round(-low / scale), 0), qmax)
    signal = noise = 0.0
    for x in inputs:
        x64 = x.double().movedim(channel_dim, -1)  # (..., C)
        q = torch.clamp(torch.round(x64 / scale) + zero_point, 0, qmax)
        error = ((q - zero_point) * scale - x64).square().reshape(-1, x64.shape[-1]).sum(0)  # (C,)
        energy = x64.square().reshape(-1, x64.shape[-1]).sum(0)  # (C,)
        noise, signal = noise + error, signal + energy
    per_channel = 10 * torch.log10(signal / noise)  # (C,)
    return 10 * math.log10(float(signal.sum() / noise.sum())), float(per_channel.median())


@pytest.mark.parametrize(
    "name", ["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "up_blocks.1.resnets.0.conv1"]
)
def test_statistics_match_inputs_captured_independently(name, tiny_folders, calibration_sets):
    calibration = _two_prompts(calibration_sets["sd15"][0])
    denoiser = _denoiser(tiny_folders["sd15"])
    report = analyze_denoiser(denoiser, calibration, timestep_groups=2, progress=False)
    layer = report.layer(name)
    captured = _captured_inputs(denoiser, name, calibration)
    inputs = [x for _, x in captured]
    assert layer.calls == len(captured) == len(calibration)

    channel_dim = 1 if isinstance(denoiser.get_submodule(name), nn.Conv2d) else -1
    for bits in (8, 4):
        tensor, median_channel = _sqnr_min_max_asymmetric(inputs, bits, channel_dim)
        assert layer.sqnr_db[bits] == pytest.approx(tensor, abs=0.01)
        assert layer.sqnr_db_median_channel[bits] == pytest.approx(median_channel, abs=0.01)
    # The rankings are these figures' orders.
    for by, figure in (("median_channel", "sqnr_db_median_channel"), ("tensor", "sqnr_db")):
        ranked = report.ranked(by=by)
        values = [getattr(r, figure)[4] for r in ranked]
        assert values == sorted(values)
        assert ranked.index(layer) == sum(value < getattr(layer, figure)[4] for value in values)

    for g, stats in enumerate(layer.by_group):
        members = [x for t, x in captured if report.groups.group_of(t) == g]
        assert stats.calls == len(members) > 0
        assert stats.min == min(float(x.min()) for x in members)
        assert stats.max == max(float(x.max()) for x in members)
        assert stats.absmax == max(float(x.abs().max()) for x in members)
        ranks = [-(-999 * x.numel() // 1000) - 1 for x in members]  # nearest rank of the 99.9th, 0-based
        nearest_rank = [float(x.abs().flatten().sort().values[r]) for x, r in zip(members, ranks, strict=True)]
        assert stats.percentile == pytest.approx(sum(nearest_rank) / len(members))

    per_channel = torch.stack(
        [x.abs().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).amax(0) for x in inputs]
    ).amax(0)
    assert torch.equal(layer.channels.max_abs, per_channel)
    assert layer.channels.ratio == pytest.approx(float(per_channel.max() / per_channel.median()))


# ------------------------------------------------------------------------------------------ planted outliers


def test_a_planted_outlier_channel_ranks_first_conv2d(tiny_folders, calibration_sets):
    calibration = _two_prompts(calibration_sets["sd15"][0])
    denoiser = _denoiser(tiny_folders["sd15"])
    name, channel = "down_blocks.1.resnets.0.conv1", 5

    def plant(_module, args):
        x = args[0].clone()  # (B, C, H, W)
        x[:, channel] *= 1000.0
        return (x,)

    handle = denoiser.get_submodule(name).register_forward_pre_hook(plant)
    try:
        report = analyze_denoiser(denoiser, calibration, progress=False)
    finally:
        handle.remove()
    worst = report.ranked()[0]
    assert worst.name == name
    assert worst.channels.top[0][0] == channel and worst.channels.ratio > 100
    # Every other channel rounds to the zero point: noise = signal, 0 dB, the floor of this figure. (Next comes
    # up_blocks.1.resnets.0.conv_shortcut at about 0.7 dB: its input concatenates the skip connection with the
    # upsampled features, channels of very different scales, which Q-Diffusion splits for this reason.)
    assert worst.sqnr_db_median_channel[4] == pytest.approx(0.0, abs=0.1)
    assert report.ranked()[1].sqnr_db_median_channel[4] > worst.sqnr_db_median_channel[4] + 0.2
    # Why the ranking does not use the tensor figure: the outlier carries nearly all the energy, so the tensor
    # SQNR of this layer looks better than that of the layers at the top of a tensor ranking.
    assert report.ranked(by="tensor")[0].name != name
    assert worst.sqnr_db[4] > report.ranked(by="tensor")[0].sqnr_db[4] + 3


def test_a_planted_outlier_channel_ranks_first_linear(tiny_folders, calibration_sets, tmp_path):
    """Row ``j`` of ``attn1.to_v`` scaled by 1000 scales channel ``j`` of the attention output, which is
    ``attn1.to_out.0``'s input: a real outlier channel made by the previous layer's weight."""
    calibration = _two_prompts(calibration_sets["sd15"][0])
    denoiser = _denoiser(tiny_folders["sd15"])
    block = "mid_block.attentions.0.transformer_blocks.0.attn1"
    channel = 7
    with torch.no_grad():
        to_v = denoiser.get_submodule(f"{block}.to_v")
        to_v.weight[channel] *= 1000.0
        if to_v.bias is not None:
            to_v.bias[channel] *= 1000.0
    report = analyze_denoiser(denoiser, calibration, progress=False)
    worst = report.ranked()[0]
    assert worst.name == f"{block}.to_out.0"
    assert worst.channels.top[0][0] == channel and worst.channels.ratio > 100
    document = _check_output_folder(write_analysis(report, tmp_path / "analysis"))
    assert document["ranking"]["worst_first"][0] == f"{block}.to_out.0"
    markdown = (tmp_path / "analysis" / "report.md").read_text()
    assert f"| 1 | `{block}.to_out.0` |" in markdown


def test_a_planted_token0_outlier_is_reported_for_cross_attention(tiny_folders, calibration_sets, tmp_path):
    calibration = _two_prompts(calibration_sets["sd15"][0])
    planted = CalibrationSet(
        [
            CalibrationRecord(
                {**r.inputs, "encoder_hidden_states": r.inputs["encoder_hidden_states"].clone()},
                r.prompt_index,
                r.step_index,
                r.timestep,
            )
            for r in calibration
        ],
        dict(calibration.info),
    )
    for record in planted:
        record.inputs["encoder_hidden_states"][:, 0] *= 50.0  # (B, T, C): token 0 of every prompt
    denoiser = _denoiser(tiny_folders["sd15"])
    plain = analyze_denoiser(denoiser, calibration, progress=False)
    report = analyze_denoiser(denoiser, planted, progress=False)
    readers = [layer for layer in report.layers if layer.reads_text_tokens]
    assert readers and all(layer.name.endswith(("attn2.to_k", "attn2.to_v")) for layer in readers)
    for layer in readers:
        assert layer.tokens.token0_over_others_mean > 10 * plain.layer(layer.name).tokens.token0_over_others_mean
        assert layer.tokens.top[0][0] == 0
    write_analysis(report, tmp_path / "analysis")
    markdown = (tmp_path / "analysis" / "report.md").read_text()
    assert ": an outlier (threshold" in markdown
    assert ": not an outlier (threshold" not in markdown


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_analyze_with_recorded_calibration_and_refuses_an_existing_out(
    tiny_folders, calibration_sets, tmp_path, capsys
):
    calibration = _two_prompts(calibration_sets["sd15"][0])
    calibration.save(tmp_path / "calib")
    out = tmp_path / "analysis"
    argv = ["--quiet", "analyze", tiny_folders["sd15"], "--calib", str(tmp_path / "calib"), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    document = _check_output_folder(out)
    worst = document["ranking"]["worst_first"][0]
    assert "worst 10 of" in printed and worst in printed

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err


def test_cli_analyze_refuses_bad_settings(tiny_folders, tmp_path, capsys):
    code = main(
        [
            "--quiet",
            "analyze",
            tiny_folders["sd15"],
            "--out",
            str(tmp_path / "a"),
            "--timestep-groups",
            "0",
            "--num-prompts",
            "1",
            "--steps",
            "2",
            "--num-timesteps",
            "1",
        ]
    )
    assert code == 2
    assert "timestep groups must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_analyze_a_bundled_model_calibrating_on_the_fly(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = ["--quiet", "analyze", "digits-sd", "--num-prompts", "2", "--steps", "4", "--num-timesteps", "2"]
    assert main(argv + ["--out", str(out)]) == 0
    document = _check_output_folder(out)
    assert document["architecture"]["name"] in ("sd15", "sdxl")
    assert document["calibration"]["records"] == 4 and document["calibration"]["prompts"] == 2
    assert len(document["layers"]) == len(document["ranking"]["worst_first"]) + len(document["never_called"])
    assert "analysed" in capsys.readouterr().out
