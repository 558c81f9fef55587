"""The methods ``quantdiff bench`` measures (:data:`METHODS`), the quantdiff builder, the table of builders,
optional-package checks and the memory estimates that decide when a group is timed.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from quantdiff.bench.builds import _Built, _call, _Context, _one_line, _share_weights_copy
from quantdiff.bench.ort import _build_ort
from quantdiff.bench.peers import _build_ao_dynamic, _build_bf16, _build_pt2e, _build_quanto, _build_torchao
from quantdiff.nn.kernels import KernelSupport, kernel_support
from quantdiff.recipe import PRESETS, Recipe, TensorSpec


@dataclass(frozen=True)
class MethodSpec:
    """One row kind of the benchmark.

    Attributes:
        name: id (``qd-w8a8-compile``).
        label: human name.
        kind: ``fp32``, ``quantdiff`` or ``peer``.
        build: the model it runs; methods with the same build share one model (eager and compiled rows).
        compiled: the row runs ``torch.compile`` of the build.
        requires: importable modules it needs (optional packages): missing ones give a ``not installed`` row.
        description: what it is, for the report.
    """

    name: str
    label: str
    kind: str
    build: str
    compiled: bool
    requires: tuple[str, ...]
    description: str


def _minmax_weights(recipe: Recipe, name: str) -> Recipe:
    """``recipe`` with min-max weight ranges. The 4-bit presets search each group's range (Lp / MSE, 80
    candidates), measured at 4 s per million weights on one loaded core here: tens of minutes for an SD1.5
    UNet, which would dominate the benchmark; min-max gives the same stored format, path, speed and memory."""
    weights = dataclasses.replace(recipe.weights, observer="minmax", observer_options={})
    return Recipe(name=name, weights=weights, activations=recipe.activations)


def integer_w8a8_recipe(support: KernelSupport | None = None) -> Recipe:
    """The W8A8 preset this CPU's int8 kernels compute exactly: ``w8a8`` where they cannot saturate (VNNI,
    AMX), ``w8a8-int`` (pair-safe weights, about 1 dB of layer SQNR less) where they can (AVX2)."""
    support = kernel_support() if support is None else support
    return PRESETS["w8a8-int"] if support.saturates else PRESETS["w8a8"]


# quantdiff builds -> recipe (all in integer mode; layers the kernel cannot take keep the reference path);
# None: chosen for this CPU when built (integer_w8a8_recipe)
_QD_RECIPES: Mapping[str, Recipe | None] = MappingProxyType(
    {
        "qd-w8a8": None,
        "qd-w4a8": _minmax_weights(PRESETS["w4a8"], "w4a8-minmax-weights"),
        "qd-w4a8-mse": PRESETS["w4a8"],
        "qd-w4a8-ch": Recipe(
            name="w4a8-channel",
            weights=TensorSpec(bits=4, symmetric=True, granularity="channel", observer="minmax"),
            activations=PRESETS["w4a8"].activations,
        ),
        "qd-w8a16": PRESETS["w8a16"],
        "qd-w4a16": _minmax_weights(PRESETS["w4a16"], "w4a16-minmax-weights"),
        "qd-w4a16-mse": PRESETS["w4a16"],
    }
)
_PIP_NAMES = MappingProxyType({"optimum.quanto": "optimum-quanto", "onnxruntime": "onnxruntime", "torchao": "torchao"})


def _method(name, label, kind, build, compiled, requires, description) -> MethodSpec:
    return MethodSpec(name, label, kind, build, compiled, tuple(requires), description)


METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        m.name: m
        for m in (
            _method("fp32", "fp32 eager", "fp32", "fp32", False, (), "the fp32 model, eager"),
            _method("fp32-compile", "fp32 torch.compile", "fp32", "fp32", True, (), "inductor, freezing"),
            _method("bf16", "bf16 eager", "peer", "bf16", False, (), "the model in bf16 (CPUs with native bf16 only)"),
            _method(
                "bf16-compile",
                "bf16 torch.compile",
                "peer",
                "bf16",
                True,
                (),
                "the model in bf16 (CPUs with native bf16 only), inductor with freezing",
            ),
            _method(
                "qd-w8a8",
                "quantdiff W8A8 (int8 kernels)",
                "quantdiff",
                "qd-w8a8",
                False,
                (),
                "preset w8a8 (w8a8-int where the CPU's int8 kernels saturate), integer mode",
            ),
            _method(
                "qd-w8a8-compile",
                "quantdiff W8A8 + compile",
                "quantdiff",
                "qd-w8a8",
                True,
                (),
                "preset w8a8 (w8a8-int where the CPU's int8 kernels saturate), integer mode, inductor with freezing",
            ),
            _method(
                "qd-w4a8",
                "quantdiff W4A8 (group 128)",
                "quantdiff",
                "qd-w4a8",
                False,
                (),
                "preset w4a8's format (int4 groups of 128, int8 activations) with min-max weight ranges",
            ),
            _method(
                "qd-w4a8-mse",
                "quantdiff W4A8 (preset)",
                "quantdiff",
                "qd-w4a8-mse",
                False,
                (),
                "preset w4a8 exactly (MSE weight ranges: slow to quantize)",
            ),
            _method(
                "qd-w4a8-ch",
                "quantdiff W4A8 per-channel",
                "quantdiff",
                "qd-w4a8-ch",
                False,
                (),
                "int4 per-channel weights (min-max), int8 activations: the int8 kernel after widening",
            ),
            _method("qd-w8a16", "quantdiff W8A16", "quantdiff", "qd-w8a16", False, (), "preset w8a16 (weight-only)"),
            _method(
                "qd-w4a16",
                "quantdiff W4A16 (group 128)",
                "quantdiff",
                "qd-w4a16",
                False,
                (),
                "preset w4a16's format (int4 groups of 128) with min-max weight ranges",
            ),
            _method(
                "qd-w4a16-mse",
                "quantdiff W4A16 (preset)",
                "quantdiff",
                "qd-w4a16-mse",
                False,
                (),
                "preset w4a16 exactly (MSE weight ranges: slow to quantize)",
            ),
            _method(
                "ao-dynamic", "torch.ao dynamic int8", "peer", "ao-dynamic", False, (), "quantize_dynamic on nn.Linear"
            ),
            _method(
                "ao-dynamic-compile",
                "torch.ao dynamic int8 + compile",
                "peer",
                "ao-dynamic",
                True,
                (),
                "quantize_dynamic on nn.Linear, inductor with freezing",
            ),
            _method(
                "pt2e-compile",
                "PT2E static int8 + compile",
                "peer",
                "pt2e",
                True,
                ("torchao",),
                "torch.export, X86InductorQuantizer default config, same calibration, inductor with freezing",
            ),
            _method(
                "quanto-w8a8",
                "optimum-quanto W8A8",
                "peer",
                "quanto-w8a8",
                False,
                ("optimum.quanto",),
                "qint8 weights and activations, calibrated",
            ),
            _method(
                "quanto-w8a8-compile",
                "optimum-quanto W8A8 + compile",
                "peer",
                "quanto-w8a8",
                True,
                ("optimum.quanto",),
                "qint8 weights and activations, inductor with freezing",
            ),
            _method("quanto-w8", "optimum-quanto W8", "peer", "quanto-w8", False, ("optimum.quanto",), "qint8 weights"),
            _method(
                "torchao-w8",
                "torchao int8 weight-only",
                "peer",
                "torchao-w8",
                False,
                ("torchao",),
                "Int8WeightOnlyConfig",
            ),
            _method(
                "torchao-w8-compile",
                "torchao int8 weight-only + compile",
                "peer",
                "torchao-w8",
                True,
                ("torchao",),
                "Int8WeightOnlyConfig, inductor with freezing",
            ),
            _method(
                "torchao-w8a8",
                "torchao dynamic W8A8",
                "peer",
                "torchao-w8a8",
                False,
                ("torchao",),
                "Int8DynamicActivationInt8WeightConfig",
            ),
            _method(
                "torchao-w8a8-compile",
                "torchao dynamic W8A8 + compile",
                "peer",
                "torchao-w8a8",
                True,
                ("torchao",),
                "Int8DynamicActivationInt8WeightConfig, inductor with freezing",
            ),
            _method(
                "ort-qdq",
                "ONNX Runtime int8 QDQ",
                "peer",
                "ort",
                False,
                ("onnxruntime", "onnx"),
                "ONNX export, quantize_static QDQ (u8 activations, s8 per-channel weights), same calibration",
            ),
        )
    }
)


def _import_optional(module: str) -> tuple[bool, str]:
    """(importable, reason): a missing package reads ``<pip name> is not installed``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and (module == error.name or module.startswith(error.name + ".")):
            return False, f"{_PIP_NAMES.get(module, module)} is not installed"
        return False, f"import of {module} failed: {_one_line(error)}"
    except Exception as error:  # a broken install is a reason, not a crash
        return False, f"import of {module} failed: {_one_line(error)}"
    return True, ""


def _build_quantdiff(ctx: _Context, recipe: Recipe) -> _Built:
    from quantdiff.nn import use_integer_kernels
    from quantdiff.quantize import quantize_denoiser

    model = _share_weights_copy(ctx.reference)
    recipe = integer_w8a8_recipe() if recipe is None else recipe
    calibration = ctx.calibration if recipe.activations is not None else None
    info = quantize_denoiser(model, recipe, calibration, progress=False)
    summary = use_integer_kernels(model)  # layers the kernel cannot take keep the reference path (reason given)
    reasons = Counter(re.sub(r" \(worst pair sum \d+\)", "", layer.reason) for layer in summary.layers)
    integer, reference = len(summary.integer), len(summary.reference)
    path = "integer" if integer and not reference else ("reference" if not integer else "mixed")
    kept = len(info.plan) - len(info.plan.quantized)
    detail = f"preset {recipe.name}; " + "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
    detail += f"; {kept} layers kept fp32 by the plan" if kept else ""
    detail += f"; attention in {summary.attention}" if summary.attention else ""
    built = _Built(call=lambda: _call(model, ctx.inputs), module=model, path=path, path_detail=detail)
    built.counts = {
        "integer_layers": integer,
        "reference_layers": reference,
        "widened_layers": sum(layer.widened for layer in summary.layers),
        "quantized_layers": len(summary.layers),
    }
    totals = summary.to_dict()
    built.stored_bytes, built.kernel_bytes = totals["stored_bytes"], totals["kernel_bytes"]
    if summary.support is not None:
        built.notes.append(summary.support.describe())
    return built


_BUILDERS: Mapping[str, Callable[[_Context], _Built]] = MappingProxyType(
    {
        "bf16": _build_bf16,
        **{name: (lambda ctx, r=recipe: _build_quantdiff(ctx, r)) for name, recipe in _QD_RECIPES.items()},
        "ao-dynamic": _build_ao_dynamic,
        "pt2e": _build_pt2e,
        "quanto-w8a8": lambda ctx: _build_quanto(ctx, True),
        "quanto-w8": lambda ctx: _build_quanto(ctx, False),
        "torchao-w8": lambda ctx: _build_torchao(ctx, False),
        "torchao-w8a8": lambda ctx: _build_torchao(ctx, True),
        "ort": _build_ort,
    }
)

# The order builds are made and grouped in (groups hold DEFAULT_GROUP_SIZE methods; fp32 eager is in every
# group): quantdiff W8A8 and its two closest contenders, PT2E and bf16, first, so that they are timed in the
# same group; then the fp32 compile and the other peers; quantdiff's reference-path formats last, so that
# their slow rounds do not sit between the others.
BUILD_ORDER = (
    "qd-w8a8",
    "pt2e",
    "bf16",
    "fp32",
    "ort",
    "ao-dynamic",
    "quanto-w8a8",
    "quanto-w8",
    "torchao-w8",
    "torchao-w8a8",
    "qd-w4a8-ch",
    "qd-w8a16",
    "qd-w4a8",
    "qd-w4a16",
    "qd-w4a8-mse",
    "qd-w4a16-mse",
)

# Memory estimates in units of the fp32 weight bytes, only to decide when a group must be timed and freed
# before the next build: (held after the build, extra transient while building, extra held by compiling).
# "lin" is the Linear share of the weights (what the Linear-only peers convert): "lin*B" = B x lin,
# "A-lin" = A - lin, "A-B*lin" = A - B x lin.
_MEMORY = MappingProxyType(
    {
        # freezing: a packed copy; the compile's peak was 1.65x the weights for SD1.5 (31% Linear), 1.06x for
        # SD3 (all Linear), measured
        "fp32": (0.0, 0.0, "1.95-0.85*lin"),
        "bf16": (0.5, 0.1, "1.0-0.45*lin"),  # half of fp32's: bf16 weights, their frozen copy, the compile's peak
        "qd-w8a8": (0.5, 0.3, 0.1),
        "qd-w4a8": (0.15, 0.4, 0.1),
        "qd-w4a8-mse": (0.15, 0.4, 0.1),
        "qd-w4a8-ch": (0.4, 0.4, 0.1),
        "qd-w8a16": (0.27, 0.3, 0.1),
        "qd-w4a16": (0.15, 0.4, 0.1),
        "qd-w4a16-mse": (0.15, 0.4, 0.1),
        "ao-dynamic": ("lin*0.27", 0.3, "1.1-lin"),
        "pt2e": (0.3, 0.3, 0.3),  # export shares the fp32 tensors; int8 constants, then their packed copies
        "quanto-w8a8": (0.4, 1.0, "1.1-lin"),
        "quanto-w8": (0.4, 1.0, "1.1-lin"),
        # compiling torchao's int8 tensors with freezing added 1.43x the weights for SD1.5 (measured, AMX
        # machine); "1.1-lin" had SD3 (all Linear) at 0.1x, and its compile was killed for memory
        "torchao-w8": ("lin*0.27", 0.5, 1.5),
        "torchao-w8a8": ("lin*0.27", 0.5, 1.5),
        "ort": (0.6, 0.5, 0.0),
    }
)
# ONNX export + quantize_static peak, x fp32 weight bytes: a lower bound. SD1.5 at 32x32 measured 14.1 GB (4.1x);
# at 64x64 the child passed 16 GiB and was killed on a 23.5 GiB machine.
_ORT_CHILD_FACTOR = 5.0


def _estimate(value: float | str, linear_share: float) -> float:
    if isinstance(value, str):
        if value.startswith("lin*"):
            return linear_share * float(value[4:])
        base, _, per_linear = value.partition("-")  # "A-lin" or "A-B*lin"
        factor = float(per_linear.partition("*")[0]) if "*" in per_linear else 1.0
        return max(0.0, float(base) - factor * linear_share)
    return float(value)
