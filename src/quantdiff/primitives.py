"""Uniform integer quantization arithmetic on plain tensors.

Everything here is a pure function of its arguments: no modules, no state, no I/O. The conventions,
shared by every other part of quantdiff, are:

* ``bits`` is 2 to 8. Symmetric values are signed and stored in ``torch.int8``; asymmetric values are
  unsigned and stored in ``torch.uint8``. Widths below 8 bits still use those one-byte containers
  (:func:`pack_int4` halves the storage of 4-bit and narrower values).
* A real value ``x`` maps to ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and back to
  ``(q - zero_point) * scale``. ``round`` is round-half-to-even (``torch.round``) everywhere, so the
  integer path, the fake-quantized path and any exported kernel agree bit for bit.
* The arithmetic is done in float32 whatever the input dtype, because scales are float32 and doing
  ``x / scale`` in float16 would round some values to a different integer than the stored weights.
* ``scale`` and ``zero_point`` broadcast against ``x``: a scalar for per-tensor, ``(C, 1)`` for
  per-channel, and per-group after :func:`group_rows`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = [
    "integer_range",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_ste",
    "pack_int4",
    "unpack_int4",
    "group_rows",
    "ungroup_rows",
    "channel_group_ranges",
    "fake_quantize_channel_groups",
    "hadamard_matrix",
    "rotate_channels",
    "sqnr_db",
    "PAIR_LIMIT",
    "pair_sums",
    "clip_pairs",
    "pair_safe_quantize",
]

MIN_BITS = 2
MAX_BITS = 8

# Smallest scale compute_qparams returns. An all-zero row would otherwise give scale 0 and x / 0 = nan;
# any positive floor works there because every value of such a row quantizes to the zero point. 1e-12
# is far below any real range yet keeps x / scale finite in float32 for |x| up to ~1e26.
SCALE_EPS = 1e-12

# x86 CPUs without VNNI multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds the two
# products of neighbouring input channels into a *saturating* int16. With activations in 0..255 a pair is
# exact iff its same-sign weights satisfy |w0 + w1| <= 128 (255 * 128 = 32640 <= 32767). See
# benchmarks/KERNELS.md and :func:`pair_safe_quantize`.
PAIR_LIMIT = 128


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer interval ``[qmin, qmax]`` that quantized values are clamped to.

    Symmetric: the full signed range ``[-2^(b-1), 2^(b-1) - 1]``. Asymmetric: the unsigned range
    ``[0, 2^b - 1]``. Symmetric scales are computed against ``2^(b-1) - 1`` (see
    :func:`compute_qparams`), so ``-2^(b-1)`` is only reached by clamping values below the observed
    range; keeping it in the clamp range costs nothing and stores such values more accurately.

    Args:
        bits: integer width, 2 to 8.
        symmetric: signed (True) or unsigned (False) integers.

    Returns:
        ``(qmin, qmax)`` as Python ints.

    Raises:
        ValueError: ``bits`` is not an integer from 2 to 8.
    """
    # bool is an int subclass; bits=True is always a caller's mistake.
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def compute_qparams(min_val: Tensor, max_val: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map a real range onto the integer range, elementwise.

    Symmetric::

        a          = max(|min|, |max|)
        scale      = a / (2^(b-1) - 1)
        zero_point = 0

    Asymmetric (the range is first widened to contain 0, so that 0 - padding, ReLU zeros - is exact)::

        min'       = min(min, 0),  max' = max(max, 0)
        scale      = (max' - min') / (2^b - 1)
        zero_point = clamp(round(-min' / scale), 0, 2^b - 1)

    In both modes ``scale`` is floored at ``SCALE_EPS`` so a range of width 0 (an all-zero row)
    yields a finite scale instead of dividing by zero later.

    Args:
        min_val: smallest value of each range, any shape.
        max_val: largest value of each range, same shape as ``min_val``.
        bits: integer width, 2 to 8.
        symmetric: signed with zero point 0 (True) or unsigned with a zero point (False).

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the inputs' shape, on their device.

    Raises:
        ValueError: bad ``bits``, or ``min_val`` and ``max_val`` have different shapes.
    """
    qmin, qmax = integer_range(bits, symmetric)
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}"
        )
    min_val = min_val.detach().to(torch.float32)
    max_val = max_val.detach().to(torch.float32)
    if symmetric:
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (absmax / qmax).clamp_min(SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point
    min_val = min_val.clamp_max(0.0)
    max_val = max_val.clamp_min(0.0)
    scale = ((max_val - min_val) / (qmax - qmin)).clamp_min(SCALE_EPS)
    # -min/scale already lies in [0, qmax] mathematically; the clamp guards float rounding at the ends.
    zero_point = torch.round(-min_val / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _quantize_as_float(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """The clamped integer values as float32, and where ``x`` was inside the range (before clamping).

    The single definition of the rounding that :func:`quantize` and :func:`fake_quantize` share, so
    the two can never drift apart.
    """
    # Integers up to 2^24 are exact in float32, so adding the zero point in float loses nothing.
    unclamped = torch.round(x.to(torch.float32) / scale.to(torch.float32)) + zero_point.to(torch.float32)
    in_range = (unclamped >= qmin) & (unclamped <= qmax)
    return unclamped.clamp(qmin, qmax), in_range


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Real values to integers.

    ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` with round-half-to-even and
    ``(qmin, qmax) = integer_range(bits, symmetric)``; computed in float32.

    Args:
        x: real values, any float dtype and shape. Must be finite (nan has no integer image).
        scale: float scale broadcastable against ``x``, e.g. ``(C, 1)`` for per-channel rows.
        zero_point: integer zero point broadcastable against ``x`` (0 for symmetric).
        bits: integer width, 2 to 8.
        symmetric: selects the integer range and the container dtype.

    Returns:
        ``torch.int8`` (symmetric) or ``torch.uint8`` (asymmetric) tensor of the broadcast shape.
    """
    qmin, qmax = integer_range(bits, symmetric)
    q, _ = _quantize_as_float(x.detach(), scale, zero_point, qmin, qmax)
    return q.to(torch.int8 if symmetric else torch.uint8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Integers back to real values: ``x_hat = (q - zero_point) * scale``.

    Args:
        q: integer tensor, any shape (the output of :func:`quantize` or :func:`unpack_int4`).
        scale: float scale broadcastable against ``q``.
        zero_point: integer zero point broadcastable against ``q``.

    Returns:
        float32 tensor of the broadcast shape.
    """
    # q - zero_point is an integer below 2^9 in magnitude, exact in float32, so the only rounding is
    # the final product - the same single rounding fake_quantize performs.
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale.to(torch.float32)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Quantize and dequantize in one step, differentiable by the clipped straight-through estimator.

    Forward: ``dequantize(quantize(x, ...)).to(x.dtype)``, bit for bit.
    Backward: ``d out / d x = 1`` where ``qmin <= round(x / scale) + zero_point <= qmax`` and 0 where
    the value was clamped. No gradient flows to ``scale`` or ``zero_point``.

    Args:
        x: real values, floating dtype, any shape; must be finite.
        scale: float scale broadcastable against ``x``.
        zero_point: integer zero point broadcastable against ``x``.
        bits: integer width, 2 to 8.
        symmetric: selects the integer range.

    Returns:
        Tensor of ``x``'s dtype and the broadcast shape.
    """
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point x, got {x.dtype}")
    qmin, qmax = integer_range(bits, symmetric)
    with torch.no_grad():
        q, in_range = _quantize_as_float(x, scale, zero_point, qmin, qmax)
        out = dequantize(q, scale, zero_point).to(x.dtype)
    if not x.requires_grad:
        return out
    # x - x.detach() is exactly +0 for finite x, so the forward value stays bit-identical to `out`
    # while autograd sees identity inside the range; where() (not a multiply by the mask) keeps a
    # clamped inf from turning into inf * 0 = nan.
    return out + torch.where(in_range, x - x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))


def round_ste(x: Tensor) -> Tensor:
    """Round-half-to-even with an identity gradient: ``(round(x) - x).detach() + x``.

    The forward value equals ``torch.round(x)`` exactly: ``round(x) - x`` is a multiple of x's ulp no
    larger than 0.5, hence representable, and adding ``x`` back yields the representable ``round(x)``.

    Args:
        x: floating tensor, any shape.

    Returns:
        Tensor like ``x`` holding the rounded values.
    """
    return (torch.round(x) - x).detach() + x


def _nibble_bounds(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.int8:
        return -8, 7
    if dtype == torch.uint8:
        return 0, 15
    raise TypeError(f"pack_int4 takes int8 values in [-8, 7] or uint8 values in [0, 15], got dtype {dtype}")


def pack_int4(q: Tensor) -> Tensor:
    """Pack 4-bit integers two per byte along the last dimension.

    Byte ``j`` of a row holds element ``2j`` in its low nibble and element ``2j + 1`` in its high
    nibble: ``byte = (q[2j] & 0xF) | (q[2j+1] & 0xF) << 4``. Signed values are stored as
    two's-complement nibbles (-1 -> 0xF). An odd last dimension is padded with a zero nibble.

    Args:
        q: ``torch.int8`` with values in [-8, 7] (signed) or ``torch.uint8`` with values in [0, 15]
            (unsigned); shape ``(..., n)``. Narrower widths (2, 3 bits) fit the same nibbles.

    Returns:
        ``torch.uint8`` tensor of shape ``(..., ceil(n / 2))``.

    Raises:
        TypeError: ``q`` is neither int8 nor uint8.
        ValueError: ``q`` is 0-dimensional or holds values outside its 4-bit range.
    """
    low, high = _nibble_bounds(q.dtype)
    if q.dim() == 0:
        raise ValueError("pack_int4 needs at least one dimension to pack along")
    if q.numel() and (int(q.min()) < low or int(q.max()) > high):
        raise ValueError(
            f"pack_int4: {q.dtype} values must lie in [{low}, {high}], got [{int(q.min())}, {int(q.max())}]"
        )
    n = q.shape[-1]
    # int16 so that & 0xF of a negative value gives its two's-complement nibble without overflow.
    nibbles = q.to(torch.int16) & 0xF  # (..., n)
    if n % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))  # (..., n + 1)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # (..., ceil(n/2))
    return packed.to(torch.uint8)


def unpack_int4(packed: Tensor, n: int, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int4`.

    ``q[2j] = byte & 0xF`` and ``q[2j+1] = byte >> 4``; signed nibbles are sign-extended with
    ``(v ^ 8) - 8``, which maps 0..7 to 0..7 and 8..15 to -8..-1.

    Args:
        packed: ``torch.uint8`` tensor of shape ``(..., ceil(n / 2))``.
        n: length of the unpacked last dimension.
        signed: return int8 values in [-8, 7] (True) or uint8 values in [0, 15] (False).

    Returns:
        ``torch.int8`` or ``torch.uint8`` tensor of shape ``(..., n)``.

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: the last dimension does not match ``n``.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8 bytes, got dtype {packed.dtype}")
    if packed.dim() == 0 or n < 0 or packed.shape[-1] != (n + 1) // 2:
        raise ValueError(
            f"unpack_int4: {n} values need a last dimension of {(n + 1) // 2} bytes, got shape {tuple(packed.shape)}"
        )
    bytes_ = packed.to(torch.int16)  # (..., m)
    # stack then flatten interleaves (low_0, high_0, low_1, high_1, ...), the packing order.
    nibbles = torch.stack((bytes_ & 0xF, bytes_ >> 4), dim=-1).flatten(-2)[..., :n]  # (..., n)
    if signed:
        return ((nibbles ^ 8) - 8).to(torch.int8)
    return nibbles.to(torch.uint8)


def group_rows(w: Tensor, group_size: int) -> Tensor:
    """Cut each row of a matrix into groups of ``group_size`` consecutive columns, one group per row.

    ``(C_out, K) -> (C_out * G, group_size)`` with ``G = ceil(K / group_size)``; output row
    ``c * G + g`` holds ``w[c, g*group_size : (g+1)*group_size]``. When ``K`` is not a multiple of
    ``group_size`` the last group of each row is padded with zeros: 0 never widens a range that
    :func:`compute_qparams` already widens to include 0. (Observers that look at the distribution,
    percentile and MSE, do see the padding zeros as data.)

    Args:
        w: 2-D tensor ``(C_out, K)``.
        group_size: columns per group, >= 1.

    Returns:
        Tensor of ``w``'s dtype, shape ``(C_out * G, group_size)``.

    Raises:
        ValueError: ``w`` is not 2-D or ``group_size`` < 1.
    """
    if w.dim() != 2:
        raise ValueError(f"group_rows takes a 2-D (C_out, K) tensor, got shape {tuple(w.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    c_out, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k))  # (C_out, G * group_size)
    return padded.reshape(c_out * groups, group_size)  # (C_out * G, group_size)


def ungroup_rows(rows: Tensor, c_out: int, k: int) -> Tensor:
    """Inverse of :func:`group_rows`: ``(C_out * G, group_size) -> (C_out, K)``, padding dropped.

    Args:
        rows: 2-D tensor ``(C_out * G, group_size)`` with ``G = ceil(k / group_size)``.
        c_out: number of output rows.
        k: number of columns of the original matrix.

    Returns:
        Contiguous tensor of ``rows``' dtype, shape ``(C_out, K)``.

    Raises:
        ValueError: ``rows`` does not have the shape ``group_rows`` produces for ``(c_out, k)``.
    """
    if rows.dim() != 2:
        raise ValueError(f"ungroup_rows takes a 2-D (C_out * G, group_size) tensor, got shape {tuple(rows.shape)}")
    group_size = rows.shape[1]
    groups = -(-k // group_size) if group_size else 0
    if group_size < 1 or rows.shape[0] != c_out * groups:
        raise ValueError(
            f"ungroup_rows: a ({c_out}, {k}) matrix in groups of {group_size} has {c_out * groups} rows, "
            f"got shape {tuple(rows.shape)}"
        )
    return rows.reshape(c_out, groups * group_size)[:, :k].contiguous()  # (C_out, K)


def channel_group_ranges(x: Tensor, dim: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Min and max of each run of ``group_size`` consecutive entries of ``x`` along ``dim`` (the channels),
    separately for every position of the other dimensions (tokens, pixels): per-token-group input ranges.

    Both results have ``x``'s shape: every entry holds its group's min (max). When the length along ``dim``
    is not a multiple of ``group_size``, the last group is padded with zeros as in :func:`group_rows` (0 never
    widens a range that :func:`compute_qparams` widens to include 0 anyway).

    Args:
        x: any tensor, e.g. ``(B, T, C)`` with ``dim=-1`` or ``(N, C, H, W)`` with ``dim=1``.
        dim: the dimension cut into groups.
        group_size: entries per group, >= 1.

    Returns:
        ``(low, high)``, each of ``x``'s shape and dtype.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    channels_last = x.movedim(dim, -1)  # (..., C)
    c = channels_last.shape[-1]
    padded = torch.nn.functional.pad(channels_last, (0, -c % group_size))  # (..., G * group_size)
    grouped = padded.unflatten(-1, (-1, group_size))  # (..., G, group_size)

    def spread(reduced: Tensor) -> Tensor:  # (..., G, 1) -> x's shape
        return reduced.expand(grouped.shape).flatten(-2)[..., :c].movedim(-1, dim)

    return spread(grouped.amin(dim=-1, keepdim=True)), spread(grouped.amax(dim=-1, keepdim=True))


def fake_quantize_channel_groups(
    x: Tensor, dim: int, group_size: int, bits: int, symmetric: bool, clip_ratio: float = 1.0
) -> Tensor:
    """Fake-quantize ``x`` with a range per token (every position of the other dimensions) and per run of
    ``group_size`` channels along ``dim``, each range times ``clip_ratio``: the values of
    :func:`channel_group_ranges` -> :func:`compute_qparams` -> :func:`fake_quantize`, bit for bit.

    Why a function of its own: it works in a ``(..., G, group_size)`` view, so the ranges and scales are
    computed once per group rather than spread to every entry first (2.5x faster on SD3-sized inputs, measured
    on 2 x 272 tokens x 256 channels), and
    a dynamic per-group input is quantized on every call of the layer.
    """
    dim = dim % x.dim()
    c, pad = x.shape[dim], -x.shape[dim] % group_size
    if pad:  # zeros, as channel_group_ranges pads: they never widen a range that includes 0 anyway
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1 :])], dim=dim)
    # grouped in place along dim, so the result keeps x's layout (a convolution's input stays NCHW)
    grouped = x.unflatten(dim, (-1, group_size))  # e.g. (B, T, G, group) or (N, G, group, H, W)
    low, high = grouped.amin(dim=dim + 1, keepdim=True), grouped.amax(dim=dim + 1, keepdim=True)
    if clip_ratio != 1.0:
        low, high = low * clip_ratio, high * clip_ratio
    scale, zero_point = compute_qparams(low, high, bits, symmetric)
    out = fake_quantize(grouped, scale, zero_point, bits, symmetric).flatten(dim, dim + 1)  # x's shape
    return out.narrow(dim, 0, c).contiguous() if pad else out


@functools.cache
def hadamard_matrix(size: int) -> Tensor:
    """The normalized Sylvester Hadamard matrix ``H / sqrt(size)`` ``(size, size)``, float32: symmetric and
    orthogonal, so ``H @ H`` is the identity (to float rounding). ``size`` must be a power of two."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard matrix here has a power-of-two size, got {size!r}")
    return torch.from_numpy(scipy.linalg.hadamard(size).astype(np.float32)) / math.sqrt(size)


def rotate_channels(x: Tensor, dim: int, block: int) -> Tensor:
    """``x`` with each run of ``block`` consecutive entries along ``dim`` multiplied by :func:`hadamard_matrix`.

    Applied twice it gives ``x`` back; applied to a layer's input channels and to its weight's input channels it
    leaves the layer's output unchanged (``(x H) . (w H) = x . w``). ``block`` must divide the length of ``dim``.
    """
    channels = x.shape[dim]
    if channels % block:
        raise ValueError(f"rotate_channels: blocks of {block} do not divide {channels} channels")
    h = hadamard_matrix(block).to(device=x.device, dtype=x.dtype)  # (b, b)
    # One explicit copy into channels-last order: the matmul over the strided view of an NCHW input measured
    # 2-4x slower than copy + matmul on SD1.5's convolution inputs. The result keeps that order (for a 4-D
    # input: channels-last memory, which the packed convolutions take as is).
    blocks = x.movedim(dim, -1).contiguous().unflatten(-1, (channels // block, block))  # (..., C / b, b)
    return (blocks @ h).flatten(-2).movedim(-1, dim)


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio in decibels.

    ``10 * log10(sum(ref^2) / sum((ref - test)^2))``, computed in float64 so that large tensors and
    half-precision inputs neither overflow nor lose the small differences.

    Args:
        reference: the exact values, any shape.
        test: the approximation, same shape as ``reference``.

    Returns:
        The ratio in dB: ``+inf`` when the tensors are identical, ``-inf`` when the reference is all
        zeros and the test is not.

    Raises:
        ValueError: the shapes differ.
    """
    if reference.shape != test.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(reference.shape)} vs {tuple(test.shape)}")
    ref = reference.detach().to(torch.float64)
    signal = float(ref.square().sum())
    noise = float((ref - test.detach().to(torch.float64)).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _even_channels(q: Tensor) -> Tensor:
    """Pad the input-channel dimension of ``(C_out, C_in, taps)`` to an even size with zeros.

    oneDNN pairs channel ``2j`` with ``2j + 1`` and pads an odd channel count with a zero channel, so the
    last channel of an odd count pairs with 0.
    """
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 0, 0, 1))  # (C_out, C_in + 1, taps)
    return q


def pair_sums(q: Tensor) -> Tensor:
    """Largest same-sign pair sum ``|w[2j] + w[2j+1]|`` of each output channel.

    Pairs run over input channels (dim 1) at the same kernel tap (dim 2), the order in which x86 int8
    kernels without VNNI add two u8 x s8 products into one saturating int16. Mixed-sign pairs cannot
    overflow (their sum is bounded by the larger product), so only same-sign pairs count.

    Args:
        q: integer weights ``(C_out, C_in, taps)`` (``taps = 1`` for Linear); any integer or float dtype
            holding integer values.

    Returns:
        int32 tensor ``(C_out,)``: the worst ``max(|a| + |b|)`` over same-sign pairs ``(a, b)``; the layer
        is exact on such a CPU iff ``x_qmax * pair_sums(q).max() <= 32767``.
    """
    if q.dim() != 3:
        raise ValueError(f"pair_sums takes (C_out, C_in, taps) weights, got shape {tuple(q.shape)}")
    w = _even_channels(q.to(torch.int32))  # (C_out, C_in', taps)
    a, b = w[:, 0::2], w[:, 1::2]  # (C_out, C_in'/2, taps) each
    positive = a.clamp(min=0) + b.clamp(min=0)
    negative = a.clamp(max=0) + b.clamp(max=0)
    worst = torch.maximum(positive, -negative)  # (C_out, C_in'/2, taps)
    if worst.numel() == 0:
        return torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
    return worst.amax(dim=(1, 2))


def clip_pairs(q: Tensor, limit: int = PAIR_LIMIT) -> Tensor:
    """Move every same-sign pair with ``|w[2j] + w[2j+1]| > limit`` onto ``|sum| = limit``.

    The excess is split in two, the larger magnitude giving up the larger half, both values moving
    towards zero. Neither value changes sign (for ``|q| <= 128`` the excess never exceeds twice the
    smaller magnitude). Mixed-sign pairs never exceed the limit (``|a + b| <= max(|a|, |b|) <= 128``), so
    ``|a + b| > limit`` alone finds the violating pairs.

    Args:
        q: integer values ``(C_out, C_in, taps)`` held in a float or integer tensor, ``|q| <= 128``.
        limit: the largest allowed same-sign pair sum.

    Returns:
        Tensor like ``q`` (same dtype and shape).
    """
    c_in = q.shape[1]
    w = _even_channels(q)
    a, b = w[:, 0::2], w[:, 1::2]  # (C_out, C_in'/2, taps) each
    a_new, b_new = _clipped_pair(a, b, limit)
    out = torch.stack((a_new, b_new), dim=2).flatten(1, 2)  # (C_out, C_in', taps): a, b interleaved again
    return out[:, :c_in].contiguous()


def _clipped_pair(a: Tensor, b: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """Elementwise :func:`clip_pairs` on the two members of each pair (any matching shapes)."""
    total = a + b
    excess = (total.abs() - limit).clamp(min=0)
    half_down = torch.div(excess, 2, rounding_mode="floor")
    a_part = torch.where(a.abs() >= b.abs(), excess - half_down, half_down)  # the larger one gives up more
    direction = torch.sign(total)
    return a - direction * a_part, b - direction * (excess - a_part)


def _pair_safe_errors(w: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Squared error (in units of ``scale^2``) per channel of the pair-clipped quantization of ``w``.

    Computed as the plain rounding error plus a correction on the few clipped pairs, which is several
    times cheaper than materialising the clipped weights for every candidate scale.
    """
    r = w / scale[:, None, None]  # (R, C_in', taps), even C_in'
    q = torch.round(r).clamp_(qmin, qmax)
    err = (q - r).square_().sum(dim=(1, 2))  # (R,)
    a, b = q[:, 0::2], q[:, 1::2]  # (R, P, taps)
    violating = (a + b).abs_() > PAIR_LIMIT
    rows, pairs, taps = violating.nonzero(as_tuple=True)
    if rows.numel():
        qa, qb = a[rows, pairs, taps], b[rows, pairs, taps]  # (V,)
        ra, rb = r[rows, 2 * pairs, taps], r[rows, 2 * pairs + 1, taps]
        ca, cb = _clipped_pair(qa, qb, PAIR_LIMIT)
        delta = (ca - ra).square() + (cb - rb).square() - (qa - ra).square() - (qb - rb).square()
        err.index_add_(0, rows, delta)
    return err


def pair_safe_quantize(
    w: Tensor, base_scale: Tensor, steps: int = 11, max_elements: int = 1 << 22
) -> tuple[Tensor, Tensor]:
    """Symmetric 8-bit per-output-channel weights that x86 int8 kernels without VNNI compute exactly.

    Plain int8 weights can overflow the saturating int16 pair sums of ``vpmaddubsw`` (AVX2 without VNNI):
    measured 14-46 dB against the exact result per layer. For each output channel this tries the scales
    ``base_scale * f`` for ``steps`` values of ``f`` in [1, 2] (``f = 2`` is a 7-bit weight, which can
    never violate), clips the pairs that still violate (:func:`clip_pairs`), and keeps the ``f`` with
    the least squared weight error (the first on ties). Channels that satisfy the constraint at ``f = 1``
    keep the plain quantization without a search. The result is an ordinary int8 weight with ordinary
    scales: the fake-quant reference computes with exactly these integers, so kernel and reference agree.

    Args:
        w: float weights ``(C_out, C_in, taps)`` (``taps = 1`` for Linear; per group for grouped conv).
        base_scale: float32 ``(C_out,)``, the plain 8-bit symmetric scale of each channel (from the
            weight observer, e.g. ``absmax / 127``).
        steps: number of ``f`` values tried (11: 0.1 apart).
        max_elements: channels are searched in chunks of about this many weights to bound memory.

    Returns:
        ``(q, scale)``: int8 ``(C_out, C_in, taps)`` whose same-sign pair sums are at most
        :data:`PAIR_LIMIT`, and float32 ``(C_out,)`` scales.
    """
    if w.dim() != 3 or base_scale.shape != (w.shape[0],):
        raise ValueError(
            f"pair_safe_quantize takes (C_out, C_in, taps) weights and (C_out,) scales, "
            f"got {tuple(w.shape)} and {tuple(base_scale.shape)}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    qmin, qmax = integer_range(8, True)
    c_in = w.shape[1]
    w = _even_channels(w.detach().to(torch.float32))  # (C_out, C_in', taps): odd channel pairs with 0
    base_scale = base_scale.detach().to(torch.float32)
    scale = base_scale.clone()
    q = torch.round(w / base_scale[:, None, None]).clamp_(qmin, qmax)  # (C_out, C_in', taps)
    rows = (pair_sums(q) > PAIR_LIMIT).nonzero().flatten()  # channels that need a larger scale
    factors = torch.linspace(1.0, 2.0, steps).tolist() if steps > 1 else [1.0]
    chunk = max(1, max_elements // max(1, w[0].numel()))
    for start in range(0, rows.numel(), chunk):
        index = rows[start : start + chunk]
        w_rows, base = w[index], base_scale[index]  # (R, C_in', taps), (R,)
        best_scale, best_err = None, None
        for f in factors:
            s = base * f  # (R,)
            err = _pair_safe_errors(w_rows, s, qmin, qmax) * s.square()  # (R,) in weight units
            if best_err is None:
                best_scale, best_err = s, err
            else:
                better = err < best_err
                best_scale = torch.where(better, s, best_scale)
                best_err = torch.where(better, err, best_err)
        scale[index] = best_scale
        q[index] = clip_pairs(torch.round(w_rows / best_scale[:, None, None]).clamp_(qmin, qmax))
    return q[:, :c_in].to(torch.int8).contiguous(), scale
