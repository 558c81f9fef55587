"""Quantized modules that replace nn.Linear / nn.Conv2d, and their execution modes (reference or integer)."""

from quantdiff.nn.attention import ATTENTION_CHOICES, attention_dtype, native_bf16, use_attention_dtype
from quantdiff.nn.kernels import KernelDecision, KernelSupport, kernel_support
from quantdiff.nn.quantized import (
    ExecutionSummary,
    LayerExecution,
    QuantizedConv2d,
    QuantizedLayer,
    QuantizedLinear,
    execution_summary,
    use_integer_kernels,
    use_reference,
)

__all__ = [
    "ATTENTION_CHOICES",
    "ExecutionSummary",
    "KernelDecision",
    "KernelSupport",
    "LayerExecution",
    "QuantizedConv2d",
    "QuantizedLayer",
    "QuantizedLinear",
    "attention_dtype",
    "execution_summary",
    "kernel_support",
    "native_bf16",
    "use_attention_dtype",
    "use_integer_kernels",
    "use_reference",
]
