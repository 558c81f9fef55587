"""The methods ``quantdiff bench`` measures (:data:`METHODS`), the builder of each model they run
(:data:`BUILDERS`), the order builds are made in, optional-package checks and the memory estimates that
decide when a group is timed.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from quantdiff.algorithms.rotation import Rotation
from quantdiff.algorithms.shortcut_split import ShortcutSplit
from quantdiff.algorithms.smoothquant import SmoothQuant
from quantdiff.algorithms.timestep_groups import TimestepGroups
from quantdiff.bench.builds import (
    BuildContext,
    Built,
    build_ao_dynamic,
    build_bf16,
    build_pt2e,
    build_quantdiff,
    build_quanto,
    build_sdnq,
    build_torchao,
    minmax_weights,
    one_line,
)
from quantdiff.bench.openvino import build_openvino
from quantdiff.bench.ort import build_ort
from quantdiff.recipe import PRESETS, LayerOverride, Recipe, TensorSpec

BASELINES = ("fp32", "bf16")  # the CPU suite's and the GPU suite's (see the quantdiff.bench docstring)


@dataclass(frozen=True)
class MethodSpec:
    """One row kind of the benchmark.

    Attributes:
        name: id (``qd-w8a8-compile``).
        label: human name.
        kind: ``fp32``, ``quantdiff`` or ``peer``.
        build: the model it runs (:data:`BUILDERS`); methods with the same build share one model (eager and
            compiled rows).
        compile_mode: ``None`` (eager), or the ``torch.compile`` mode of the build it runs: ``default``, or
            ``reduce-overhead`` (CUDA graphs).
        requires: importable modules it needs (optional packages): missing ones give a ``not installed`` row.
        baselines: the suites that measure it, by their baseline (:data:`BASELINES`).
    """

    name: str
    label: str
    kind: str
    build: str
    compile_mode: str | None = None
    requires: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ("fp32",)

    @property
    def compiled(self) -> bool:
        return self.compile_mode is not None


_BOTH, _GPU, _COMPILE, _GRAPHS = BASELINES, ("bf16",), "default", "reduce-overhead"
_QD, _QUANTO, _TORCHAO = "quantdiff", ("optimum.quanto",), ("torchao",)
_OV, _NNCF, _SDNQ = ("openvino",), ("openvino", "nncf"), ("sdnq",)
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        m.name: m
        for m in (
            MethodSpec("fp32", "fp32 eager", "fp32", "fp32"),
            MethodSpec("fp32-compile", "fp32 torch.compile", "fp32", "fp32", _COMPILE),
            MethodSpec("bf16", "bf16 eager", "peer", "bf16", baselines=_BOTH),
            MethodSpec("bf16-compile", "bf16 torch.compile", "peer", "bf16", _COMPILE, baselines=_BOTH),
            MethodSpec("bf16-graphs", "bf16 torch.compile + CUDA graphs", "peer", "bf16", _GRAPHS, baselines=_GPU),
            MethodSpec("qd-w8a8", "quantdiff W8A8 (int8 kernels)", _QD, "qd-w8a8", baselines=_BOTH),
            # compiled on oneDNN's kernels: faster there than the packed AMX kernel that eager W8A8 runs on
            MethodSpec("qd-w8a8-onednn", "quantdiff W8A8 (oneDNN kernels)", _QD, "qd-w8a8-onednn"),
            MethodSpec(
                "qd-w8a8-compile", "quantdiff W8A8 (oneDNN) + compile", _QD, "qd-w8a8-onednn", _COMPILE, baselines=_BOTH
            ),
            MethodSpec("qd-w8a8-int8attn", "quantdiff W8A8 + int8 attention", _QD, "qd-w8a8-int8attn"),
            MethodSpec("qd-w8a8-graphs", "quantdiff W8A8 + CUDA graphs", _QD, "qd-w8a8", _GRAPHS, baselines=_GPU),
            MethodSpec("qd-w8a8-tg4", "quantdiff W8A8, 4 timestep groups", _QD, "qd-w8a8-tg4"),
            MethodSpec("qd-w8a8-token", "quantdiff W8A8, dynamic per-token inputs", _QD, "qd-w8a8-token"),
            MethodSpec("qd-w8a8-sq", "quantdiff W8A8 + SmoothQuant", _QD, "qd-w8a8-sq"),
            MethodSpec("qd-w8a8-split", "quantdiff W8A8 + shortcut split", _QD, "qd-w8a8-split"),
            MethodSpec("qd-w8a8-group", "quantdiff W8A8, per-token inputs in groups of 64", _QD, "qd-w8a8-group"),
            MethodSpec("qd-w8a8-rot", "quantdiff W8A8 + Hadamard rotation", _QD, "qd-w8a8-rot"),
            MethodSpec("qd-w4a8", "quantdiff W4A8 (group 128, packed int4)", _QD, "qd-w4a8"),
            MethodSpec(
                "qd-w4a8-compile", "quantdiff W4A8 (group 128, packed int4) + compile", _QD, "qd-w4a8", _COMPILE
            ),
            MethodSpec("qd-w4a8-mse", "quantdiff W4A8 (preset)", _QD, "qd-w4a8-mse"),
            MethodSpec("qd-w4a8-ch", "quantdiff W4A8 per-channel (packed int4)", _QD, "qd-w4a8-ch"),
            MethodSpec("qd-w4a8-mixed", "quantdiff W4A8 mixed 2/4/8-bit (MixDQ search's roles)", _QD, "qd-w4a8-mixed"),
            MethodSpec("qd-w8a16", "quantdiff W8A16", _QD, "qd-w8a16"),
            MethodSpec("qd-w4a16", "quantdiff W4A16 (group 128, dequantized per call)", _QD, "qd-w4a16"),
            MethodSpec("qd-w4a16-mse", "quantdiff W4A16 (preset)", _QD, "qd-w4a16-mse"),
            MethodSpec("ao-dynamic", "torch.ao dynamic int8", "peer", "ao-dynamic"),
            MethodSpec("ao-dynamic-compile", "torch.ao dynamic int8 + compile", "peer", "ao-dynamic", _COMPILE),
            MethodSpec("pt2e-compile", "PT2E static int8 + compile", "peer", "pt2e", _COMPILE, _TORCHAO),
            MethodSpec("quanto-w8a8", "optimum-quanto W8A8", "peer", "quanto-w8a8", requires=_QUANTO),
            MethodSpec(
                "quanto-w8a8-compile", "optimum-quanto W8A8 + compile", "peer", "quanto-w8a8", _COMPILE, _QUANTO
            ),
            MethodSpec("quanto-w8", "optimum-quanto W8", "peer", "quanto-w8", requires=_QUANTO),
            MethodSpec("torchao-w8", "torchao int8 weight-only", "peer", "torchao-w8", requires=_TORCHAO),
            MethodSpec(
                "torchao-w8-compile", "torchao int8 weight-only + compile", "peer", "torchao-w8", _COMPILE, _TORCHAO
            ),
            MethodSpec("torchao-w8a8", "torchao dynamic W8A8", "peer", "torchao-w8a8", requires=_TORCHAO),
            MethodSpec(
                "torchao-w8a8-compile", "torchao dynamic W8A8 + compile", "peer", "torchao-w8a8", _COMPILE, _TORCHAO
            ),
            MethodSpec("ort-qdq", "ONNX Runtime int8 QDQ", "peer", "ort", requires=("onnxruntime", "onnx")),
            MethodSpec("openvino-fp32", "OpenVINO fp32", "peer", "openvino-fp32", requires=_OV),
            MethodSpec("openvino-bf16", "OpenVINO bf16", "peer", "openvino-bf16", requires=_OV),
            MethodSpec("openvino-int8", "OpenVINO int8 (NNCF)", "peer", "openvino-int8", requires=_NNCF),
            MethodSpec("sdnq-w8a8", "sdnq int8 + int8 matmul", "peer", "sdnq-w8a8", requires=_SDNQ),
            MethodSpec("sdnq-w4", "sdnq uint4 weights", "peer", "sdnq-w4", requires=_SDNQ),
        )
    }
)


def _w8a8_with(name: str, activations: TensorSpec | None = None, *algorithms) -> Callable[[Recipe], Recipe]:
    """The device's W8A8 preset with another activation mode or algorithms (the cost of each mode vs W8A8)."""

    def variant(base: Recipe) -> Recipe:
        return Recipe(name, base.weights, activations or base.activations, algorithms=algorithms)

    return variant


# The rows that each add one activation mode to qd-w8a8 (qd-w8a8-<mode>): the cost of that mode alone.
ACTIVATION_MODE_ROWS = ("tg4", "token", "sq", "split", "group", "rot")

# quantdiff builds -> recipe, all in integer mode (None: the W8A8 preset for the device, see build_quantdiff;
# a function: a variant of that preset)
_QD_RECIPES: Mapping[str, Recipe | Callable[[Recipe], Recipe] | None] = MappingProxyType(
    {
        "qd-w8a8": None,
        "qd-w8a8-tg4": _w8a8_with("w8a8-tg4", None, TimestepGroups(4)),
        "qd-w8a8-token": _w8a8_with("w8a8-token", TensorSpec(8, True, "token", dynamic=True)),
        "qd-w8a8-sq": _w8a8_with("w8a8-sq", None, SmoothQuant(alphas=(0.5,))),
        "qd-w8a8-split": _w8a8_with("w8a8-split", None, ShortcutSplit()),
        # groups of 64 channels: the like-for-like size on SD1.5's 320-1280 channels of digits-sd's groups of 16
        "qd-w8a8-group": _w8a8_with("w8a8-group", TensorSpec(8, False, "group", group_size=64, dynamic=True)),
        "qd-w8a8-rot": _w8a8_with("w8a8-rot", None, Rotation()),
        "qd-w4a8": minmax_weights(PRESETS["w4a8"], "w4a8-minmax-weights"),
        "qd-w4a8-mse": PRESETS["w4a8"],
        "qd-w4a8-ch": Recipe(
            name="w4a8-channel",
            weights=TensorSpec(bits=4, symmetric=True, granularity="channel", observer="minmax"),
            activations=PRESETS["w4a8"].activations,
        ),
        # The widths the MixDQ search chose for digits-sd at a 4-bit average (README, MixDQ table), by layer
        # role: text keys 2-bit, the attention blocks' input / output projections and the skip convolutions
        # 8-bit, the rest 4-bit per channel. Random weights have no sensitivity to search, and a speed and
        # memory row needs only the widths: the row says what a searched mix costs to run.
        "qd-w4a8-mixed": Recipe(
            name="w4a8-mixed-roles",
            weights=TensorSpec(bits=4, symmetric=True, granularity="channel", observer="minmax"),
            activations=PRESETS["w4a8"].activations,
            overrides=tuple(
                LayerOverride(pattern, weights={"bits": bits})
                for pattern, bits in (
                    ("*.attn2.to_k", 2),
                    ("*.proj_in", 8),
                    ("*.proj_out", 8),
                    ("*.conv_shortcut", 8),
                )
            ),
        ),
        "qd-w8a16": PRESETS["w8a16"],
        "qd-w4a16": minmax_weights(PRESETS["w4a16"], "w4a16-minmax-weights"),
        "qd-w4a16-mse": PRESETS["w4a16"],
    }
)

# build -> its builder; "fp32" has none: it is the reference itself
BUILDERS: Mapping[str, Callable[[BuildContext], Built]] = MappingProxyType(
    {
        "bf16": build_bf16,
        **{name: functools.partial(build_quantdiff, recipe=recipe) for name, recipe in _QD_RECIPES.items()},
        "qd-w8a8-onednn": functools.partial(build_quantdiff, recipe=None, backend="onednn"),
        "qd-w8a8-int8attn": functools.partial(build_quantdiff, recipe=None, attention="int8"),
        "ao-dynamic": build_ao_dynamic,
        "pt2e": build_pt2e,
        "quanto-w8a8": functools.partial(build_quanto, activations=True),
        "quanto-w8": functools.partial(build_quanto, activations=False),
        "torchao-w8": functools.partial(build_torchao, dynamic_activations=False),
        "torchao-w8a8": functools.partial(build_torchao, dynamic_activations=True),
        "ort": build_ort,
        **{f"openvino-{mode}": functools.partial(build_openvino, mode=mode) for mode in ("fp32", "bf16", "int8")},
        "sdnq-w8a8": functools.partial(build_sdnq, weights_dtype="int8", quantized_matmul=True),
        "sdnq-w4": functools.partial(build_sdnq, weights_dtype="uint4", quantized_matmul=False),
    }
)

# The order builds are made and grouped in (groups hold DEFAULT_GROUP_SIZE methods; the baseline's eager row is
# in every group): quantdiff W8A8 and its two closest contenders, PT2E and bf16, first, so that they are timed
# in the same group; then the fp32 compile and the other peers; then quantdiff's packed 4-bit and weight-only
# formats (their kernels: quantdiff.nn.kernels.packed), the W8A8 variants, and the preset twins whose MSE range
# search makes their build slow.
BUILD_ORDER = (
    "qd-w8a8",
    "qd-w8a8-onednn",
    "qd-w8a8-int8attn",
    "pt2e",
    "bf16",
    "fp32",
    "ort",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
    "sdnq-w8a8",
    "sdnq-w4",
    "ao-dynamic",
    "quanto-w8a8",
    "quanto-w8",
    "torchao-w8",
    "torchao-w8a8",
    "qd-w4a8",
    "qd-w4a16",
    "qd-w4a8-ch",
    "qd-w4a8-mixed",
    "qd-w8a16",
    "qd-w8a8-tg4",
    "qd-w8a8-token",
    "qd-w8a8-sq",
    "qd-w8a8-split",
    "qd-w8a8-group",
    "qd-w8a8-rot",
    "qd-w4a8-mse",
    "qd-w4a16-mse",
)

_PIP_NAMES = MappingProxyType({"optimum.quanto": "optimum-quanto", "onnxruntime": "onnxruntime", "torchao": "torchao"})


def import_optional(module: str) -> tuple[bool, str]:
    """(importable, reason): a missing package reads ``<pip name> is not installed``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and (module == error.name or module.startswith(error.name + ".")):
            return False, f"{_PIP_NAMES.get(module, module)} is not installed"
        return False, f"import of {module} failed: {one_line(error)}"
    except Exception as error:  # a broken install is a reason, not a crash
        return False, f"import of {module} failed: {one_line(error)}"
    return True, ""


# Memory estimates in units of the fp32 weight bytes, only to decide when a group must be timed and freed
# before the next build: (held after the build, extra transient while building, extra held by compiling).
# A pair (A, B) is A + B x lin, where lin is the Linear share of the weights (what the Linear-only peers convert).
_MEMORY = MappingProxyType(
    {
        # freezing: a packed copy; the compile's peak was 1.65x the weights for SD1.5 (31% Linear), 1.06x for
        # SD3 (all Linear), measured
        "fp32": (0.0, 0.0, (1.95, -0.85)),
        "bf16": (0.5, 0.1, (1.0, -0.45)),  # half of fp32's: bf16 weights, their frozen copy, the compile's peak
        "qd-w8a8": (0.5, 0.3, 0.1),
        "qd-w8a8-onednn": (0.5, 0.3, 0.1),
        "qd-w8a8-int8attn": (0.5, 0.3, 0.1),
        **{f"qd-w8a8-{mode}": (0.5, 0.3, 0.1) for mode in ACTIVATION_MODE_ROWS},
        "qd-w4a8": (0.15, 0.4, 0.1),
        "qd-w4a8-mse": (0.15, 0.4, 0.1),
        "qd-w4a8-ch": (0.15, 0.4, 0.1),  # packed int4 (0.4 while oneDNN held it widened to int8)
        "qd-w4a8-mixed": (0.2, 0.4, 0.1),
        "qd-w8a16": (0.27, 0.3, 0.1),
        "qd-w4a16": (0.15, 0.4, 0.1),
        "qd-w4a16-mse": (0.15, 0.4, 0.1),
        "ao-dynamic": ((0.0, 0.27), 0.3, (1.1, -1.0)),
        "pt2e": (0.3, 0.3, 0.3),  # export shares the fp32 tensors; int8 constants, then their packed copies
        "quanto-w8a8": (0.4, 1.0, (1.1, -1.0)),
        "quanto-w8": (0.4, 1.0, (1.1, -1.0)),
        # compiling torchao's int8 tensors with freezing added 1.43x the weights for SD1.5 (measured, AMX
        # machine); (1.1, -1.0) had SD3 (all Linear) at 0.1x, and its compile was killed for memory
        "torchao-w8": ((0.0, 0.27), 0.5, 1.5),
        "torchao-w8a8": ((0.0, 0.27), 0.5, 1.5),
        "ort": (0.6, 0.5, 0.0),
        # OpenVINO: the converted model shares the fp32 tensors; the plugin's copy (f32 / bf16 / int8), the
        # tracing and NNCF's statistics models while building
        "openvino-fp32": (1.0, 1.0, 0.0),
        "openvino-bf16": (0.5, 1.0, 0.0),
        "openvino-int8": (0.3, 2.0, 0.0),
        "sdnq-w8a8": (0.3, 0.3, 0.0),
        "sdnq-w4": (0.2, 0.3, 0.0),
    }
)
# ONNX export + quantize_static peak, x fp32 weight bytes: a lower bound. SD1.5 at 32x32 measured 14.1 GB (4.1x);
# at 64x64 the child passed 16 GiB and was killed on a 23.5 GiB machine.
ORT_CHILD_FACTOR = 5.0


def memory_estimate(build: str, linear_share: float, compiled: bool) -> float:
    """What making ``build`` will add to the process at most, in units of the fp32 weight bytes: what it holds,
    its transient while building and, when one of its rows is compiled, what compiling holds besides.
    ``linear_share``: the share of the weights in ``nn.Linear``."""

    def value(entry: float | tuple[float, float]) -> float:
        base, per_linear = entry if isinstance(entry, tuple) else (entry, 0.0)
        return max(0.0, base + per_linear * linear_share)

    held, transient, compile_extra = (value(entry) for entry in _MEMORY[build])
    return held + transient + (compile_extra if compiled else 0.0)
