"""Quantized modules that replace nn.Linear / nn.Conv2d, their integer kernels and execution modes."""

from quantdiff.nn.attention import ATTENTION_CHOICES, attention_dtype, native_bf16, use_attention_dtype
from quantdiff.nn.execution import (
    ExecutionSummary,
    LayerExecution,
    activation_layout,
    execution_summary,
    use_activation_layout,
    use_execution,
    use_integer_kernels,
    use_reference,
)
from quantdiff.nn.kernels import KernelDecision, KernelInputs, KernelSupport, kernel_support
from quantdiff.nn.quantized import (
    EXECUTION_MODES,
    InputQParams,
    QuantizedConv2d,
    QuantizedLayer,
    QuantizedLinear,
)
from quantdiff.nn.weights import QuantizedWeight, dequantize_weight, quantize_weight

__all__ = [
    "ATTENTION_CHOICES",
    "EXECUTION_MODES",
    "ExecutionSummary",
    "InputQParams",
    "KernelDecision",
    "KernelInputs",
    "KernelSupport",
    "LayerExecution",
    "QuantizedConv2d",
    "QuantizedLayer",
    "QuantizedLinear",
    "QuantizedWeight",
    "activation_layout",
    "attention_dtype",
    "dequantize_weight",
    "execution_summary",
    "kernel_support",
    "native_bf16",
    "quantize_weight",
    "use_activation_layout",
    "use_attention_dtype",
    "use_execution",
    "use_integer_kernels",
    "use_reference",
]
