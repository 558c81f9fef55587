"""The packed-weight kernels (quantdiff.nn.kernels.packed): 4-bit weights kept packed and computed on AMX int8
tiles, per channel and per group, Linear and Conv2d, against exact float64 integer math; weight-only layers
dequantized per call; and the reason of every fallback, decided from constructed support descriptions.

The kernel tests skip where the extension cannot run here (no AMX-INT8, no compiler) with that reason; under
CI=true on a CPU that has AMX-INT8 they fail instead, so a broken build cannot turn them into skips.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_check import EXACT_DB, IN_CI
from quantized_layers import quantized_like
from torch import nn

from quantdiff.nn.kernels import KernelInputs, select_kernel
from quantdiff.nn.kernels.packed import (
    DequantizeKernel,
    PackedBackend,
    PackedSupport,
    _cpu_flags,
    pack_tiles,
    packed_support,
    reduction_order,
    unpack_tiles,
)
from quantdiff.nn.quantized import QUANTIZED_CLASSES
from quantdiff.plan import LayerPlan
from quantdiff.primitives import quantize, sqnr_db, unpack_int4
from quantdiff.recipe import PRESETS, Recipe, TensorSpec

SUPPORT = packed_support()
AMX_CPU = {"amx_int8", "amx_tile", "avx512bw"} <= _cpu_flags()
needs_amx = pytest.mark.skipif(
    not (SUPPORT.amx or (IN_CI and AMX_CPU)), reason=f"packed kernels cannot run here: {SUPPORT.reason}"
)
needs_extension = pytest.mark.skipif(
    not (SUPPORT.dequantize or IN_CI), reason=f"packed kernels cannot run here: {SUPPORT.reason}"
)

A8 = PRESETS["w8a8"].activations  # asymmetric static per-tensor uint8 inputs
PER_CHANNEL = TensorSpec(4, True, "channel", observer="minmax")
GROUP64 = TensorSpec(4, True, "group", group_size=64, observer="minmax")
GROUP128 = TensorSpec(4, True, "group", group_size=128, observer="minmax")
WEIGHTS = {"channel": PER_CHANNEL, "group64": GROUP64, "group128": GROUP128, "int8 channel": PRESETS["w8a8"].weights}
# weight-only formats with min-max ranges (the presets' range search is slow and changes nothing here)
WEIGHT_ONLY = {"w4a16": Recipe("w4a16", GROUP128, None), "w8a16": PRESETS["w8a16"]}


def _layer_and_input(kind: str, shape: tuple, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        k, n, tokens = shape
        layer, x = nn.Linear(k, n), torch.randn(2, tokens, k)  # (B, T, K)
    else:
        c_in, c_out, kernel, stride, padding, hw = shape
        layer, x = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding), torch.randn(2, c_in, hw, hw)
        x = F.silu(1.5 * x)  # one-sided, zero point near 0
    with torch.no_grad():  # bell-shaped like trained weights
        layer.weight.normal_(0.0, layer.weight[0].numel() ** -0.5)
    return layer.eval(), x


def exact_output(quantized, x: torch.Tensor) -> torch.Tensor:
    """What an exact kernel computes, in float64: ``sum_g s[c, g] * sum_{k in g} (q_x - z) * q_w`` (scale per
    group or per channel) ``* s_x + bias``, with ``q_x`` the reference path's integers."""
    spec = quantized.input_spec
    q = quantize(x, quantized.input_scale, quantized.input_zero_point, spec.bits, spec.symmetric)
    q = q.double() - float(quantized.input_zero_point)
    shape = quantized.weight_shape
    k = math.prod(shape[1:])
    stored = quantized.integer_weight()
    weight = (unpack_int4(stored, k, signed=True) if quantized.weight_spec.packed else stored).double()  # (C_out, K)
    scale = quantized.weight_scale.double()  # (C_out, G)
    groups = scale.shape[1]
    cols = quantized.weight_spec.group_size if groups > 1 else k
    weight = F.pad(weight, (0, groups * cols - k)).reshape(shape[0], groups, cols) * scale[..., None]
    weight = weight.reshape(shape[0], -1)[:, :k].reshape(shape) * float(quantized.input_scale)
    bias = None if quantized.bias is None else quantized.bias.double()
    if len(shape) == 2:
        return F.linear(q, weight, bias)
    return F.conv2d(q, weight, bias, quantized.stride, quantized.padding, quantized.dilation, quantized.groups)


LAYERS = {
    # tiny: K not a multiple of 64, odd sizes, strides
    "linear 77->40": ("linear", (77, 40, 9)),
    "linear 200->24": ("linear", (200, 24, 5)),
    "conv 6->8 3x3 @7": ("conv", (6, 8, 3, 1, 1, 7)),
    "conv 5->8 3x3 s2 @9": ("conv", (5, 8, 3, 2, 1, 9)),
    # SD1.5 sizes (down block 0 / 1 at a 16x16 latent)
    "linear 320->1280, 64 tokens": ("linear", (320, 1280, 64)),
    "linear 1280->320, 77 tokens": ("linear", (1280, 320, 77)),
    "conv 320->320 3x3 @16": ("conv", (320, 320, 3, 1, 1, 16)),
    "conv 320->640 3x3 s2 @16": ("conv", (320, 640, 3, 2, 1, 16)),
    "conv 640->320 1x1 @16": ("conv", (640, 320, 1, 1, 0, 16)),
}


@needs_amx
@pytest.mark.parametrize("granularity", list(WEIGHTS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_packed_int4_matches_exact_integer_math(name, granularity):
    layer, x = _layer_and_input(*LAYERS[name])
    quantized = quantized_like(layer, x, Recipe("w4a8", WEIGHTS[granularity], A8))
    stored = quantized.weight_q.clone()
    with torch.no_grad():
        reference = quantized(x)
        decision = quantized.set_execution("integer")  # auto: the packed backend takes these weights on AMX
        packed = quantized(x)
    assert decision.path == "integer" and "packed, int8 AMX kernel" in decision.reason and not decision.widened
    assert packed.shape == reference.shape and packed.is_contiguous()  # NCHW in, NCHW out, like nn.Conv2d
    exact = exact_output(quantized, x)
    measured = sqnr_db(exact, packed.double())
    print(
        f"{name} {granularity}: packed vs exact {measured:.1f} dB, reference vs exact "
        f"{sqnr_db(exact, reference.double()):.1f} dB"
    )
    assert measured >= EXACT_DB, (name, granularity, measured)
    assert sqnr_db(exact, reference.double()) >= EXACT_DB  # the same integers on both paths
    assert torch.equal(quantized.integer_weight(), stored)  # read back from the packed tiles bit for bit


@needs_amx
def test_weights_stay_packed_in_integer_mode():
    """0.5 byte per weight plus int16 group sums: the tiles replace weight_q, the scales stay the layer's."""
    c_in, c_out = 1280, 1280
    layer, x = _layer_and_input("conv", (c_in, c_out, 3, 1, 1, 8))
    quantized = quantized_like(layer, x, Recipe("w4a8", GROUP128, A8))
    stored, state = quantized.weight_q.clone(), {k: v.clone() for k, v in quantized.state_dict().items()}
    quantized.set_execution("integer")
    weights = c_out * c_in * 9
    assert quantized.weight_q is None and not quantized.holds_weight_q
    groups = math.ceil(c_in * 9 / 128)
    assert quantized.kernel_bytes <= weights // 2 + 2 * c_out * groups + 16 * 9 * groups + 64
    assert quantized.kernel_bytes / (4 * weights) <= 0.13  # vs fp32
    saved = quantized.state_dict()  # the folder is the same in either mode
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert torch.equal(copy.deepcopy(quantized).weight_q, stored)
    quantized.set_execution("reference")
    assert torch.equal(quantized.weight_q, stored)


@needs_amx
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_symmetric_inputs_per_call_scales_and_nan(kind):
    shape = (200, 48, 11) if kind == "linear" else (24, 40, 3, 1, 1, 6)
    layer, x = _layer_and_input(kind, shape)
    symmetric = TensorSpec(8, True, "tensor", observer="minmax")
    quantized = quantized_like(layer, x, Recipe("w4a8", GROUP64, symmetric))
    with torch.no_grad():
        quantized.set_execution("integer")
        assert sqnr_db(exact_output(quantized, x), quantized(x).double()) >= EXACT_DB  # shifted into uint8 by 128
        # a call's own (scale, zero point), as timestep groups pass them: the same as a layer holding that scale
        scale, zero_point = 0.5 * float(quantized.input_scale), int(quantized.input_zero_point)
        per_call = quantized._kernel(x, quantized.bias, (scale, zero_point))
        quantized.set_input_qparams(torch.tensor(scale), torch.tensor(zero_point))
        assert sqnr_db(exact_output(quantized, x), per_call.double()) >= EXACT_DB
        nan = x.clone()
        nan.view(-1)[5] = float("nan")
        assert torch.isnan(quantized(nan)).all()  # NaN has no integer image: the kernel answers NaN


@needs_amx
@pytest.mark.parametrize("kind", ["linear", "conv", "conv channels-last"])
def test_quantized_uint8_inputs_give_the_same_output(kind):
    """Under torch.compile the layer hands the op an input already quantized (inductor fuses the quantization
    into the op that produces it): the op reads uint8 and computes the same integers."""
    layer, x = _layer_and_input(*(("linear", (200, 48, 11)) if kind == "linear" else ("conv", (40, 24, 3, 1, 1, 9))))
    if kind == "conv channels-last":
        x = x.to(memory_format=torch.channels_last)
    quantized = quantized_like(layer, x, Recipe("w4a8", GROUP64, A8))
    quantized.set_execution("integer")
    kernel = quantized._kernel
    q = quantize(x, quantized.input_scale, quantized.input_zero_point, 8, False)  # uint8, x's memory format
    with torch.no_grad():
        from_float = quantized(x)
        ops = torch.ops.quantdiff_packed
        if kind == "linear":
            args = (kernel.tiles, kernel.scales, kernel.rowsums, kernel.shape[0], kernel.group_cols, kernel.bits)
            from_uint8 = ops.packed_linear(q, *args, kernel.x_scale, kernel.x_zp, 0, 255, quantized.bias)
        else:
            from_uint8 = ops.packed_conv2d(
                q,
                kernel.tiles,
                kernel.scales,
                kernel.rowsums,
                kernel.segments,
                kernel.shape[0],
                [3, 3],
                kernel.stride,
                kernel.padding,
                kernel.dilation,
                kernel.group_cols,
                kernel.bits,
                kernel.x_scale,
                kernel.x_zp,
                0,
                255,
                quantized.bias,
            )
    assert from_uint8.dtype == torch.float32 and torch.equal(from_uint8, from_float)


@needs_amx
def test_channels_last_and_unbatched_conv_inputs():
    layer, x = _layer_and_input("conv", (40, 24, 3, 1, 1, 9))
    quantized = quantized_like(layer, x, Recipe("w4a8", GROUP64, A8))
    quantized.set_execution("integer")
    exact = exact_output(quantized, x)
    with torch.no_grad():
        channels_last = quantized(x.to(memory_format=torch.channels_last))
        unbatched = quantized(x[0])
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert sqnr_db(exact, channels_last.double()) >= EXACT_DB
    assert sqnr_db(exact[0], unbatched.double()) >= EXACT_DB


def test_reduction_order_groups_and_tiles():
    """The kernel's K order keeps each group's columns together and one tap's channels contiguous; the tile
    layout round-trips."""
    shape = (8, 20, 3, 3)  # K = 180: groups of 64 cut through the taps of one channel
    source, cols, k_pad = reduction_order(shape, 64)
    assert (cols, k_pad) == (64, 192)
    valid = source[source >= 0]
    assert sorted(valid.tolist()) == list(range(180))  # a permutation, padding at the end of the last group
    assert all((source[g * 64 : (g + 1) * 64][source[g * 64 : (g + 1) * 64] >= 0] // 64 == g).all() for g in range(3))
    first = source[:64]  # group 0, tap-major: tap 0's channels 0..7 (k = 0, 9, ..., 63), then tap 1's ...
    assert first[:8].tolist() == [9 * c for c in range(8)]
    linear_source, linear_cols, linear_pad = reduction_order((24, 77), None)
    assert linear_cols == linear_pad == 128 and linear_source[:77].tolist() == list(range(77))
    weight = torch.randint(-8, 8, (64, 192), dtype=torch.int8)
    for bits in (4, 8):
        assert torch.equal(unpack_tiles(pack_tiles(weight, bits)), weight)
    assert pack_tiles(weight, 4).numel() == weight.numel() // 2


# Constructed descriptions: the decision runs on any machine (no kernel is built or called).
NO_BUILD = PackedSupport(False, False, "the C++ extension did not build (OSError: no C++ compiler: g++ not found)")
NO_AMX = PackedSupport(False, True, "this CPU has no AMX-INT8 (of avx512bw, amx_tile, amx_int8 it has none)")
AMX_BF16 = PackedSupport(True, True, "", bf16=True)
AMX_FP32 = PackedSupport(True, True, "", bf16=False)


def _inputs(kind: str, shape: tuple, recipe: Recipe) -> KernelInputs:
    layer, x = _layer_and_input(kind, shape)
    if recipe.activations is None or not recipe.activations.dynamic:
        return quantized_like(layer, x, recipe).kernel_inputs()
    plan = LayerPlan("layer", "Linear", tuple(layer.weight.shape), True, recipe.weights, recipe.activations, "test")
    quantized = QUANTIZED_CLASSES["Linear"].like(layer, plan)  # dynamic inputs: no stored input scale
    quantized.set_weight(layer.weight.detach())
    return quantized.kernel_inputs()


def test_decisions_and_fallback_reasons():
    backend = PackedBackend()
    w4a8 = _inputs("linear", (320, 64, 8), Recipe("w4a8", GROUP128, A8))
    w4a16 = _inputs("linear", (320, 64, 8), WEIGHT_ONLY["w4a16"])
    conv = _inputs("conv", (24, 40, 3, 1, 1, 6), Recipe("w4a8", GROUP64, A8))
    # the extension did not build: every layer keeps its other path, and says why
    for inputs in (w4a8, conv):
        refused = backend.decide(inputs, NO_BUILD)
        assert refused.path == "reference" and "the C++ extension did not build" in refused.reason, refused
    refused = backend.decide(w4a16, NO_BUILD)
    assert refused.path == "reference" and refused.reason.startswith("reference: weight-only layer: the C++ extension")
    # no AMX: weight-only layers still run (the dequantize kernel needs no AMX), int8-input layers do not
    assert backend.decide(w4a8, NO_AMX).reason == f"reference: packed kernel: {NO_AMX.reason}"
    assert backend.decide(w4a16, NO_AMX).path == "integer"
    # with AMX: 4-bit per group and per channel, Linear and Conv2d
    assert backend.decide(w4a8, AMX_FP32).reason == "int4 group128 packed, int8 AMX kernel"
    assert backend.decide(conv, AMX_FP32).reason == "int4 group64 packed, int8 AMX kernel"
    channel = _inputs("linear", (320, 64, 8), Recipe("w4a8-channel", PER_CHANNEL, A8))
    assert backend.decide(channel, AMX_FP32).reason == "int4 per channel packed, int8 AMX kernel"
    # weight-only: bf16 where the caller allows it and the CPU computes it natively, else fp32 (bit-identical)
    allow_bf16 = dataclasses.replace(w4a16, float_dtype=torch.bfloat16)
    assert "computed in bf16" in backend.decide(allow_bf16, AMX_BF16).reason
    assert "bit-identical" in backend.decide(allow_bf16, AMX_FP32).reason
    assert "bit-identical" in backend.decide(w4a16, AMX_BF16).reason
    # what the kernel does not take, named
    cases = {
        "group size 32": Recipe("g32", TensorSpec(4, True, "group", group_size=32), A8),
        "per-token input scales": Recipe("token", GROUP128, TensorSpec(8, False, "token", dynamic=True)),
        "asymmetric weights": Recipe("asym", TensorSpec(4, False, "group", group_size=128), A8),
    }
    for reason, recipe in cases.items():
        decision = backend.decide(_inputs("linear", (256, 32, 4), recipe), AMX_FP32)
        assert decision.path == "reference" and reason in decision.reason, decision
    torch.manual_seed(0)
    grouped = quantized_like(
        nn.Conv2d(8, 16, 3, padding=1, groups=2), torch.randn(1, 8, 5, 5), Recipe("g", GROUP64, A8)
    )
    assert "grouped convolution (groups=2)" in backend.decide(grouped.kernel_inputs(), AMX_FP32).reason
    # auto offers the packed backend 4-bit, per-group and weight-only layers, and on AMX CPUs int8 per-channel
    # layers with one input scale per call; per-token inputs are oneDNN's
    int8 = _inputs("linear", (256, 32, 4), PRESETS["w8a8"])
    token = _inputs("linear", (256, 32, 4), PRESETS["w8a6"])
    assert backend.claims(w4a8) and backend.claims(w4a16) and backend.claims(channel) and not backend.claims(token)
    assert backend.claims(int8) == packed_support().amx


@needs_amx
def test_auto_falls_back_to_onednn_with_the_reason():
    """Per-channel 4-bit weights the packed kernel refuses run on oneDNN widened to int8, the reason appended;
    what neither takes keeps the reference path with both reasons."""
    channel = _inputs(
        "linear", (256, 32, 4), Recipe("w4a8-channel", PER_CHANNEL, TensorSpec(8, False, "token", dynamic=True))
    )
    kernel, decision = select_kernel(channel, "auto")
    assert decision.path == "integer" and decision.widened and "int4 weights widened to int8" in decision.reason
    assert "(packed kernel: per-token input scales" in decision.reason
    group = _inputs("linear", (256, 32, 4), Recipe("g32", TensorSpec(4, True, "group", group_size=32), A8))
    kernel, decision = select_kernel(group, "auto")
    assert kernel is None and decision.path == "reference"
    assert "the kernel takes one scale per output channel" in decision.reason and "group size 32" in decision.reason


@needs_extension
@pytest.mark.parametrize("recipe", ["w4a16", "w8a16"])
@pytest.mark.parametrize(
    "kind, shape", [("linear", (320, 1280, 64)), ("conv", (320, 320, 3, 1, 1, 16)), ("linear", (77, 40, 9))]
)
def test_weight_only_layers(recipe, kind, shape):
    """fp32: bit-identical to the reference path; bf16: within 45 dB of it (51 dB measured at SD sizes)."""
    layer, x = _layer_and_input(kind, shape)
    quantized = quantized_like(layer, x, WEIGHT_ONLY[recipe])
    stored = quantized.weight_q.clone()
    with torch.no_grad():
        reference = quantized(x)
        inputs = quantized.kernel_inputs()
        op = quantized._op
        exact = DequantizeKernel(inputs, op, torch.float32)(x, quantized.bias)
        bf16 = DequantizeKernel(inputs, op, torch.bfloat16)(x, quantized.bias)
        decision = quantized.set_execution("integer")  # a layer alone: fp32 unless bf16 is asked for
        served = quantized(x)
        asked_bf16 = quantized.set_execution("integer", weight_only_dtype=torch.bfloat16)
        served_bf16 = quantized(x)
    assert torch.equal(exact, reference)
    assert bf16.dtype == torch.float32 and sqnr_db(reference.double(), bf16.double()) >= 45
    assert decision.path == "integer" and decision.reason.startswith("weight-only") and "fp32" in decision.reason
    assert torch.equal(served, reference)
    assert asked_bf16.path == "integer" and ("bf16" in asked_bf16.reason) == SUPPORT.bf16
    assert torch.equal(served_bf16, bf16 if SUPPORT.bf16 else reference)
    assert quantized.weight_q is None and quantized.kernel_bytes == stored.numel()  # no float copy held
    assert torch.equal(quantized.integer_weight(), stored)
