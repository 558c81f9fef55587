"""Scaled-dot-product attention with QK^T and PV in int8: the pure tensor math, and its AMX kernel.

What is quantized, and why (errors measured against fp32 SDPA, benchmarks/KERNELS.md section 7):

* **Q**: symmetric int8, one scale per query token (row of each head). A per-head scale loses the rows of
  small norm; per token it costs one scale per row, folded into the fp32 epilogue of QK^T.
* **K**: first *smoothed*: the mean key over the tokens of each head is subtracted (SageAttention's
  observation). Softmax is invariant to a constant added to each query row, and ``q . mean(k)`` is such a
  constant, so this changes nothing exactly; it removes the shared offset that real keys carry (a bias-like
  component common to all tokens), which otherwise takes most of the int8 range. Then symmetric int8 per key
  token.
* **S = QK^T**: int8 x int8 -> int32 (exact), then ``S * (q_scale * softmax_scale) * k_scale`` in fp32.
* **softmax** in fp32: ``P = exp(S - rowmax)`` lies in (0, 1] with its maximum exactly 1, so a fixed scale is
  a per-row scale: ``P_q = round(65535 P)``, 16 bits held as two uint8 digits ``P_q = 256 P_high + P_low``.
  Why not one uint8 (``round(255 P)``): on long or flat rows most probabilities are a few 1/255 of the row's
  largest and round coarsely; measured 32.4 dB at 2x8x4096x4096x40 (Gaussian) and 36 dB mean, 27 dB worst, on
  the digits-sd3 model's joint attention, against 38-39 dB and 47 dB with the two digits, for a second PV
  product (about 10% of the call).
* **V**: symmetric int8 with one scale per head channel (over the tokens): a channel's values share a range
  across tokens, while per-token V scales would have to be applied inside the PV reduction.
* **PV**: ``256 (P_high V) + P_low V``, each uint8 x int8 -> int32 (exact: 255 * 127 * T_k < 2^31 for
  T_k < 66,000), then divided by the row's integer sum ``sum(P_q)`` (so the weights of V are exactly the
  quantized ones and sum to 1) and times the V scale.

:func:`int8_sdpa_reference` is that math in plain torch (integer matmuls computed exactly in float where the
bound allows, else float64). :func:`int8_sdpa` runs the same integers on the AMX kernel
(``csrc/attention_amx.cpp``) where it can, and says why not otherwise (:func:`int8_attention_support`).
Masks: additive float masks and boolean masks are applied to S before the softmax in the reference; the
kernel takes unmasked calls only (diffusers' UNets pass none), masked calls run the reference. A NaN or an
infinity in Q, K or V has no int8 image: the whole call answers NaN (both paths).
"""

from __future__ import annotations

import functools
import math
import os
import platform
from dataclasses import dataclass

import torch
from torch import Tensor

from quantdiff.nn.kernels.extension import CSRC, load_extension_once

__all__ = [
    "Int8AttentionSupport",
    "Int8QKV",
    "int8_attention_support",
    "int8_sdpa",
    "int8_sdpa_kernel",
    "int8_sdpa_reference",
    "kernel_blocker",
    "quantize_qkv",
    "unsupported_reason",
]

Q_MAX = 127  # symmetric int8 for Q, K, V
P_LEVELS = 65535  # the softmax probabilities in 16 bits (scale 1 / 65535), as two uint8 digits
P_DIGIT = 256  # P_q = P_DIGIT * P_high + P_low
_TINY = 1e-30  # scale of an all-zero row: its integers are 0 whatever the scale
MAX_KERNEL_HEAD_DIM = 1024  # the kernel's per-row scratch

_SOURCE = CSRC / "attention_amx.cpp"
_EXTENSION = "quantdiff_attention_kernels"
DISABLE_ENV = "QUANTDIFF_NO_EXTENSION"  # the same switch as the packed kernels


@dataclass(frozen=True)
class Int8QKV:
    """Quantized query, key and value of one attention call (heads flattened into the batch).

    Attributes:
        q, k, v: int8 ``(BH, T_q, d)``, ``(BH, T_k, d)``, ``(BH, T_k, d)``.
        q_scale: fp32 ``(BH, T_q)``: per query token, times the softmax scale.
        k_scale: fp32 ``(BH, T_k)``: per key token (of the smoothed keys).
        v_scale: fp32 ``(BH, d)``: per head channel.
    """

    q: Tensor
    q_scale: Tensor
    k: Tensor
    k_scale: Tensor
    v: Tensor
    v_scale: Tensor


def _symmetric(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """int8 values and fp32 scales of ``x`` with one scale per slice reduced over ``dim`` (kept)."""
    scale = (x.abs().amax(dim=dim, keepdim=True) / Q_MAX).clamp_min(_TINY)
    return torch.round(x / scale).clamp_(-Q_MAX, Q_MAX).to(torch.int8), scale


def _softmax_scale(query: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def _key_mean(key: Tensor) -> Tensor:
    """``(B * heads, d)`` fp32: the mean key of each head over its tokens (the kernel takes it from here too, so
    that both paths subtract the same floats). Summed in float64: an fp32 sum's rounding depends on the
    memory layout's reduction order, and transposed and contiguous keys would then round differently."""
    return key.mean(dim=2, dtype=torch.float64).to(torch.float32).reshape(-1, key.shape[-1])


def quantize_qkv(query: Tensor, key: Tensor, value: Tensor, scale: float | None = None) -> Int8QKV:
    """Quantize fp32 ``(B, heads, T, d)`` query / key / value as the module docstring says."""
    batch, heads, _, dim = query.shape
    softmax_scale = _softmax_scale(query, scale)
    q = query.reshape(batch * heads, query.shape[2], dim).float()  # (BH, T_q, d)
    k = key.reshape(batch * heads, key.shape[2], dim).float()  # (BH, T_k, d)
    v = value.reshape(batch * heads, value.shape[2], value.shape[3]).float()  # (BH, T_k, d_v)
    k = k - _key_mean(key)[:, None, :]  # smoothing: a per-row constant of S, which softmax ignores
    q_int, q_scale = _symmetric(q, dim=2)  # (BH, T_q, d), (BH, T_q, 1)
    k_int, k_scale = _symmetric(k, dim=2)  # (BH, T_k, d), (BH, T_k, 1)
    v_int, v_scale = _symmetric(v, dim=1)  # (BH, T_k, d_v), (BH, 1, d_v)
    return Int8QKV(
        q_int.contiguous(),
        (q_scale[..., 0] * softmax_scale).contiguous(),
        k_int.contiguous(),
        k_scale[..., 0].contiguous(),
        v_int.contiguous(),
        v_scale[:, 0].contiguous(),
    )


def _exact_int_matmul(a: Tensor, b: Tensor, bound: float) -> Tensor:
    """``a @ b`` of integer-valued tensors, exact: in fp32 when every partial sum stays below 2^24 (``bound``:
    the largest possible |sum|), else in float64 (exact below 2^53). Returns float64 or float32 integers."""
    if bound < 2**24:
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a.double(), b.double())


def _scores(qkv: Int8QKV) -> Tensor:
    """``(BH, T_q, T_k)`` fp32: the int32 QK^T times the query and key scales (the kernel's epilogue order)."""
    dim = qkv.q.shape[-1]
    integers = _exact_int_matmul(qkv.q, qkv.k.transpose(1, 2), Q_MAX * Q_MAX * dim).float()
    return integers * qkv.q_scale[:, :, None] * qkv.k_scale[:, None, :]


def _probabilities(scores: Tensor) -> Tensor:
    """16-bit integers ``(BH, T_q, T_k)`` (as float): ``round(65535 exp(S - rowmax))``; rows all ``-inf`` give 0."""
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)  # a fully masked row: all P are 0
    return torch.round(torch.exp(scores - peak) * P_LEVELS)


def _weighted_values(p_int: Tensor, qkv: Int8QKV) -> Tensor:
    """``(BH, T_q, d)`` fp32: ``256 (P_high V_q) + P_low V_q`` (two uint8 x int8 products, int32) divided by each
    row's integer sum of P_q, times the V scales (the kernel's epilogue order)."""
    keys = p_int.shape[-1]
    high = torch.floor(p_int / P_DIGIT)  # (BH, T_q, T_k) uint8 digits
    low = p_int - P_DIGIT * high
    bound = (P_DIGIT - 1) * Q_MAX * keys
    high_sum = _exact_int_matmul(high, qkv.v, bound).float()  # (BH, T_q, d) exact int32 values
    low_sum = _exact_int_matmul(low, qkv.v, bound).float()
    total = p_int.double().sum(dim=-1, keepdim=True).float()  # exact in float64, one rounding to fp32
    return (high_sum * P_DIGIT + low_sum) * (qkv.v_scale[:, None, :] / total)


def _apply_mask(scores: Tensor, attn_mask: Tensor, batch: int, heads: int) -> Tensor:
    """S plus an additive float mask, or S where a boolean mask is True and -inf elsewhere (SDPA's meanings);
    the mask broadcasts to ``(B, heads, T_q, T_k)``."""
    shape = (batch, heads, scores.shape[1], scores.shape[2])
    mask = attn_mask.expand(shape).reshape(scores.shape)
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()


def int8_sdpa_reference(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Attention of fp32 ``(B, heads, T_q, d)`` query and ``(B, heads, T_k, d)`` key / value with QK^T and PV on
    int8 integers (module docstring), in plain torch. Returns fp32 ``(B, heads, T_q, d_v)``.

    ``attn_mask``: None, an additive float mask or a boolean mask (True = attend), broadcastable to
    ``(B, heads, T_q, T_k)``, as :func:`torch.nn.functional.scaled_dot_product_attention` takes it.
    """
    batch, heads, queries, _ = query.shape
    if not all(bool(torch.isfinite(t).all()) for t in (query, key, value)):
        # NaN and infinities have no int8 image: the call answers NaN, as the kernel does
        return torch.full((batch, heads, queries, value.shape[-1]), float("nan"), device=query.device)
    qkv = quantize_qkv(query, key, value, scale)
    scores = _scores(qkv)  # (BH, T_q, T_k)
    if attn_mask is not None:
        scores = _apply_mask(scores, attn_mask, batch, heads)
    out = _weighted_values(_probabilities(scores), qkv)  # (BH, T_q, d_v)
    return out.reshape(batch, heads, queries, value.shape[-1])


# ------------------------------------------------------------------------------------------------ kernel
@dataclass(frozen=True)
class Int8AttentionSupport:
    """Whether the AMX kernel runs in this process; ``reason`` says why not ("" when it does)."""

    amx: bool
    reason: str = ""
    build_seconds: float = 0.0

    def describe(self) -> str:
        return "int8 attention on the AMX kernel" if self.amx else f"int8 attention in plain torch ({self.reason})"


@functools.cache
def int8_attention_support() -> Int8AttentionSupport:
    """Build the kernel once per process and check it on this CPU; every failure is a reason, never an error."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return Int8AttentionSupport(False, f"disabled by {DISABLE_ENV}")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return Int8AttentionSupport(
            False, f"the kernel is written for x86-64 Linux, not {platform.system()} {platform.machine()}"
        )
    problem, seconds = load_extension_once(_EXTENSION, _SOURCE)
    if problem:
        return Int8AttentionSupport(False, problem)
    status = int(torch.ops.quantdiff_attention.amx_status())
    if status == 1:
        return Int8AttentionSupport(False, "this CPU has no AMX-INT8 (amx_tile, amx_int8, avx512bw)", seconds)
    if status == 2:
        return Int8AttentionSupport(False, "the OS refused the AMX tile state (arch_prctl)", seconds)
    problem = _self_check()
    if problem:
        return Int8AttentionSupport(False, f"self-check failed: {problem}", seconds)
    return Int8AttentionSupport(True, "", seconds)


# Kernel vs reference on the same integers: only the softmax's last float bits differ (a P_q rounding flips now and then).
KERNEL_AGREEMENT_DB = 40.0


def _self_check() -> str:
    """The kernel against the reference on a small cross-attention call laid out as diffusers does (transposed
    views), with lengths and a head dimension that are multiples of nothing the kernel tiles by."""
    from quantdiff.primitives import sqnr_db

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, tokens, 2, 40, generator=generator).transpose(1, 2) for tokens in (37, 77, 77))
    agreement = sqnr_db(int8_sdpa_reference(query, key, value), int8_sdpa_kernel(query, key, value))
    return "" if agreement >= KERNEL_AGREEMENT_DB else f"{agreement:.1f} dB from the reference"


def int8_sdpa_kernel(query: Tensor, key: Tensor, value: Tensor, scale: float | None = None) -> Tensor:
    """The unmasked :func:`int8_sdpa_reference` on the AMX kernel: it quantizes fp32 ``(B, heads, T, d)``
    query / key / value itself (any strides with ``d`` contiguous, as diffusers' transposed views are) with the
    reference's formulas, so the integers are the same."""
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value)]
    kernel = torch.ops.quantdiff_attention.int8_attention
    return kernel(*tensors, _key_mean(key).contiguous(), _softmax_scale(query, scale))


def unsupported_reason(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> str:
    """Why a scaled-dot-product attention call cannot run in int8 at all ("" when it can): it then runs as
    it is (fp32 SDPA)."""
    if any(t.dtype != torch.float32 for t in (query, key, value)):
        return f"inputs are {query.dtype}, not float32"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not (B, heads, T, d)"
    if key.shape[:2] != query.shape[:2] or value.shape[:3] != key.shape[:3] or key.shape[-1] != query.shape[-1]:
        return "query / key / value shapes do not match (grouped-query attention?)"
    if dropout_p:
        return "dropout is on (training)"
    if is_causal or enable_gqa:
        return "causal or grouped-query attention"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "gradients are needed (rounding has none)"
    if key.shape[2] >= 65_000:
        return f"{key.shape[2]} keys: the int32 PV sums could overflow"
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32):
        return f"a {attn_mask.dtype} attention mask"
    return ""


def int8_sdpa(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """int8 attention on the AMX kernel where it runs (unmasked calls on a CPU with AMX-INT8), else in plain
    torch (:func:`int8_sdpa_reference`); the caller has checked :func:`unsupported_reason`."""
    if kernel_blocker(query, value, attn_mask) == "":
        return int8_sdpa_kernel(query, key, value, scale)
    return int8_sdpa_reference(query, key, value, attn_mask, scale)


def kernel_blocker(query: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> str:
    """Why a call that int8 attention takes runs in plain torch rather than on the kernel ("" when it does not)."""
    if attn_mask is not None:
        return "the call has an attention mask (the kernel takes unmasked calls only)"
    if query.device.type != "cpu":
        return f"the inputs are on {query.device.type}"
    if max(query.shape[-1], value.shape[-1]) > MAX_KERNEL_HEAD_DIM:
        return f"head dimension above {MAX_KERNEL_HEAD_DIM}"
    support = int8_attention_support()
    return "" if support.amx else support.reason
