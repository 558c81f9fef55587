"""When the oneDNN int8 kernel tests run, and the exact integer math they are checked against.

A test that needs the kernels skips only where the four oneDNN ops are missing from this torch build. Where
they exist but :func:`kernel_support`'s self-check fails (a wiring bug, or a CPU the ops do not support),
the tests run under ``CI=true`` and fail, so a broken kernel cannot turn them into skips; elsewhere they skip
with the self-check's reason.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from quantdiff.nn import kernel_support
from quantdiff.nn.kernels.onednn import _OPS
from quantdiff.primitives import quantize, unpack_int4

SUPPORT = kernel_support()
OPS_MISSING = [name for name in _OPS if not hasattr(torch.ops.onednn, name)]
IN_CI = os.environ.get("CI") == "true"

KERNELS_EXPECTED = not OPS_MISSING and (SUPPORT.available or IN_CI)
"""The kernel tests and guarded blocks run: the ops exist and either pass the self-check or this is CI."""

needs_kernels = pytest.mark.skipif(
    not KERNELS_EXPECTED,
    reason=f"oneDNN int8 ops missing: {OPS_MISSING}"
    if OPS_MISSING
    else f"oneDNN int8 self-check failed (a failure under CI=true): {SUPPORT.reason}",
)


def exact_integer_output(quantized, x: torch.Tensor) -> torch.Tensor:
    """What an exact int8 kernel computes for a static per-tensor-input layer, in float64 integer math:
    ``sum((q_x - z) * q_w) * s_x * s_w[c] + bias``, with ``q_x`` the reference path's integers."""
    assert not quantized.extras, quantized.extras
    spec = quantized.input_spec
    q = quantize(x, quantized.input_scale, quantized.input_zero_point, spec.bits, spec.symmetric)
    q = q.double() - float(quantized.input_zero_point)
    weight = quantized.integer_weight()
    shape = quantized.weight_shape
    if quantized.weight_spec.packed:
        weight = unpack_int4(weight, int(torch.Size(shape[1:]).numel()), signed=True)
    weight = weight.double().reshape(shape)
    scale = float(quantized.input_scale) * quantized.weight_scale.double().reshape(-1)  # (C_out,)
    bias = None if quantized.bias is None else quantized.bias.double()
    if len(shape) == 2:
        return F.linear(q, weight) * scale + (0 if bias is None else bias)
    y = F.conv2d(q, weight, None, quantized.stride, quantized.padding, quantized.dilation, quantized.groups)
    channel = (-1, 1, 1)
    return y * scale.reshape(channel) + (0 if bias is None else bias.reshape(channel))


EXACT_DB = 120
"""An exact kernel differs from float64 integer math only by the fp32 rounding of its rescale (110-135 dB
per layer); one whose int16 pair sums saturate is 14-46 dB off."""


def kernel_vs_reference_db(denoiser, name: str, calibration) -> float:
    """SQNR of layer ``name`` of a loaded quantized ``denoiser`` on the integer path against its reference path,
    on the input it sees in the first record of ``calibration`` (captured with taps before the switch)."""
    from quantdiff.calibration.taps import Taps
    from quantdiff.nn import use_integer_kernels
    from quantdiff.primitives import sqnr_db

    inputs = []
    with Taps(denoiser) as taps:
        taps.on_block(name, lambda call: inputs.append(call.args[0].detach().clone()))
        list(calibration.subset_by_index([0]).replay(denoiser, progress=False))
    summary = use_integer_kernels(denoiser, attention="float32")
    assert name in {layer.name for layer in summary.integer}, summary.format()
    module = denoiser.get_submodule(name)
    with torch.no_grad():
        return sqnr_db(module.reference_forward(inputs[0]), module(inputs[0]))
