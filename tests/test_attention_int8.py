"""int8 scaled-dot-product attention (quantdiff.nn.int8_attention) and its attention-processor wrapper.

The math against fp32 SDPA on Gaussian inputs, the AMX kernel against the plain-torch reference (same integers),
masks and cross-attention shapes, and the wrapper on real tiny diffusers denoisers (no mocks): SDPA calls are
observed with a TorchFunctionMode, torch's own interception mechanism.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quantdiff.cli import build_parser
from quantdiff.errors import QuantDiffError
from quantdiff.evaluate import evaluate
from quantdiff.generate import describe_execution, load_any_pipeline
from quantdiff.nn import attention_dtype, use_attention_dtype
from quantdiff.nn.attention import Int8AttentionProcessor, int8_fallbacks, resolve_attention
from quantdiff.nn.int8_attention import (
    KERNEL_AGREEMENT_DB,
    int8_attention_support,
    int8_sdpa,
    int8_sdpa_kernel,
    int8_sdpa_reference,
    kernel_blocker,
    quantize_qkv,
)
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser
from quantdiff.serialization import save_quantized
from quantdiff.testing.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (B, heads, T_q, T_k, d, d_v): self- and cross-attention (77 text tokens), head dims of SD1.5 (40, 80, 160)
# and of the bundled digits models (4, 8), lengths that are multiples of nothing.
SHAPES = [
    (2, 4, 64, 64, 40, 40),
    (2, 4, 64, 77, 40, 40),
    (1, 2, 37, 19, 24, 24),
    (2, 8, 64, 20, 8, 8),
    (1, 2, 65, 130, 80, 80),
    (1, 2, 33, 64, 160, 160),
    (1, 3, 17, 5, 4, 12),
    (1, 2, 20, 33, 100, 72),
]
# Measured on Gaussian inputs at these shapes: 38-55 dB (the digits model's own activations: 50-62 dB).
MIN_GAUSSIAN_DB = 35.0


def _qkv(shape, seed=0):
    batch, heads, queries, keys, dim, dim_v = shape
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, queries, dim, generator=generator),
        torch.randn(batch, heads, keys, dim, generator=generator),
        torch.randn(batch, heads, keys, dim_v, generator=generator),
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_close_to_fp32_sdpa_but_not_equal(shape):
    query, key, value = _qkv(shape)
    expected = F.scaled_dot_product_attention(query, key, value)
    got = int8_sdpa_reference(query, key, value)
    assert got.shape == expected.shape and got.dtype == torch.float32
    quality = sqnr_db(expected, got)
    print(f"{shape}: int8 attention vs fp32 SDPA {quality:.1f} dB")
    assert MIN_GAUSSIAN_DB <= quality < 80  # rounded (not fp32 itself), but by int8 rounding only


def test_quantization_follows_the_stated_granularity():
    query, key, value = _qkv((2, 3, 10, 12, 16, 8))
    key = key + 5.0  # a shared offset: the smoothing removes it before the keys are quantized
    qkv = quantize_qkv(query, key, value, scale=0.5)
    assert qkv.q.dtype == qkv.k.dtype == qkv.v.dtype == torch.int8
    assert qkv.q_scale.shape == (6, 10) and qkv.k_scale.shape == (6, 12) and qkv.v_scale.shape == (6, 8)
    # every query row and key row reaches +-127 (its own scale); every value channel does over the tokens
    assert bool((qkv.q.abs().amax(-1) == 127).all()) and bool((qkv.k.abs().amax(-1) == 127).all())
    assert bool((qkv.v.abs().amax(1) == 127).all())
    rows = query.reshape(6, 10, 16).abs().amax(-1) / 127 * 0.5  # times the softmax scale given
    assert torch.allclose(qkv.q_scale, rows)
    smoothed = key.reshape(6, 12, 16) - key.reshape(6, 12, 16).mean(1, keepdim=True)
    assert torch.allclose(qkv.k_scale, smoothed.abs().amax(-1) / 127)
    # the default softmax scale is 1 / sqrt(d)
    assert torch.allclose(quantize_qkv(query, key, value).q_scale, qkv.q_scale * 2 / math.sqrt(16))


def _fake_int8_attention(query, key, value, smooth=True, levels=65535, normalized=False):
    """The module's math in float ((B, heads, T, d) inputs), with one choice changed: no key smoothing, P at
    ``levels`` (255: one uint8), or P rounded after normalizing (1/levels of the row sum, not of its max)."""

    def _int8(x, dim):
        scale = x.abs().amax(dim, keepdim=True) / 127
        return torch.round(x / scale) * scale

    if smooth:
        key = key - key.mean(dim=2, keepdim=True)
    scores = _int8(query, -1) @ _int8(key, -1).transpose(-1, -2) / math.sqrt(query.shape[-1])
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    if normalized:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = torch.round(weights * levels)
    return (weights @ _int8(value, -2)) / weights.sum(-1, keepdim=True).clamp_min(1)


def test_the_fake_quant_mirror_is_the_reference():
    query, key, value = _qkv((1, 2, 50, 60, 40, 40), seed=6)
    assert sqnr_db(int8_sdpa_reference(query, key, value), _fake_int8_attention(query, key, value)) > 90


def test_key_smoothing_and_16_bit_probabilities_are_what_keeps_the_error_low():
    """Ablations of the choices of the module docstring, measured here (SQNR vs fp32 SDPA): keys with a shared
    offset lose dB without the smoothing; one uint8 of P loses dB on long rows; a scale of 1/255 of the
    *normalized* P rounds most of P to 0."""
    query, key, value = _qkv((1, 4, 256, 1024, 40, 40), seed=1)
    key = key + 3 * torch.randn(1, 4, 1, 40, generator=torch.Generator().manual_seed(2))
    expected = F.scaled_dot_product_attention(query, key, value)
    chosen = sqnr_db(expected, int8_sdpa_reference(query, key, value))
    unsmoothed = sqnr_db(expected, _fake_int8_attention(query, key, value, smooth=False))
    one_byte = sqnr_db(expected, _fake_int8_attention(query, key, value, levels=255))
    normalized = sqnr_db(expected, _fake_int8_attention(query, key, value, levels=255, normalized=True))
    print(
        f"chosen {chosen:.1f} dB, unsmoothed keys {unsmoothed:.1f}, P in one uint8 {one_byte:.1f}, "
        f"P at 1/255 of the sum {normalized:.1f}"
    )
    assert chosen > unsmoothed + 2.5  # measured 38.8 vs 34.1 dB
    assert chosen > one_byte + 2.0  # measured 38.8 vs 35.1 dB
    assert normalized < 10  # measured -1.5 dB


@pytest.mark.parametrize("kind", ["additive", "boolean"])
def test_masks_mean_what_they_mean_in_sdpa(kind):
    query, key, value = _qkv((2, 2, 24, 30, 40, 40))
    keep = torch.rand(2, 1, 24, 30, generator=torch.Generator().manual_seed(3)) > 0.3  # (B, 1, T_q, T_k)
    keep[..., 0] = True  # no fully masked row
    if kind == "boolean":
        mask = keep
    else:  # a finite additive mask as diffusers builds it, plus a soft bias on the kept keys
        mask = torch.where(keep, 0.5 * torch.randn(2, 1, 24, 30), torch.full_like(keep, -10000.0, dtype=torch.float))
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    got = int8_sdpa(query, key, value, attn_mask=mask)
    assert sqnr_db(expected, got) >= MIN_GAUSSIAN_DB
    unmasked = int8_sdpa(query, key, value)
    assert sqnr_db(expected, unmasked) < 15  # the mask did change the result
    if kind == "boolean":  # the same as -inf added where False
        additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        assert torch.equal(got, int8_sdpa_reference(query, key, value, attn_mask=additive))


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_computes_the_reference_integers(shape):
    support = int8_attention_support()
    if not support.amx:
        pytest.skip(support.reason)
    query, key, value = _qkv(shape, seed=4)
    expected = int8_sdpa_reference(query, key, value, scale=0.3)
    got = int8_sdpa_kernel(query, key, value, scale=0.3)
    # same integers and the same fp32 epilogue: only the softmax's last bits (exp's polynomial, q_scale applied
    # after the max) can flip a rounding of P (measured: 112-115 dB at four of these shapes, identical at the
    # others; 85 dB where a flip was worst)
    agreement = sqnr_db(expected, got)
    assert agreement >= max(KERNEL_AGREEMENT_DB, 60.0), agreement
    assert torch.equal(int8_sdpa(query, key, value, scale=0.3), got)  # the dispatcher takes the kernel
    # diffusers' layout: (B, T, heads, d) transposed to (B, heads, T, d), read in place
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value)]
    assert not strided[0].is_contiguous()
    assert torch.equal(int8_sdpa_kernel(*strided, scale=0.3), got)


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_answer_nan_on_both_paths(where, bad):
    tensors = dict(zip(("query", "key", "value"), _qkv(SHAPES[1]), strict=True))
    tensors[where][1, 2, 5, 7] = bad
    assert bool(int8_sdpa_reference(**tensors).isnan().all())
    assert bool(int8_sdpa(**tensors).isnan().all())  # the kernel where it runs


def test_the_kernel_is_not_used_where_it_cannot_run():
    query, key, value = _qkv(SHAPES[0])
    mask = torch.zeros(1, 1, 64, 64)
    assert "attention mask" in kernel_blocker(query, value, mask)
    wide = torch.randn(1, 1, 4, 1100)
    assert kernel_blocker(wide, wide) == "head dimension above 1024"
    assert torch.equal(int8_sdpa(wide, wide, wide), int8_sdpa_reference(wide, wide, wide))


def test_without_the_extension_the_reference_runs_and_says_why(monkeypatch):
    query, key, value = _qkv(SHAPES[1])
    int8_attention_support.cache_clear()
    monkeypatch.setenv("QUANTDIFF_NO_EXTENSION", "1")
    try:
        support = int8_attention_support()
        assert not support.amx and support.reason == "disabled by QUANTDIFF_NO_EXTENSION"
        assert "plain torch (disabled by QUANTDIFF_NO_EXTENSION)" in support.describe()
        assert torch.equal(int8_sdpa(query, key, value), int8_sdpa_reference(query, key, value))
    finally:
        int8_attention_support.cache_clear()


class _RecordCalls(TorchFunctionMode):
    """Counts scaled-dot-product attention calls, and key means: int8 attention takes one per call (the
    smoothing of K, in either path), the diffusers processors none."""

    def __init__(self):
        super().__init__()
        self.sdpa = 0
        self.means = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.sdpa += 1
        if func in (torch.Tensor.mean, torch.mean):
            self.means += 1
        return func(*args, **(kwargs or {}))


def _sd15_denoiser_and_inputs():
    pipe = build_tiny_pipeline("sd15", seed=0)
    _, denoiser = denoiser_of(pipe)
    generator = torch.Generator().manual_seed(0)
    config = denoiser.config
    inputs = {
        "sample": torch.randn(2, config.in_channels, 16, 16, generator=generator),  # (B, C, H, W)
        "timestep": torch.tensor([500, 500]),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=generator),
        "return_dict": False,
    }
    return denoiser.eval(), inputs


def test_int8_wrapper_replaces_every_sdpa_call_and_unwraps_exactly():
    denoiser, inputs = _sd15_denoiser_and_inputs()
    before = dict(denoiser.attn_processors)
    int8_attention_support()  # its one-time self-check runs outside the recorded calls
    with torch.no_grad():
        with _RecordCalls() as fp32_calls:
            reference = denoiser(**inputs)[0]
        use_attention_dtype(denoiser, "bfloat16")  # switching from another wrapper replaces it
        count = use_attention_dtype(denoiser, "int8")
        assert count == len(before) > 0 and attention_dtype(denoiser) == "int8"
        assert use_attention_dtype(denoiser, "int8") == count  # idempotent
        wrappers = list(denoiser.attn_processors.values())
        assert all(isinstance(p, Int8AttentionProcessor) for p in wrappers)
        assert all(type(p.processor) is type(before[name]) for name, p in denoiser.attn_processors.items())
        with _RecordCalls() as int8_calls:
            reduced = denoiser(**inputs)[0]
    assert fp32_calls.sdpa > 0 and fp32_calls.means == 0
    assert int8_calls.sdpa == 0 and int8_calls.means == fp32_calls.sdpa  # every call went through int8
    assert int8_fallbacks(denoiser) == {}
    quality = sqnr_db(reference, reduced)
    print(f"sd15 tiny: int8 attention vs fp32 at the denoiser output: {quality:.1f} dB")
    assert 25 <= quality < 100
    use_attention_dtype(denoiser, "float32")
    assert attention_dtype(denoiser) == "float32"
    assert all(denoiser.attn_processors[name] is processor for name, processor in before.items())
    with torch.no_grad():
        assert torch.equal(denoiser(**inputs)[0], reference)


def test_calls_int8_cannot_take_run_in_fp32_and_are_counted():
    denoiser, inputs = _sd15_denoiser_and_inputs()
    with torch.no_grad():
        reference = denoiser(**inputs)[0]
    use_attention_dtype(denoiser, "int8")
    with _RecordCalls() as calls:
        out = denoiser(**inputs)[0]  # with gradients: rounding has none, so SDPA runs as it is
    assert torch.equal(out.detach(), reference) and calls.sdpa > 0
    assert int8_fallbacks(denoiser) == {"gradients are needed (rounding has none)": calls.sdpa}


def test_int8_is_refused_where_it_cannot_run(tiny_folders, tmp_path):
    assert resolve_attention("int8") == "int8" and resolve_attention("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="attention='int8' runs on the CPU only; this model is on cuda"):
        resolve_attention("int8", "cuda")
    assert resolve_attention("auto") != "int8"  # never chosen by auto
    pipe = load_pipeline(tiny_folders["sd15"])
    _, denoiser = denoiser_of(pipe)
    quantize_denoiser(denoiser, "w8a16", progress=False)
    save_quantized(pipe, tmp_path / "q", base_path=tiny_folders["sd15"])
    with pytest.raises(QuantDiffError, match=r"--attention int8\) takes effect in integer or auto execution only"):
        load_any_pipeline(tmp_path / "q", execution="reference", attention="int8")
    with pytest.raises(QuantDiffError, match="add --execution integer"):  # before any image is generated
        evaluate(tiny_folders["sd15"], [tmp_path / "q"], attention="int8", progress=False)
    loaded = load_any_pipeline(tmp_path / "q", execution="integer", attention="int8")
    assert attention_dtype(denoiser_of(loaded)[1]) == "int8"
    assert "attention in int8 (QK^T and PV in int8, softmax in float32)" in describe_execution(loaded)
    args = build_parser().parse_args(["eval", "m", "--out", "o", "--attention", "int8", "--execution", "integer"])
    assert args.attention == "int8"
