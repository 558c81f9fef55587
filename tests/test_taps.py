"""Calibration taps and the step clock: exact statistics, bounded memory, and every hook removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantdiff.calibration.taps import (
    Taps,
    accumulate_second_moments,
    input_rows,
    record_block_io,
    sample_layer_inputs,
)
from quantdiff.calibration.timestep import attach_step_clock, detach_step_clock, step_clock
from quantdiff.pipelines.loading import denoiser_of, load_pipeline


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_input_taps", {})) for m in model.modules()
    )


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Linear(12, 5), torch.randn(2, 7, 12)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 9, 9)),
        (nn.Conv2d(3, 4, 3, padding="same", dilation=2), torch.randn(1, 3, 6, 6)),
        (nn.Conv2d(4, 6, 1), torch.randn(4, 5, 5)),  # unbatched
    ],
)
def test_input_rows_are_what_the_weight_multiplies(layer, x):
    rows = input_rows(layer, x)  # (N, K)
    out = rows @ layer.weight.reshape(layer.weight.shape[0], -1).t() + layer.bias  # (N, C_out)
    channel = -3 if isinstance(layer, nn.Conv2d) else -1  # output channels of (N, C, H, W) / (C, H, W) / (..., C)
    expected = layer(x).movedim(channel, -1)
    expected = expected.reshape(-1, expected.shape[-1])  # (N, C_out), pixels in row-major order
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_second_moments_and_samples_on_a_real_denoiser(tiny_folders, calibration_sets):
    _, held_out = calibration_sets["sd15"]
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    names = ["down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with Taps(denoiser) as taps:
        for name in names:
            taps.on_layer_input(name, lambda x, name=name: seen[name].append(x.detach().clone()))
        for _ in held_out.replay(denoiser, progress=False):
            pass
    assert _hooks(denoiser) == 0
    moments = accumulate_second_moments(denoiser, names, held_out, progress=False)
    assert _hooks(denoiser) == 0
    for name in names:
        rows = torch.cat([input_rows(denoiser.get_submodule(name), x) for x in seen[name]]).double()
        assert moments[name].rows == rows.shape[0]
        torch.testing.assert_close(moments[name].total, rows.t() @ rows, rtol=1e-10, atol=1e-8)
        assert moments[name].mean.shape == (rows.shape[1], rows.shape[1])
    samples = sample_layer_inputs(denoiser, names, held_out, max_rows=50, progress=False)
    assert _hooks(denoiser) == 0
    for name in names:
        assert samples[name].shape[0] == 50
        full = torch.cat([input_rows(denoiser.get_submodule(name), x) for x in seen[name]])
        # every sampled row is one of the layer's real input rows
        assert all(torch.any(torch.all(full == row, dim=1)) for row in samples[name][:10])


def test_block_io_is_recorded_within_its_budget(tiny_folders, calibration_sets):
    calibration, _ = calibration_sets["sd3"]
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd3"]))[1]
    block = "transformer_blocks.0"
    everything = record_block_io(denoiser, block, calibration, progress=False)
    assert len(everything.calls) == len(calibration) and everything.skipped_records == 0
    call = everything.calls[0]
    encoder_out, hidden_out = call.output  # the joint block returns (encoder_hidden_states, hidden_states)
    assert hidden_out.shape == call.kwargs["hidden_states"].shape
    with torch.no_grad():
        again = denoiser.get_submodule(block)(*call.args, **call.kwargs)
    assert torch.equal(again[1], hidden_out)
    budget = everything.nbytes // len(calibration) * 3
    with pytest.warns(UserWarning, match=f"{len(calibration) - 3} of {len(calibration)} calibration records left out"):
        some = record_block_io(denoiser, block, calibration, max_bytes=budget, progress=False)
    assert len(some.calls) == 3 and some.nbytes <= budget and some.records == sorted(some.records)
    assert _hooks(denoiser) == 0


def test_a_failing_replay_still_removes_its_hooks(tiny_folders, calibration_sets):
    _, held_out = calibration_sets["sd15"]
    denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]

    def explode(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), Taps(denoiser) as taps:
        taps.on_layer_input("conv_in", explode)
        for _ in held_out.replay(denoiser, progress=False):
            pass
    assert _hooks(denoiser) == 0


@pytest.mark.parametrize("arch", ["sd15", "sd3", "pixart"])
def test_step_clock_reads_the_timestep_of_every_call(arch, tiny_folders, calibration_sets):
    _, held_out = calibration_sets[arch]
    denoiser = denoiser_of(load_pipeline(tiny_folders[arch]))[1]
    expected = [record.timestep for record in held_out]
    with step_clock(denoiser) as clock:
        seen = []
        for _ in held_out.replay(denoiser, progress=False):
            seen.append(clock.timestep)
    assert seen == pytest.approx(expected) and clock.calls == len(expected)
    assert _hooks(denoiser) == 0
    attached = attach_step_clock(denoiser)
    assert attach_step_clock(denoiser) is attached and _hooks(denoiser) == 1  # installed once
    detach_step_clock(denoiser)
    assert _hooks(denoiser) == 0
