"""What oneDNN's prepacked int8 weight may cost, for the storage assertions of the kernel tests.

The packed copy is one byte per weight plus the kernel's blocking, measured on the two CPUs we run on:

* AVX2 without VNNI: Linear exactly ``C_out * K`` bytes; Conv2d adds an int32 compensation per output channel.
* AVX-512 VNNI / AMX: both add the int32 compensation per output channel, and tiles pad ``C_out`` (and for
  Linear ``K``) up to a multiple of 64: nothing at SD sizes (320-wide layers: +1.25%), but up to 4x for the
  32-channel layers of the tiny test models.
"""

from __future__ import annotations


def _up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def packed_int8_bounds(c_out: int, k: int, saturates: bool) -> tuple[int, int]:
    """(fewest, most) bytes of one layer's packed int8 weight of ``(C_out, K)``; ``saturates``: AVX2 without VNNI."""
    if saturates:
        return c_out * k, c_out * k + 4 * c_out
    return c_out * k, _up(c_out, 64) * _up(k, 64) + 4 * _up(c_out, 64)
