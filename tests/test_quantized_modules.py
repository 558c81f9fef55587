"""Integer modules: storage dtypes and bytes, agreement with fake quantization, conv geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantdiff.nn import QuantizedConv2d, QuantizedLinear, dequantize_weight, quantize_weight
from quantdiff.plan import LayerPlan
from quantdiff.primitives import compute_qparams, fake_quantize, sqnr_db
from quantdiff.recipe import PRESETS, TensorSpec


def _plan(module, recipe) -> LayerPlan:
    return LayerPlan(
        "x",
        type(module).__name__,
        tuple(module.weight.shape),
        module.bias is not None,
        recipe.weights,
        recipe.activations,
        "test",
    )


def _convert(module, recipe, x):
    cls = QuantizedLinear if isinstance(module, nn.Linear) else QuantizedConv2d
    quantized = cls.like(module, _plan(module, recipe))
    quantized.set_weight(module.weight)
    quantized.bias.data.copy_(module.bias)
    if recipe.activations is not None:
        quantized.set_input_qparams(*compute_qparams(x.min(), x.max(), 8, False))
    return quantized


@pytest.mark.parametrize(
    "recipe, dtype, stored_bytes",
    [
        ("w8a8", torch.int8, 96 * 320),  # one byte per weight
        ("w4a16", torch.uint8, 96 * 160),  # two weights per byte
    ],
)
def test_storage_is_integer_with_expected_bytes(recipe, dtype, stored_bytes):
    linear = nn.Linear(320, 96)
    quantized = _convert(linear, PRESETS[recipe], torch.randn(4, 320))
    assert quantized.weight_q.dtype == dtype
    assert quantized.weight_q.numel() * quantized.weight_q.element_size() == stored_bytes
    assert not any(
        p.is_floating_point() and p.numel() == linear.weight.numel() for p in quantized.state_dict().values()
    )
    expected_groups = 1 if recipe == "w8a8" else 3  # ceil(320 / 128)
    assert tuple(quantized.weight_scale.shape) == (96, expected_groups)


def test_group_padding_for_ragged_reduction():
    # conv 3x3 with 20 input channels: K = 180, not a multiple of 128 -> 2 groups; padding is not stored
    spec = TensorSpec(4, True, "group", 128, "minmax")
    weight = torch.randn(8, 20, 3, 3)
    weight_q, scale, zero_point = quantize_weight(weight, spec)
    assert weight_q.shape == (8, 90) and scale.shape == (8, 2) and zero_point is None  # 180 values packed
    restored = dequantize_weight(weight_q, scale, zero_point, spec, weight.shape)
    assert restored.shape == weight.shape
    assert sqnr_db(weight, restored) > 14


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False), (2, False), (6, True)])
def test_weight_round_trip_matches_fake_quantization(bits, symmetric):
    weight = torch.randn(16, 48)
    spec = TensorSpec(bits, symmetric, "channel", observer="minmax")
    weight_q, scale, zero_point = quantize_weight(weight, spec)
    restored = dequantize_weight(weight_q, scale, zero_point, spec, weight.shape)
    # min-max quantization per output channel, written out in float64: the grid covers [min, max] (symmetric:
    # [-absmax, absmax] on 2^(b-1) - 1 steps each side; asymmetric: 2^b - 1 steps with an integer zero point)
    w = weight.double()
    low, high = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        step = torch.maximum(-low, high) / q_max
        expected = (w / step).round().clamp(-q_max - 1, q_max) * step
    else:
        step = (high - low) / (2**bits - 1)
        zero = (-low / step).round()
        expected = ((w / step).round() + zero).clamp(0, 2**bits - 1).sub(zero) * step
    assert restored.dtype == torch.float32 and restored.shape == weight.shape
    torch.testing.assert_close(restored.double(), expected, rtol=0, atol=1e-6)
    assert (restored.double() - w).abs().max() <= step.max() / 2 + 1e-6  # within half a step of the weight


def test_linear_forward_is_fake_quant_of_input_and_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    quantized = _convert(linear, PRESETS["w8a8-minmax"], x)
    s_in, z_in = compute_qparams(x.min(), x.max(), 8, False)
    s_w, _ = compute_qparams(*linear.weight.aminmax(dim=1), 8, True)
    x_fq = fake_quantize(x, s_in, z_in, 8, False)
    w_fq = fake_quantize(linear.weight, s_w[:, None], torch.zeros_like(s_w[:, None], dtype=torch.int32), 8, True)
    expected = F.linear(x_fq, w_fq, linear.bias)
    torch.testing.assert_close(quantized(x), expected, rtol=0, atol=1e-6)
    assert sqnr_db(linear(x), quantized(x)) > 30


@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 1, 1), (1, 0, 4)])
def test_conv_keeps_geometry_and_accuracy(stride, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=padding, groups=groups)
    x = torch.randn(2, 16, 12, 12)
    quantized = _convert(conv, PRESETS["w8a8"], x)
    assert quantized(x).shape == conv(x).shape
    assert sqnr_db(conv(x), quantized(x)) > 30
    quantized_w4 = _convert(conv, PRESETS["w4a16"], x)
    assert 10 < sqnr_db(conv(x), quantized_w4(x)) < sqnr_db(conv(x), quantized(x))


def test_weight_shape_mismatch_is_refused():
    quantized = QuantizedLinear.like(nn.Linear(8, 4), _plan(nn.Linear(8, 4), PRESETS["w8a16"]))
    with pytest.raises(ValueError, match="weight shape"):
        quantized.set_weight(torch.randn(4, 9))
