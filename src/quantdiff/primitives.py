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

import math

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
    "sqnr_db",
]

MIN_BITS = 2
MAX_BITS = 8

# Smallest scale compute_qparams returns. An all-zero row would otherwise give scale 0 and x / 0 = nan;
# any positive floor works there because every value of such a row quantizes to the zero point. 1e-12
# is far below any real range yet keeps x / scale finite in float32 for |x| up to ~1e26.
SCALE_EPS = 1e-12


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
