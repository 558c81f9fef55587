"""Quantization algorithms: one paper's method per file, each a registered frozen config with a thin ``apply``.

:mod:`quantdiff.algorithms.base` defines the slot (stages, the registry, the context an algorithm gets);
docs/ARCHITECTURE.md says how to add one.
"""

from quantdiff.algorithms.base import (
    AlgorithmConfig,
    QuantizationContext,
    Stage,
    algorithm_from_dict,
    algorithm_types,
    register_algorithm,
)

__all__ = [
    "AlgorithmConfig",
    "QuantizationContext",
    "Stage",
    "algorithm_from_dict",
    "algorithm_types",
    "register_algorithm",
]
