"""Tests of quantdiff.primitives against hand-computed values."""

import math

import pytest
import torch

from quantdiff.primitives import (
    channel_group_ranges,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_channel_groups,
    group_rows,
    integer_range,
    pack_int4,
    quantize,
    round_ste,
    sqnr_db,
    ungroup_rows,
    unpack_int4,
)


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# --- integer_range -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "symmetric", "expected"),
    [
        (2, True, (-2, 1)),
        (2, False, (0, 3)),
        (4, True, (-8, 7)),
        (4, False, (0, 15)),
        (8, True, (-128, 127)),
        (8, False, (0, 255)),
    ],
)
def test_integer_range(bits, symmetric, expected):
    assert integer_range(bits, symmetric) == expected


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, True, "8"])
def test_integer_range_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        integer_range(bits, True)


# --- compute_qparams -----------------------------------------------------------------------------


def test_compute_qparams_symmetric_8bit():
    # a = max(|-0.5|, |1.27|) = 1.27; scale = 1.27 / 127 = 0.01.
    scale, zero_point = compute_qparams(_t([-0.5, -1.27]), _t([1.27, 0.3]), 8, True)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    torch.testing.assert_close(scale, _t([0.01, 0.01]))
    assert zero_point.tolist() == [0, 0]


def test_compute_qparams_symmetric_4bit():
    # 4-bit symmetric divides by 2^3 - 1 = 7, not 8.
    scale, _ = compute_qparams(_t([-7.0]), _t([3.0]), 4, True)
    assert scale.item() == 1.0


def test_compute_qparams_asymmetric_8bit():
    # scale = (3 - (-1)) / 255 = 4/255; zero point = round(1 / (4/255)) = round(63.75) = 64.
    scale, zero_point = compute_qparams(_t([-1.0]), _t([3.0]), 8, False)
    torch.testing.assert_close(scale, _t([4 / 255]))
    assert zero_point.item() == 64


def test_compute_qparams_asymmetric_range_widened_to_include_zero():
    # [0.5, 2] -> [0, 2]: scale 2/255, zp 0.   [-2, -0.5] -> [-2, 0]: scale 2/255, zp 255.
    scale, zero_point = compute_qparams(_t([0.5, -2.0]), _t([2.0, -0.5]), 8, False)
    torch.testing.assert_close(scale, _t([2 / 255, 2 / 255]))
    assert zero_point.tolist() == [0, 255]
    # Asymmetric 2-bit: [-1, 2] -> scale 3/3 = 1, zp = round(1) = 1.
    scale, zero_point = compute_qparams(_t([-1.0]), _t([2.0]), 2, False)
    assert scale.item() == 1.0 and zero_point.item() == 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_compute_qparams_all_zero_row_is_finite(symmetric):
    scale, zero_point = compute_qparams(torch.zeros(3), torch.zeros(3), 8, symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert zero_point.tolist() == [0, 0, 0]
    q = quantize(torch.zeros(3), scale, zero_point, 8, symmetric)
    assert dequantize(q, scale, zero_point).tolist() == [0.0, 0.0, 0.0]


def test_compute_qparams_keeps_shape_and_checks_it():
    scale, zero_point = compute_qparams(-torch.ones(2, 3), torch.ones(2, 3), 8, False)
    assert scale.shape == (2, 3) and zero_point.shape == (2, 3)
    with pytest.raises(ValueError, match="same shape"):
        compute_qparams(torch.zeros(2), torch.zeros(3), 8, True)


# --- quantize / dequantize -----------------------------------------------------------------------


def test_quantize_symmetric_rounds_half_to_even_and_clamps_to_full_range():
    scale, zero_point = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    x = _t([0.25, 0.75, -0.25, -0.75, 1.25, 100.0, -100.0, 63.4])
    # x / 0.5 = [0.5, 1.5, -0.5, -1.5, 2.5, 200, -200, 126.8]
    q = quantize(x, scale, zero_point, 8, True)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 0, -2, 2, 127, -128, 127]
    assert dequantize(q, scale, zero_point).tolist() == [0.0, 1.0, 0.0, -1.0, 1.0, 63.5, -64.0, 63.5]


def test_quantize_asymmetric_4bit_with_zero_point():
    scale, zero_point = torch.tensor(0.25), torch.tensor(3, dtype=torch.int32)
    x = _t([-1.0, -0.75, 0.125, 0.375, 3.0, -5.0, 10.0])
    # x / 0.25 = [-4, -3, 0.5, 1.5, 12, -20, 40]; rounded + 3 = [-1, 0, 3, 5, 15, -17, 43]; clamp [0, 15]
    q = quantize(x, scale, zero_point, 4, False)
    assert q.dtype == torch.uint8
    assert q.tolist() == [0, 0, 3, 5, 15, 0, 15]
    assert dequantize(q, scale, zero_point).tolist() == [-0.75, -0.75, 0.0, 0.5, 3.0, -0.75, 3.0]


def test_quantize_per_channel_broadcasting():
    x = _t([[1.0, -1.0, 0.5], [1.0, 3.0, -4.0]])
    scale = _t([[0.5], [2.0]])  # (C, 1)
    zero_point = torch.zeros(2, 1, dtype=torch.int32)
    q = quantize(x, scale, zero_point, 8, True)
    # row 0: x / 0.5 = [2, -2, 1]; row 1: x / 2 = [0.5, 1.5, -2] -> [0, 2, -2]
    assert q.tolist() == [[2, -2, 1], [0, 2, -2]]
    assert dequantize(q, scale, zero_point).tolist() == [[1.0, -1.0, 0.5], [0.0, 4.0, -4.0]]


def test_dequantize_returns_float32():
    out = dequantize(torch.tensor([200], dtype=torch.uint8), torch.tensor(0.5), torch.tensor(128, dtype=torch.int32))
    assert out.dtype == torch.float32 and out.tolist() == [36.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_bit_exact_dequantize_of_quantize(bits, symmetric):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 64, generator=generator) * torch.rand(16, 1, generator=generator) * 3
    # A range a bit narrower than the data so that clamping happens too.
    scale, zero_point = compute_qparams(x.amin(1) * 0.8, x.amax(1) * 0.8, bits, symmetric)
    scale, zero_point = scale[:, None], zero_point[:, None]  # (16, 1)
    expected = dequantize(quantize(x, scale, zero_point, bits, symmetric), scale, zero_point)
    assert torch.equal(fake_quantize(x, scale, zero_point, bits, symmetric), expected)
    assert torch.equal(fake_quantize(x.requires_grad_(), scale, zero_point, bits, symmetric).detach(), expected)
    half = x.detach().half()
    out = fake_quantize(half, scale, zero_point, bits, symmetric)
    assert out.dtype == torch.float16
    assert torch.equal(out, dequantize(quantize(half, scale, zero_point, bits, symmetric), scale, zero_point).half())


def test_fake_quantize_straight_through_gradient_symmetric():
    scale, zero_point = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    # x / 0.5 = [0.2, 1.2, 200, -200, 127.4, 127.6, -128, -128.6]; clamp range [-128, 127]
    x = _t([0.1, 0.6, 100.0, -100.0, 63.7, 63.8, -64.0, -64.3]).requires_grad_()
    fake_quantize(x, scale, zero_point, 8, True).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_fake_quantize_straight_through_gradient_asymmetric_and_inf():
    scale, zero_point = torch.tensor(1.0), torch.tensor(2, dtype=torch.int32)
    # round(x) + 2 = [-1, 0, 3, 3, 4, inf]; clamp range [0, 3]
    x = _t([-3.0, -2.0, 1.0, 1.4, 1.6, math.inf]).requires_grad_()
    out = fake_quantize(x, scale, zero_point, 2, False)
    assert out.tolist() == [-2.0, -2.0, 1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_fake_quantize_rejects_integer_input():
    with pytest.raises(TypeError):
        fake_quantize(torch.zeros(2, dtype=torch.int8), torch.tensor(1.0), torch.tensor(0), 8, True)


def test_round_ste_value_and_gradient():
    x = _t([0.5, 1.5, 2.5, -0.5, -1.6, 3.2, 1e6 + 0.5]).requires_grad_()
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 3.0, 1e6]
    assert torch.equal(y.detach(), torch.round(x.detach()))
    (y * _t([1, 2, 3, 4, 5, 6, 7])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


# --- pack_int4 / unpack_int4 ---------------------------------------------------------------------


def test_pack_int4_byte_layout():
    # low nibble = element 0, high nibble = element 1; -1 is the nibble 0xF.
    assert pack_int4(torch.tensor([1, -1], dtype=torch.int8)).tolist() == [0xF1]
    assert pack_int4(torch.tensor([-8, 7, 0, -2], dtype=torch.int8)).tolist() == [0x78, 0xE0]
    assert pack_int4(torch.tensor([3, 10], dtype=torch.uint8)).tolist() == [0xA3]
    packed = pack_int4(torch.tensor([[1, 2, 3], [15, 0, 9]], dtype=torch.uint8))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x09]]  # odd length: high nibble of the last byte is 0


@pytest.mark.parametrize(("signed", "dtype", "low"), [(True, torch.int8, -8), (False, torch.uint8, 0)])
def test_pack_unpack_round_trip_every_pair_of_values(signed, dtype, low):
    values = torch.arange(low, low + 16)
    pairs = torch.cartesian_prod(values, values).to(dtype)  # (256, 2): every value in both nibbles
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1)
    assert packed.unique().numel() == 256  # all 256 byte patterns used once: the map is a bijection
    unpacked = unpack_int4(packed, 2, signed)
    assert unpacked.dtype == dtype
    assert torch.equal(unpacked, pairs)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
@pytest.mark.parametrize(("signed", "dtype", "low"), [(True, torch.int8, -8), (False, torch.uint8, 0)])
def test_pack_unpack_round_trip_lengths_and_leading_dims(n, signed, dtype, low):
    generator = torch.Generator().manual_seed(n)
    q = torch.randint(low, low + 16, (2, 3, n), generator=generator).to(dtype)
    packed = pack_int4(q)
    assert packed.shape == (2, 3, (n + 1) // 2)
    assert torch.equal(unpack_int4(packed, n, signed), q)


def test_pack_int4_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(TypeError):
        pack_int4(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 8, True)
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(3, dtype=torch.int8), 6, True)


# --- group_rows / ungroup_rows -------------------------------------------------------------------


def test_group_rows_layout_and_zero_padding():
    w = _t([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])  # (2, 5), groups of 2 -> G = 3
    rows = group_rows(w, 2)
    assert rows.tolist() == [[1, 2], [3, 4], [5, 0], [6, 7], [8, 9], [10, 0]]
    assert torch.equal(ungroup_rows(rows, 2, 5), w)


def test_group_rows_exact_multiple_and_oversized_group():
    w = torch.arange(24.0).reshape(3, 8)
    assert torch.equal(group_rows(w, 4), w.reshape(6, 4))
    assert group_rows(w, 16).tolist() == [row + [0.0] * 8 for row in w.tolist()]
    assert torch.equal(ungroup_rows(group_rows(w, 16), 3, 8), w)


def test_group_rows_round_trip_random():
    w = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    rows = group_rows(w, 128)  # G = 3, last group has 300 - 256 = 44 values and 84 zeros
    assert rows.shape == (21, 128)
    assert (rows.reshape(7, 3, 128)[:, 2, 44:] == 0).all()
    assert torch.equal(ungroup_rows(rows, 7, 300), w)


def test_group_rows_rejects_bad_input():
    with pytest.raises(ValueError):
        group_rows(torch.zeros(4), 2)
    with pytest.raises(ValueError):
        group_rows(torch.zeros(2, 4), 0)
    with pytest.raises(ValueError):
        ungroup_rows(torch.zeros(5, 2), 2, 5)  # (2, 5) in groups of 2 has 6 rows


# --- sqnr_db -------------------------------------------------------------------------------------


def test_sqnr_db_known_values():
    ones = torch.ones(100)
    # 10 log10(100 / (100 * 0.01)) = 20 dB
    assert sqnr_db(ones, ones + 0.1) == pytest.approx(20.0, abs=1e-4)
    # signal 3^2 + 4^2 = 25, noise 0.5^2 = 0.25 -> 10 log10(100) = 20 dB
    assert sqnr_db(_t([3.0, 4.0]), _t([3.0, 4.5])) == pytest.approx(20.0, abs=1e-9)
    assert sqnr_db(ones, ones.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    # float16 inputs: noise 1e-3^2 per element would vanish if squared in half precision.
    half = torch.full((10,), 1000.0, dtype=torch.float16)
    assert sqnr_db(half, half + 1) == pytest.approx(60.0, abs=1e-6)
    with pytest.raises(ValueError):
        sqnr_db(torch.zeros(2), torch.zeros(3))


def test_sqnr_decreases_with_fewer_bits_on_gaussian_weights():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    results = {}
    for bits in (8, 6, 4, 2):
        scale, zero_point = compute_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits, True)
        results[bits] = sqnr_db(w, fake_quantize(w, scale, zero_point, bits, True))
    # Uniform rounding noise has variance scale^2 / 12 with scale ~ 3.1 sigma / (2^(b-1) - 1):
    # ~43 dB at 8 bits and ~18 dB at 4 bits for unit-variance data.
    assert results[8] >= 35.0
    assert 15.0 <= results[4] <= 22.0
    assert results[8] > results[6] > results[4] > results[2]


@pytest.mark.parametrize(
    "shape, dim, group_size, bits, symmetric, clip",
    [
        ((2, 7, 48), -1, 16, 4, False, 1.0),
        ((2, 7, 40), -1, 16, 4, False, 0.9),  # a last group of 8 channels, zero padded
        ((3, 40, 5, 6), 1, 16, 6, True, 0.9),  # a convolution's (N, C, H, W) input
        ((10, 33), 1, 64, 8, False, 1.0),  # one group, wider than the channels
    ],
)
def test_grouped_fake_quantize_is_the_spread_ranges_bit_for_bit(shape, dim, group_size, bits, symmetric, clip):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-1, 1, shape[dim]).reshape(
        [-1 if d == dim % len(shape) else 1 for d in range(len(shape))]
    )
    low, high = channel_group_ranges(x, dim, group_size)
    scale, zero_point = compute_qparams(low * clip, high * clip, bits, symmetric)
    expected = fake_quantize(x, scale, zero_point, bits, symmetric)
    got = fake_quantize_channel_groups(x, dim, group_size, bits, symmetric, clip)
    assert got.shape == x.shape and torch.equal(got, expected)
    assert 3.0 * bits < sqnr_db(x, got) < 6.5 * bits + 6  # a quantization at that width, not a copy or noise
