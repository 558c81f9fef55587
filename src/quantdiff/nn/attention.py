"""Scaled-dot-product attention in bfloat16 on CPUs that compute bf16 natively, through attention processors.

Why: once conv and linear run on int8 kernels, attention (``F.scaled_dot_product_attention`` in fp32) is
what is left of a step. On a CPU with native bf16 matrix instructions (AMX-BF16 or AVX512-BF16) torch's CPU
flash attention runs 2.1-2.5x faster in bf16 than in fp32 at SD shapes, and its output agrees with fp32 to
48 dB per call, far above the 20-30 dB a W8A8 model is from fp32. Measured on a 2-core Xeon with AMX, SD1.5
UNet at 64x64: a W8A8 integer step 1.46 s with fp32 attention, 1.09 s with bf16 attention.
On CPUs without native bf16 (AVX2) it is emulated and slower, so ``"auto"`` keeps fp32 there.

How: every diffusers attention module (anything with ``processor`` and ``set_processor``) gets its processor
wrapped in a :class:`BF16AttentionProcessor`. While the wrapped processor runs, a ``TorchFunctionMode`` turns
its fp32 ``F.scaled_dot_product_attention`` calls into the same call on bf16 query / key / value, with the
output cast back. The projections (quantized or not), norms and everything else are untouched; no diffusers
code is copied, nothing global changes, and ``torch.compile`` traces through the mode. The wrapper keeps
the inner processor's call signature, which diffusers reads to route ``cross_attention_kwargs``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ATTENTION_CHOICES",
    "BF16AttentionProcessor",
    "attention_dtype",
    "native_bf16",
    "resolve_attention",
    "use_attention_dtype",
]

ATTENTION_CHOICES = ("auto", "float32", "bfloat16")
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which it may use native bf16 instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AMX", "AVX512_CORE_FP16", "AVX10", "ALL")


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AMX-BF16 / AVX512-BF16 in /proc/cpuinfo), and the flags found."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if not any(isa in cap for isa in _BF16_ISAS):
        return False, f"oneDNN capped at {cap}"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    found = [flag for flag in _BF16_FLAGS if flag in line.split(":", 1)[1].split()]
                    return bool(found), ", ".join(found) if found else "no amx_bf16 / avx512_bf16"
    except OSError:
        pass
    return False, "CPU flags unknown"


def resolve_attention(choice: str, device: str = "cpu") -> str:
    """``"auto"`` -> ``"bfloat16"`` for a model on a CPU with native bf16, else ``"float32"`` (on a GPU the
    model's own dtype decides); the others as they are."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r} is unknown: use one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "auto":
        return "bfloat16" if device == "cpu" and native_bf16()[0] else "float32"
    return choice


def _bf16(value: Any) -> Any:
    return value.to(torch.bfloat16) if isinstance(value, Tensor) and value.is_floating_point() else value


class _SDPAInBF16(TorchFunctionMode):
    """Runs fp32 ``F.scaled_dot_product_attention`` calls on bf16 inputs; every other call as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not args or args[0].dtype != torch.float32:
            return func(*args, **kwargs)
        # query, key, value (B, heads, T, d) and an additive float mask in bf16; dropout_p, scale stay numbers
        args = tuple(_bf16(value) for value in args)
        kwargs = {name: _bf16(value) for name, value in kwargs.items()}
        return func(*args, **kwargs).to(torch.float32)


class BF16AttentionProcessor:
    """Wraps a diffusers attention processor so that its scaled-dot-product attention runs in bf16.

    Use :func:`use_attention_dtype` rather than building these by hand: it wraps (and unwraps) every
    attention module of a model and gives each wrapper the inner processor's call signature.
    """

    def __init__(self, processor: Any):
        if isinstance(processor, BF16AttentionProcessor):
            processor = processor.processor
        self.processor = processor

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any):
        with _SDPAInBF16():
            return self.processor(attn, *args, **kwargs)

    def __repr__(self) -> str:
        return f"BF16AttentionProcessor({type(self.processor).__name__})"


def _wrapped(processor: Any) -> BF16AttentionProcessor:
    """A wrapper whose ``__call__`` signature is the inner processor's (diffusers routes kwargs by it)."""
    try:
        signature = inspect.signature(type(processor).__call__)
    except (TypeError, ValueError):  # a processor without an inspectable signature: the generic one
        return BF16AttentionProcessor(processor)

    def __call__(self, *args: Any, **kwargs: Any):
        return BF16AttentionProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"BF16{type(processor).__name__}", (BF16AttentionProcessor,), {"__call__": __call__})
    return cls(processor)


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None)):
            yield name, module


def use_attention_dtype(model: nn.Module, dtype: str) -> int:
    """Run every attention module's scaled-dot-product attention in ``dtype`` (``"bfloat16"`` or ``"float32"``).

    ``"float32"`` restores the processors the model had. Idempotent; returns the number of attention modules.
    Weights and ``state_dict`` are untouched.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"attention dtype {dtype!r} is unknown: use float32 or bfloat16 (or 'auto' upstream)")
    count = 0
    for _, module in _attention_modules(model):
        current = module.processor
        inner = current.processor if isinstance(current, BF16AttentionProcessor) else current
        wanted = _wrapped(inner) if dtype == "bfloat16" else inner
        if dtype == "bfloat16" and isinstance(current, BF16AttentionProcessor):
            wanted = current  # already wrapped
        if wanted is not current:
            module.set_processor(wanted)
        count += 1
    return count


def attention_dtype(model: nn.Module) -> str | None:
    """``"bfloat16"``, ``"float32"``, ``"mixed"``, or None when the model has no attention modules."""
    kinds = {
        "bfloat16" if isinstance(module.processor, BF16AttentionProcessor) else "float32"
        for _, module in _attention_modules(model)
    }
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"
