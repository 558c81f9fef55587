"""Scaled-dot-product attention in bfloat16 on CPUs that compute bf16 natively, through attention processors.

Why: once conv and linear run on int8 kernels, attention (``F.scaled_dot_product_attention`` in fp32) is
what is left of a step. On a CPU with native bf16 matrix instructions (AMX-BF16 or AVX512-BF16) torch's CPU
flash attention runs 2.1-2.5x faster in bf16 than in fp32 at SD shapes, and its output agrees with fp32 to
48 dB per call, far above the 20-30 dB a W8A8 model is from fp32. Measured on a 2-core Xeon with AMX, SD1.5
UNet at 64x64: a W8A8 integer step 1.46 s with fp32 attention, 1.09 s with bf16 attention.
On CPUs without native bf16 (AVX2) it is emulated and slower, so ``"auto"`` keeps fp32 there. Small
attention calls lose: the conversion and the mode's per-op Python cost (every op of the processor passes
through it, quantized projections included: ~260 us per module call on the bundled digits models) outweigh a
bf16 saving of a few tens of microseconds, so ``"auto"`` gives bf16 only to calls of at least
:data:`AUTO_BF16_MIN_FLOPS` (``"bfloat16"`` forces it on every call). Measured per SDPA call on the Xeon (1
thread, fp32 -> bf16 us): 2x8 heads x 1024 x 1024 x 40: 26180 -> 12992 (0.50x); 2x8x4096x77x40: 18710 ->
16089 (0.86x); 2x8x64x64x160 (21 MFLOP): 452 -> 343; 2x2x64x64x32 (1 MFLOP): 36 -> 48.

How: every diffusers attention module (anything with ``processor`` and ``set_processor``) gets its processor
wrapped in a :class:`BF16AttentionProcessor`. While the wrapped processor runs, a ``TorchFunctionMode`` turns
its fp32 ``F.scaled_dot_product_attention`` calls into the same call on bf16 query / key / value, with the
output cast back. The projections (quantized or not), norms and everything else are untouched; no diffusers
code is copied, nothing global changes, and ``torch.compile`` traces through the mode. The wrapper keeps
the inner processor's call signature, which diffusers reads to route ``cross_attention_kwargs``.

``"int8"`` (off by default, never chosen by ``"auto"``): the same kind of wrapper, an
:class:`Int8AttentionProcessor`, turns the fp32 SDPA calls into :func:`quantdiff.nn.int8_attention.int8_sdpa`:
QK^T and PV on int8 integers with the softmax in fp32, on the AMX kernel where the CPU has AMX-INT8 (else in
plain torch). Calls it cannot take (dropout, causal, gradients, non-fp32 inputs) run in fp32 and are counted
with the reason (:func:`int8_fallbacks`). Measured (benchmarks/KERNELS.md, section 7): 38-40 dB from fp32 per
call on Gaussian inputs at SD1.5 shapes (bf16: 48-49 dB), 56 / 47 dB on the digits-sd / digits-sd3 models'
own attention inputs (bf16: 54.5 / 52.5 dB), their W8A8 images as with fp32 attention; on the 2-core AMX Xeon
(2 threads, batch 1) 0.87x bf16's time at 1x8x4096x4096x40, 0.60x at the 77-token cross-attention, slower than
bf16 at 1024 tokens and below: 0.88x bf16's attention time over an SD1.5 step at 64x64, 0.96x the whole W8A8
step. Hence off by default: a small gain at large sizes, a loss at small ones, 10 dB less per call than bf16.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ATTENTION_CHOICES",
    "ATTENTION_DTYPES",
    "AUTO_BF16_MIN_FLOPS",
    "AttentionModeProcessor",
    "BF16AttentionProcessor",
    "BOSAwareAttentionProcessor",
    "Int8AttentionProcessor",
    "attention_flops",
    "describe_attention",
    "attention_dtype",
    "int8_fallbacks",
    "native_bf16",
    "resolve_attention",
    "use_attention_dtype",
    "use_bos_aware_attention",
]

ATTENTION_CHOICES = ("auto", "float32", "bfloat16", "int8")
# What use_attention_dtype can set: "bfloat16-large" is bf16 for calls of at least AUTO_BF16_MIN_FLOPS only.
ATTENTION_DTYPES = ("float32", "bfloat16", "bfloat16-large", "int8")
# QK^T + PV multiply-adds x2 of one call from which bf16 pays for the mode around the processor (see above).
AUTO_BF16_MIN_FLOPS = 64e6
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
    """``"auto"`` -> ``"bfloat16-large"`` (bf16 for large calls, see :data:`AUTO_BF16_MIN_FLOPS`) for a model
    on a CPU with native bf16, else ``"float32"`` (on a GPU the model's own dtype decides); the others as they
    are."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r} is unknown: use one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "int8" and device != "cpu":
        # a model on a GPU computes attention in its own (half) dtype, which the int8 mode does not take
        raise ValueError(f"attention='int8' runs on the CPU only; this model is on {device}: use auto or float32")
    if choice == "auto":
        return "bfloat16-large" if device == "cpu" and native_bf16()[0] else "float32"
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


class _SDPAInInt8(TorchFunctionMode):
    """Runs fp32 ``F.scaled_dot_product_attention`` calls as int8 attention
    (:func:`quantdiff.nn.int8_attention.int8_sdpa`); calls it cannot take run as they are, their reason counted
    in ``fallbacks``."""

    def __init__(self, fallbacks: Counter):
        super().__init__()
        self.fallbacks = fallbacks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not args or args[0].dtype != torch.float32:
            return func(*args, **kwargs)
        from quantdiff.nn.int8_attention import int8_sdpa, unsupported_reason

        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args, strict=False)), **kwargs}  # positional, then keywords
        reason = unsupported_reason(
            call["query"],
            call["key"],
            call["value"],
            call.get("attn_mask"),
            call.get("dropout_p", 0.0),
            call.get("is_causal", False),
            call.get("enable_gqa", False),
        )
        if reason:
            self.fallbacks[reason] += 1
            return func(*args, **kwargs)
        return int8_sdpa(call["query"], call["key"], call["value"], call.get("attn_mask"), call.get("scale"))


class AttentionModeProcessor:
    """Wraps a diffusers attention processor so that its scaled-dot-product attention runs in another number
    format (the subclasses: bf16, int8) while the rest of the processor runs as it is.

    Use :func:`use_attention_dtype` rather than building these by hand: it wraps (and unwraps) every
    attention module of a model and gives each wrapper the inner processor's call signature.
    """

    dtype = ""  # the attention_dtype() name of the subclass
    prefix = ""  # of its class name, and of the signature-keeping subclasses' names

    def __init__(self, processor: Any, min_flops: float = 0.0):
        if isinstance(processor, AttentionModeProcessor):
            processor = processor.processor
        self.processor = processor
        self.min_flops = min_flops  # calls below this many attention FLOPs run the inner processor as it is

    def _mode(self) -> TorchFunctionMode:
        raise NotImplementedError

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any):
        if self.min_flops and attention_flops(attn, *args, **kwargs) < self.min_flops:
            return self.processor(attn, *args, **kwargs)
        with self._mode():
            return self.processor(attn, *args, **kwargs)

    def __repr__(self) -> str:
        above = f", from {self.min_flops / 1e6:g} MFLOP" if self.min_flops else ""
        return f"{self.prefix}AttentionProcessor({type(self.processor).__name__}{above})"


class BF16AttentionProcessor(AttentionModeProcessor):
    """Scaled-dot-product attention in bf16 (module docstring)."""

    dtype = "bfloat16"
    prefix = "BF16"

    def _mode(self) -> TorchFunctionMode:
        return _SDPAInBF16()


class Int8AttentionProcessor(AttentionModeProcessor):
    """Scaled-dot-product attention with QK^T and PV in int8 (:mod:`quantdiff.nn.int8_attention`).

    ``fallbacks`` counts the calls that ran in fp32 instead, by reason."""

    dtype = "int8"
    prefix = "Int8"

    def __init__(self, processor: Any, min_flops: float = 0.0):
        super().__init__(processor, min_flops)
        self.fallbacks: Counter = Counter()

    def _mode(self) -> TorchFunctionMode:
        return _SDPAInInt8(self.fallbacks)


def attention_flops(
    attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *_, **kw
) -> float:
    """FLOPs of QK^T and PV in one call of a diffusers attention module, from its inputs' shapes.

    Self-attention attends the image tokens to themselves, cross-attention to the text tokens, and joint
    attention (SD3's MMDiT: modules with ``add_q_proj``) the concatenation of both to itself.
    """
    encoder_hidden_states = kw.get("encoder_hidden_states", encoder_hidden_states)
    if hidden_states.dim() == 4:  # (B, C, H, W): a UNet mid-block attention on a feature map
        batch, width, tokens = (
            hidden_states.shape[0],
            hidden_states.shape[1],
            hidden_states.shape[2] * hidden_states.shape[3],
        )
    else:  # (B, T, C)
        batch, tokens, width = hidden_states.shape
    inner = getattr(attn, "inner_dim", None) or width
    if encoder_hidden_states is None:
        queries = keys = tokens
    elif getattr(attn, "add_q_proj", None) is not None:
        queries = keys = tokens + encoder_hidden_states.shape[1]
    else:
        queries, keys = tokens, encoder_hidden_states.shape[1]
    return 4.0 * batch * queries * keys * inner


def _wrapped(processor: Any, min_flops: float = 0.0, family: type = BF16AttentionProcessor) -> AttentionModeProcessor:
    """A ``family`` wrapper whose ``__call__`` signature is the inner processor's (diffusers routes kwargs by
    it)."""
    try:
        signature = inspect.signature(type(processor).__call__)
    except (TypeError, ValueError):  # a processor without an inspectable signature: the generic one
        return family(processor, min_flops)

    def __call__(self, *args: Any, **kwargs: Any):
        return AttentionModeProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"{family.prefix}{type(processor).__name__}", (family,), {"__call__": __call__})
    return cls(processor, min_flops)


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None)):
            yield name, module


def use_attention_dtype(model: nn.Module, dtype: str) -> int:
    """Run every attention module's scaled-dot-product attention in ``dtype``: ``"bfloat16"``, ``"float32"``,
    ``"bfloat16-large"`` (bf16 for calls of at least :data:`AUTO_BF16_MIN_FLOPS`, fp32 below) or ``"int8"``
    (QK^T and PV in int8, :mod:`quantdiff.nn.int8_attention`).

    ``"float32"`` restores the processors the model had. Idempotent; returns the number of attention modules.
    Weights and ``state_dict`` are untouched.
    """
    if dtype not in ATTENTION_DTYPES:
        raise ValueError(
            f"attention dtype {dtype!r} is unknown: use one of {', '.join(ATTENTION_DTYPES)} (or 'auto' upstream)"
        )
    min_flops = AUTO_BF16_MIN_FLOPS if dtype == "bfloat16-large" else 0.0
    family = Int8AttentionProcessor if dtype == "int8" else BF16AttentionProcessor
    count = 0
    for _, module in _attention_modules(model):
        current = module.processor
        inner = current.processor if isinstance(current, AttentionModeProcessor) else current
        wanted = inner if dtype == "float32" else _wrapped(inner, min_flops, family)
        if isinstance(current, family) and dtype != "float32" and current.min_flops == min_flops:
            wanted = current  # already wrapped
        if wanted is not current:
            module.set_processor(wanted)
        count += 1
    return count


def attention_dtype(model: nn.Module) -> str | None:
    """``"bfloat16"``, ``"bfloat16-large"``, ``"int8"``, ``"float32"``, ``"mixed"``, or None when the model has
    no attention modules."""
    kinds = {_dtype_of(module.processor) for _, module in _attention_modules(model)}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _dtype_of(processor: Any) -> str:
    if not isinstance(processor, AttentionModeProcessor):
        return "float32"
    if processor.dtype == "bfloat16" and processor.min_flops:
        return "bfloat16-large"
    return processor.dtype


def describe_attention(dtype: str) -> str:
    """A reader's words for an :func:`attention_dtype` value."""
    if dtype == "bfloat16-large":
        return f"bfloat16 for calls of {AUTO_BF16_MIN_FLOPS / 1e6:g} MFLOP and more, float32 below"
    if dtype == "int8":  # where it ran (kernel or plain torch) is int8_attention_support()'s, of this process
        return "int8 (QK^T and PV in int8, softmax in float32)"
    return dtype


def int8_fallbacks(model: nn.Module) -> dict[str, int]:
    """Calls of ``model``'s int8 attention wrappers that ran in fp32 instead, counted by reason."""
    total: Counter = Counter()
    for _, module in _attention_modules(model):
        if isinstance(module.processor, Int8AttentionProcessor):
            total.update(module.processor.fallbacks)
    return dict(total)


# ------------------------------------------------------------------------------- BOS-aware cross-attention
# MixDQ's BOS-aware quantization of the text keys and values (algorithms/bos_aware.py): a causal text encoder
# (CLIP) gives the first token the same features for every prompt, an outlier that per-tensor input scales
# would have to cover. So its key and value are computed once in floating point and stored on the projection
# (the layer extra "bos_kv": ``bos_input`` (C_in,), ``bos_output`` (C_out,)); the quantized projection is
# calibrated on, and runs on, the other tokens only. At run time a wrapper around the module's processor lends
# ``to_k`` / ``to_v`` to a helper for the duration of the call, which returns
# ``cat([bos_output, layer(x[:, 1:])], dim=1)``: the processor (any of diffusers', SDPA or not, with its masks
# and norms) computes on exactly the tensor the float projection would have given it, nothing of diffusers is
# copied, and the projections keep their names (state_dict, saving, taps).
BOS_EXTRA = "bos_kv"
# A first token within this fraction of the stored BOS input's largest magnitude (per feature) counts as the
# BOS. Why not 0: the same prompt batch-encoded at another batch size may round differently (fp16 spacing is
# 2^-10 relative); any real other token differs by order 1.
BOS_MATCH_TOLERANCE = 1e-3


def first_token_matches(first: Tensor, bos_input: Tensor, tolerance: float = BOS_MATCH_TOLERANCE) -> Tensor:
    """``(B,)`` bool: which rows of ``first`` ``(B, C)`` are the stored BOS input ``(C,)`` within ``tolerance``
    (relative to the BOS input's largest magnitude)."""
    bos = bos_input.to(first.dtype)
    limit = tolerance * float(bos.abs().max())
    return (first - bos).abs().amax(dim=-1) <= limit  # (B,)


def _first_token_output(layer: nn.Module, first: Tensor) -> Tensor:
    """``(B, C_out)``: the projection of each row's first token ``first`` ``(B, C_in)``: the stored float row
    where the token is the BOS, else (an empty prompt encoded as zeros, or another encoder's features) the
    layer itself on that token."""
    if BOS_EXTRA not in getattr(layer, "extras", {}):
        return layer(first[:, None, :])[:, 0]  # a float projection, or one quantized with the token as it is
    out = layer.bos_output.to(first.dtype).expand(first.shape[0], -1)  # (B, C_out)
    bos_input = layer.bos_input.to(first.dtype)
    if torch.equal(first, bos_input.expand_as(first)):  # the usual case, in one op: every row is the BOS exactly
        return out
    matches = first_token_matches(first, bos_input)
    if bool(matches.all()):
        return out
    others = ~matches
    if bool(first[others].any()):  # all-zero rows are the zeros-for-empty-prompt convention: expected
        _warn_once(layer, first[others], layer.bos_input)
    out = out.clone()
    out[others] = layer(first[others][:, None, :])[:, 0].to(out.dtype)
    return out


_WARNED: set[int] = set()


def _warn_once(layer: nn.Module, first: Tensor, bos_input: Tensor) -> None:
    import warnings

    if id(layer) in _WARNED:
        return
    _WARNED.add(id(layer))
    spread = float((first - bos_input.to(first.dtype)).abs().max() / bos_input.abs().max())
    warnings.warn(
        f"{getattr(layer, 'layer_plan', None) and layer.layer_plan.name or type(layer).__name__}: a text sequence "
        f"starts with a token other than the BOS its key / value were precomputed for (max |difference| "
        f"{spread:.3g} of its magnitude); that token runs through the quantized projection, calibrated without it. "
        "Was the text encoded by another encoder than at calibration?",
        stacklevel=4,
    )


class _FirstTokenPrecomputed(nn.Module):
    """Stands in for ``to_k`` / ``to_v`` during one attention call: the first token's row from
    :func:`_first_token_output`, the other tokens through the projection."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C_in) -> (B, T, C_out)
        rest = self.layer(x[:, 1:])  # (B, T - 1, C_out)
        first = _first_token_output(self.layer, x[:, 0])  # (B, C_out)
        return torch.cat([first[:, None, :].to(rest.dtype), rest], dim=1)


class BOSAwareAttentionProcessor:
    """Wraps a diffusers attention processor so that a cross-attention's first text token takes the key and
    value precomputed in floating point (see the section comment above); self-attention calls (no
    ``encoder_hidden_states``) pass through. Install with :func:`use_bos_aware_attention`."""

    def __init__(self, processor: Any):
        if isinstance(processor, BOSAwareAttentionProcessor):
            processor = processor.processor
        self.processor = processor
        self._helpers: dict[str, _FirstTokenPrecomputed] = {}  # by projection name, rebuilt if the layer changed

    def __call__(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any):
        encoder = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if encoder is None or encoder.dim() != 3 or encoder.shape[1] < 2:
            return self.processor(attn, hidden_states, *args, **kwargs)
        projections = attn._modules
        lent = {name: projections[name] for name in ("to_k", "to_v")}
        try:
            for name, layer in lent.items():
                helper = self._helpers.get(name)
                if helper is None or helper.layer is not layer:
                    helper = self._helpers[name] = _FirstTokenPrecomputed(layer)
                projections[name] = helper
            return self.processor(attn, hidden_states, *args, **kwargs)
        finally:
            projections.update(lent)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_helpers": {}}  # copies (deepcopy, pickling) rebuild them for their own layers

    def __repr__(self) -> str:
        return f"BOSAwareAttentionProcessor({type(self.processor).__name__})"


def _bos_wrapped(processor: Any) -> BOSAwareAttentionProcessor:
    """A wrapper whose ``__call__`` signature is the inner processor's (diffusers routes kwargs by it)."""
    try:
        signature = inspect.signature(type(processor).__call__)
    except (TypeError, ValueError):  # a processor without an inspectable signature: the generic one
        return BOSAwareAttentionProcessor(processor)

    def __call__(self, *args: Any, **kwargs: Any):
        return BOSAwareAttentionProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"BOSAware{type(processor).__name__}", (BOSAwareAttentionProcessor,), {"__call__": __call__})
    return cls(processor)


def bos_aware_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules whose ``to_k`` or ``to_v`` store a precomputed first token (``bos_kv``)."""
    return [
        name
        for name, module in _attention_modules(model)
        if any(BOS_EXTRA in getattr(getattr(module, proj, None), "extras", {}) for proj in ("to_k", "to_v"))
    ]


def use_bos_aware_attention(model: nn.Module) -> list[str]:
    """Wrap the processor of every attention module of :func:`bos_aware_modules` in a
    :class:`BOSAwareAttentionProcessor` (idempotent); returns their names.

    A bf16 / int8 wrapper (:func:`use_attention_dtype`) stays outermost, so switching the attention dtype later
    keeps this one. Modules that normalize the text across tokens before projecting it (``norm_cross``) are
    refused: their projection's input is not the encoder's token as it was measured.
    """
    names = bos_aware_modules(model)
    for name in names:
        module = model.get_submodule(name)
        if getattr(module, "norm_cross", None) is not None:
            raise ValueError(
                f"attention {name!r} normalizes the text before its key / value projections (cross_attention_norm): "
                "the first token's precomputed key / value would not match; remove bos_aware from the recipe"
            )
        current = module.processor
        holder = current if isinstance(current, AttentionModeProcessor) else None
        inner = holder.processor if holder is not None else current
        if isinstance(inner, BOSAwareAttentionProcessor):
            continue
        if holder is not None:
            holder.processor = _bos_wrapped(inner)  # same signature: the holder's stays right
        else:
            module.set_processor(_bos_wrapped(inner))
    return names
