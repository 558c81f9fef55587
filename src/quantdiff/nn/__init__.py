"""Quantized modules that replace nn.Linear / nn.Conv2d, and their execution modes (reference or integer)."""

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
    "ExecutionSummary",
    "KernelDecision",
    "KernelSupport",
    "LayerExecution",
    "QuantizedConv2d",
    "QuantizedLayer",
    "QuantizedLinear",
    "execution_summary",
    "kernel_support",
    "use_integer_kernels",
    "use_reference",
]
