"""Activations kept channels-last between convolutions (quantdiff.nn.execution.use_activation_layout): the
packed convolution hands back its channels-last output without a copy, bit for bit the values of the NCHW
output; a whole tiny SD1.5 UNet stays channels-last between its convolutions, returns NCHW, and agrees with
its NCHW run; the layout is undone by ``use_reference`` and kept NCHW, with the reason, where no convolution
runs the packed kernel.

The kernel tests skip where the packed AMX kernels cannot run here, with the reason (under CI=true on a CPU
with AMX-INT8 they fail instead, as in tests/test_int4_kernels.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kernel_check import IN_CI
from quantized_layers import quantized_like
from torch import nn

from quantdiff.nn import (
    QuantizedConv2d,
    activation_layout,
    execution_summary,
    use_activation_layout,
    use_integer_kernels,
    use_reference,
)
from quantdiff.nn.kernels.packed import _cpu_flags, packed_support
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUPPORT = packed_support()
AMX_CPU = {"amx_int8", "amx_tile", "avx512bw"} <= _cpu_flags()
needs_amx = pytest.mark.skipif(
    not (SUPPORT.amx or (IN_CI and AMX_CPU)), reason=f"packed kernels cannot run here: {SUPPORT.reason}"
)
W8A8 = PRESETS["w8a8"]


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _conv_and_input(c_in: int, c_out: int, kernel: int, stride: int, hw: int) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
    with torch.no_grad():  # bell-shaped like trained weights
        conv.weight.normal_(0.0, conv.weight[0].numel() ** -0.5)
    return conv.eval(), F.silu(1.5 * torch.randn(2, c_in, hw, hw))  # (N, C, H, W)


@needs_amx
@pytest.mark.parametrize("input_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape", [(40, 24, 3, 1, 9), (64, 32, 3, 2, 10), (48, 80, 1, 1, 6)], ids=["3x3", "3x3 s2", "1x1"]
)
def test_packed_conv_hands_back_its_channels_last_output_bit_for_bit(shape, input_layout):
    conv, x = _conv_and_input(*shape)
    if input_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    quantized = quantized_like(conv, x, W8A8)
    quantized.set_execution("integer")
    assert "packed" in quantized.execution_decision().reason
    with torch.no_grad():
        as_conv2d = quantized(x)  # nn.Conv2d's layout: NCHW in, NCHW out
        quantized.channels_last_output = True
        kept = quantized(x)
        unbatched = quantized(x[0])  # (C, H, W): nn.Conv2d's layout whatever the flag
    assert _channels_last(kept) and torch.equal(kept, as_conv2d)
    assert as_conv2d.is_contiguous() == (input_layout == "nchw")
    assert unbatched.dim() == 3 and torch.equal(unbatched, as_conv2d[0])


def test_auto_keeps_nchw_with_the_reason_where_no_convolution_runs_the_packed_kernel():
    conv, x = _conv_and_input(8, 16, 3, 1, 6)
    model = nn.Sequential(quantized_like(conv, x, W8A8), nn.SiLU())
    summary = use_integer_kernels(model, backend="onednn")  # oneDNN (or the reference path): no packed kernel
    assert summary.layout == "nchw" and "no convolution runs the packed AMX kernel" in summary.layout_reason
    assert not model[0].channels_last_output and not model._forward_hooks
    with pytest.raises(ValueError, match="layout='nhwc' is unknown"):
        use_activation_layout(model, "nhwc")
    assert use_activation_layout(nn.Sequential(nn.Linear(4, 4))) == (None, "")


@needs_amx
def test_tiny_sd15_unet_stays_channels_last_and_agrees_with_nchw(tiny_folders, calibration_sets):
    calibration, held_out = calibration_sets["sd15"]
    _, denoiser = denoiser_of(load_pipeline(tiny_folders["sd15"]))
    fp_out = torch.cat(list(held_out.replay(denoiser, progress=False)))
    quantize_denoiser(denoiser, "w8a8", calibration, progress=False)

    nchw = use_integer_kernels(denoiser, layout="nchw")
    assert nchw.layout == "nchw" and nchw.layout_reason == ""
    assert not denoiser._forward_hooks and not denoiser._forward_pre_hooks
    nchw_out = torch.cat(list(held_out.replay(denoiser, progress=False)))

    summary = use_integer_kernels(denoiser)  # auto: the convolutions run the packed kernel here
    assert summary.layout == "channels_last" and "channels-last" in summary.format(max_layers=0)
    assert execution_summary(denoiser).layout == "channels_last" == activation_layout(denoiser)
    layouts = {}

    def record(name):
        def hook(module, args, y) -> None:  # returns None: the output is not replaced
            layouts.setdefault(name, (_channels_last(args[0]), _channels_last(y)))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in denoiser.named_modules()
        if isinstance(module, QuantizedConv2d)
    ]
    outputs = list(held_out.replay(denoiser, progress=False))
    for hook in hooks:
        hook.remove()
    channels_last_out = torch.cat(outputs)
    assert all(out.is_contiguous() for out in outputs)  # callers get NCHW back from the model
    assert all(output for _, output in layouts.values()), layouts  # every convolution's output
    # inputs: channels-last except Transformer2DModel's proj_out (diffusers makes its input contiguous NCHW);
    # conv_in and conv_out stay float here, and the latent is made channels-last before conv_in
    nchw_inputs = sorted(name for name, (given, _) in layouts.items() if not given)
    assert nchw_inputs and all(name.endswith("proj_out") for name in nchw_inputs), nchw_inputs
    # not bit for bit: channels-last GroupNorm sums in another order, and a chaotic model amplifies 1-ulp
    # differences (the reference against itself at 1 vs 2 threads: ~30 dB at a tiny UNet's output)
    assert sqnr_db(nchw_out, channels_last_out) >= 30  # measured 40 dB
    assert sqnr_db(fp_out, channels_last_out) >= sqnr_db(fp_out, nchw_out) - 1.0

    copied = copy.deepcopy(denoiser)  # the copy's hooks are its own: undoing them leaves the original's
    assert use_reference(copied).layout == "nchw" and not copied._forward_hooks and not copied._forward_pre_hooks
    assert denoiser._forward_hooks and denoiser._forward_pre_hooks

    back = use_reference(denoiser)
    assert back.layout == "nchw" and not denoiser._forward_hooks and not denoiser._forward_pre_hooks
    assert not any(m.channels_last_output for m in denoiser.modules() if isinstance(m, QuantizedConv2d))
    use_integer_kernels(denoiser, layout="nchw")
    assert torch.equal(torch.cat(list(held_out.replay(denoiser, progress=False))), nchw_out)
