"""bf16 scaled-dot-product attention through wrapped attention processors (quantdiff.nn.attention).

Real tiny denoisers of every architecture; the dtype SDPA sees is read by a TorchFunctionMode around the
call, which is torch's own interception mechanism (no mock).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quantdiff.nn import (
    attention,
    attention_dtype,
    native_bf16,
    use_attention_dtype,
    use_integer_kernels,
    use_reference,
)
from quantdiff.nn.attention import BF16AttentionProcessor, resolve_attention
from quantdiff.pipelines.loading import denoiser_of
from quantdiff.primitives import sqnr_db
from quantdiff.testing.tiny import build_tiny_pipeline


class _RecordSDPA(TorchFunctionMode):
    """Records the query dtype and the QK^T + PV FLOPs of every scaled-dot-product attention call."""

    def __init__(self):
        super().__init__()
        self.dtypes, self.flops = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]  # (B, heads, T_q, d), (B, heads, T_k, d)
            self.dtypes.append(query.dtype)
            self.flops.append(4 * query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] * query.shape[3])
        return func(*args, **(kwargs or {}))


def _denoiser_and_inputs(arch: str):
    pipe = build_tiny_pipeline(arch, seed=0)
    _, denoiser = denoiser_of(pipe)
    generator = torch.Generator().manual_seed(0)
    config = denoiser.config
    sample = torch.randn(2, config.in_channels, 16, 16, generator=generator)  # (B, C, H, W)
    if arch in ("sd15", "sdxl"):
        inputs = {"sample": sample, "timestep": torch.tensor([500, 500])}
        inputs["encoder_hidden_states"] = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
        if arch == "sdxl":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(2, pooled, generator=generator),
                "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).expand(2, 6),
            }
    elif arch == "sd3":
        inputs = {
            "hidden_states": sample,
            "timestep": torch.tensor([500.0, 500.0]),
            "encoder_hidden_states": torch.randn(2, 77 + 8, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        }
    else:  # pixart
        inputs = {
            "hidden_states": sample,
            "timestep": torch.tensor([500, 500]),
            "encoder_hidden_states": torch.randn(2, 12, config.caption_channels, generator=generator),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    return denoiser.eval(), {**inputs, "return_dict": False}


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "pixart"])
def test_bf16_attention_changes_only_sdpa_and_unwraps_exactly(arch):
    denoiser, inputs = _denoiser_and_inputs(arch)
    before = dict(denoiser.attn_processors)
    state = {name: tensor.clone() for name, tensor in denoiser.state_dict().items()}
    with torch.no_grad():
        with _RecordSDPA() as fp32_calls:
            reference = denoiser(**inputs)[0]
        count = use_attention_dtype(denoiser, "bfloat16")
        assert count == len(before) > 0 and attention_dtype(denoiser) == "bfloat16"
        assert use_attention_dtype(denoiser, "bfloat16") == count  # idempotent: not wrapped twice
        assert all(type(p.processor) is type(before[name]) for name, p in denoiser.attn_processors.items())
        with _RecordSDPA() as bf16_calls:
            reduced = denoiser(**inputs)[0]
        copied = copy.deepcopy(denoiser)
        assert torch.equal(copied(**inputs)[0], reduced)
    assert fp32_calls.dtypes and set(fp32_calls.dtypes) == {torch.float32}
    assert len(bf16_calls.dtypes) == len(fp32_calls.dtypes) and set(bf16_calls.dtypes) == {torch.bfloat16}
    assert reduced.dtype == torch.float32
    quality = sqnr_db(reference, reduced)
    print(f"{arch}: bf16 attention vs fp32 at the output: {quality:.1f} dB")
    assert 30 <= quality < 200  # changed (not bit-identical), but by bf16 rounding only
    assert all(torch.equal(state[name], tensor) for name, tensor in denoiser.state_dict().items())

    use_attention_dtype(denoiser, "float32")
    assert attention_dtype(denoiser) == "float32"
    assert all(denoiser.attn_processors[name] is processor for name, processor in before.items())
    with torch.no_grad():
        assert torch.equal(denoiser(**inputs)[0], reference)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "pixart"])
def test_auto_gives_bf16_to_large_calls_only(arch, monkeypatch):
    denoiser, inputs = _denoiser_and_inputs(arch)
    with torch.no_grad(), _RecordSDPA() as fp32_calls:
        denoiser(**inputs)
    sizes = sorted(set(fp32_calls.flops))
    # a threshold between the call sizes this model makes, so that both sides are exercised where it can
    threshold = sizes[len(sizes) // 2] if len(sizes) > 1 else sizes[0]
    monkeypatch.setattr(attention, "AUTO_BF16_MIN_FLOPS", float(threshold))
    use_attention_dtype(denoiser, "bfloat16-large")
    assert attention_dtype(denoiser) == "bfloat16-large"
    with torch.no_grad(), _RecordSDPA() as auto_calls:
        denoiser(**inputs)
    assert auto_calls.flops == fp32_calls.flops  # the estimate from the module's inputs is the exact call size
    expected = [torch.bfloat16 if flops >= threshold else torch.float32 for flops in fp32_calls.flops]
    assert auto_calls.dtypes == expected and torch.bfloat16 in expected
    if len(sizes) > 1:
        assert torch.float32 in expected
    use_attention_dtype(denoiser, "bfloat16")  # forced: every call, whatever its size
    with torch.no_grad(), _RecordSDPA() as forced_calls:
        denoiser(**inputs)
    assert set(forced_calls.dtypes) == {torch.bfloat16} and attention_dtype(denoiser) == "bfloat16"


def test_wrapper_keeps_the_inner_signature_for_diffusers_kwargs_routing():
    import inspect

    denoiser, _ = _denoiser_and_inputs("sd15")
    inner = next(iter(denoiser.attn_processors.values()))
    use_attention_dtype(denoiser, "bfloat16")
    wrapped = next(iter(denoiser.attn_processors.values()))
    assert isinstance(wrapped, BF16AttentionProcessor) and wrapped.processor is inner
    # diffusers' Attention.forward keeps only the cross_attention_kwargs the processor's signature names
    assert inspect.signature(wrapped.__call__).parameters.keys() == inspect.signature(inner.__call__).parameters.keys()


def test_auto_follows_the_cpu_and_integer_mode_sets_and_reference_restores_it(monkeypatch):
    native, flags = native_bf16()
    assert resolve_attention("auto") == ("bfloat16-large" if native else "float32"), flags
    assert resolve_attention("float32") == "float32" and resolve_attention("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="attention='fp16' is unknown"):
        resolve_attention("fp16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below bf16: auto keeps fp32
    assert native_bf16()[0] is False and resolve_attention("auto") == "float32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    denoiser, _ = _denoiser_and_inputs("sd15")
    summary = use_integer_kernels(denoiser, attention="bfloat16")
    assert summary.attention == "bfloat16" and "attention in bfloat16" in summary.format()
    assert summary.to_dict()["attention"] == "bfloat16"
    back = use_reference(denoiser)
    assert back.attention == "float32" and attention_dtype(denoiser) == "float32"
    assert use_integer_kernels(denoiser, attention="float32").attention == "float32"
