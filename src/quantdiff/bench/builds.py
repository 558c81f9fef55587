"""How each in-process method's model is made from the fp32 reference: quantdiff's formats, bf16 and the int8
peers (torch.ao dynamic, PT2E, optimum-quanto, torchao, sdnq), with what a builder gets (:class:`BuildContext`),
what it hands back (:class:`Built`) and the helpers they share. ONNX Runtime's builder is in
:mod:`quantdiff.bench.ort`, OpenVINO's in :mod:`quantdiff.bench.openvino`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantdiff.bench.denoisers import DenoiserSpec, cast_inputs
from quantdiff.calibration.dataset import CalibrationSet, denoiser_output
from quantdiff.nn import KernelSupport, kernel_support, native_bf16, use_integer_kernels
from quantdiff.nn.attention import describe_attention
from quantdiff.nn.int8_attention import int8_attention_support
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe


class MethodUnavailable(Exception):
    """Raised by a builder when its method cannot run on this machine (the row reads ``skipped``)."""


def one_line(error: BaseException) -> str:
    """An exception as one line of at most 300 characters: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300].rstrip(": ")


def call_denoiser(module: Callable, inputs: Mapping[str, Any]) -> Tensor:
    """The prediction of one denoiser call with keyword ``inputs``."""
    return denoiser_output(module(**inputs))


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer with ``model`` (no weight memory).

    Methods that convert a model in place start from this, so the fp32 reference stays intact and no
    second fp32 copy is ever made (an SDXL UNet is 10 GB).
    """
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def bf16_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every floating-point tensor in bf16, made tensor by tensor.

    ``model.to(torch.bfloat16)`` on a weight-sharing copy would convert the shared fp32 Parameters in place;
    this maps each tensor to a new bf16 one instead (0.5x the fp32 bytes, no second fp32 copy).
    """
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        converted = tensor.detach().to(torch.bfloat16) if tensor.is_floating_point() else tensor
        memo[id(tensor)] = (
            nn.Parameter(converted, requires_grad=False) if isinstance(tensor, nn.Parameter) else converted
        )
    return copy.deepcopy(model, memo)


@dataclass
class BuildContext:
    """What a builder gets from the case it runs in.

    Attributes:
        spec: the denoiser.
        reference: the fp32 model (on the case's device); builders must leave its tensors as they are.
        inputs: the evaluation call's kwargs, as the methods are called: fp32, or bf16 with the bf16 baseline.
        calibration: the calibration set quantdiff and PT2E share.
        threads: torch's thread count (ONNX Runtime gets the same).
        baseline: ``fp32`` (the CPU suite) or ``bf16`` (the GPU suite: see :mod:`quantdiff.bench`).
        ort_model: the quantized ONNX file the ONNX Runtime child wrote, if that method runs.
    """

    spec: DenoiserSpec
    reference: nn.Module
    inputs: Mapping[str, Any]
    calibration: CalibrationSet
    threads: int
    baseline: str = "fp32"
    ort_model: Path | None = None


@dataclass
class Built:
    """A method's model, ready to call on the evaluation input (mutable: the runner fills in measurements)."""

    call: Callable[[], Tensor] | None  # eager call; None: only the compiled row exists (PT2E)
    module: nn.Module | None = None  # what torch.compile wraps
    path: str = ""
    path_detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # quantdiff: layers per path (row fields)
    stored_bytes: int | None = None
    kernel_bytes: int | None = None
    weight_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    inductor_changes: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    start_rss: int = 0  # settled RSS before the build
    setup_peak: int = 0  # highest RSS while building and in its first calls
    held: int = 0  # RSS the build (and its eager first calls) added


def _eager(model: nn.Module, ctx: BuildContext, path: str, detail: str) -> Built:
    return Built(call=lambda: call_denoiser(model, ctx.inputs), module=model, path=path, path_detail=detail)


class _BF16Denoiser(nn.Module):
    """A bf16 denoiser called with the fp32 inputs of every other method: casts them, returns fp32."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, **inputs: Any) -> Tensor:
        return denoiser_output(self.denoiser(**cast_inputs(inputs, dtype=torch.bfloat16))).float()


def build_bf16(ctx: BuildContext) -> Built:
    """The whole model in bf16. With the bf16 baseline it is the baseline itself, called with bf16 inputs; on
    the CPU suite a peer, which takes the fp32 inputs and returns fp32, on CPUs that compute bf16 natively."""
    if ctx.baseline == "bf16":
        return _eager(bf16_copy(ctx.reference), ctx, "bf16", "every floating-point tensor in bf16")
    native, flags = native_bf16()
    if not native:
        raise MethodUnavailable(
            f"this CPU has no native bf16 ({flags}): bf16 convolutions and matmuls run emulated, "
            "tens of times slower than fp32"
        )
    model = _BF16Denoiser(bf16_copy(ctx.reference))
    detail = f"every floating-point tensor in bf16 (CPU {flags}); inputs cast to bf16, output back to fp32"
    return _eager(model, ctx, "bf16", detail)


def integer_w8a8_recipe(support: KernelSupport | None = None) -> Recipe:
    """The W8A8 preset this CPU's int8 kernels compute exactly: ``w8a8`` where they cannot saturate (VNNI,
    AMX), ``w8a8-int`` (pair-safe weights, about 1 dB of layer SQNR less) where they can (AVX2)."""
    support = kernel_support() if support is None else support
    return PRESETS["w8a8-int"] if support.saturates else PRESETS["w8a8"]


def minmax_weights(recipe: Recipe, name: str) -> Recipe:
    """``recipe`` with min-max weight ranges. The 4-bit presets search each group's range (Lp / MSE, 80
    candidates), measured at 4 s per million weights on one loaded core here: tens of minutes for an SD1.5
    UNet, which would dominate the benchmark; min-max gives the same stored format, path, speed and memory."""
    weights = dataclasses.replace(recipe.weights, observer="minmax", observer_options={})
    return Recipe(name=name, weights=weights, activations=recipe.activations)


def build_quantdiff(
    ctx: BuildContext,
    recipe: Recipe | Callable[[Recipe], Recipe] | None,
    backend: str = "auto",
    attention: str = "auto",
) -> Built:
    """quantdiff's ``recipe`` in integer mode (``None``: the W8A8 preset for this device); layers the kernel
    cannot take keep the reference path, and the row's path detail counts them by reason.

    CPU suite: a weight-sharing copy, the integer kernels of ``backend`` (``"auto"``: each layer's, see
    :func:`quantdiff.nn.kernels.select_kernel`), attention in bf16 where the CPU has it natively (``attention``:
    another dtype of :func:`quantdiff.nn.use_integer_kernels`, e.g. ``"int8"``).
    bf16 baseline: preset ``w8a8`` (``torch._int_mm`` cannot saturate) calibrated in fp32 on a full copy,
    then cast to bf16 around the int8 layers, on the int8 GEMM backend (the CUDA one; on the CPU a check of
    its math); attention stays as the bf16 model computes it.
    """
    on_bf16 = ctx.baseline == "bf16"
    if recipe is None or callable(recipe):
        base = PRESETS["w8a8"] if on_bf16 else integer_w8a8_recipe()
        recipe = base if recipe is None else recipe(base)
    # .to(bfloat16) below converts in place, so the bf16 suite cannot share the reference's tensors
    model = copy.deepcopy(ctx.reference) if on_bf16 else share_weights_copy(ctx.reference)
    calibration = ctx.calibration if recipe.needs_calibration else None
    info = quantize_denoiser(model, recipe, calibration, progress=False)
    if on_bf16:
        summary = use_integer_kernels(model.to(torch.bfloat16), backend="int_mm", attention="float32")
    else:
        summary = use_integer_kernels(model, backend=backend, attention=attention)
    reasons = Counter(re.sub(r" \(worst pair sum \d+\)", "", layer.reason) for layer in summary.layers)
    integer, reference = len(summary.integer), len(summary.reference)
    path = "integer" if integer and not reference else ("reference" if not integer else "mixed")
    kept = len(info.plan) - len(info.plan.quantized)
    detail = f"preset {recipe.name}; " + "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
    detail += f"; {kept} layers kept {'bf16' if on_bf16 else 'fp32'} by the plan" if kept else ""
    if on_bf16:
        detail += "; bf16 around the int8 layers"
    elif summary.attention:
        detail += f"; attention in {describe_attention(summary.attention)}"
        if summary.attention == "int8":
            detail += f": {int8_attention_support().describe()}"
    built = _eager(model, ctx, path, detail)
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


def build_ao_dynamic(ctx: BuildContext) -> Built:
    """``torch.ao`` ``quantize_dynamic`` on ``nn.Linear`` (Conv2d stays fp32)."""
    from torch.ao.quantization import quantize_dynamic

    model = share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization is deprecated in 2.13; still what users find
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    linears = sum(type(m).__name__ == "Linear" and "dynamic" in type(m).__module__ for m in model.modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    detail = f"{linears} Linear as fbgemm/oneDNN dynamic int8 (per-call activation range); {convs} Conv2d fp32"
    return _eager(model, ctx, "torch.ao dynamic", detail)


def build_pt2e(ctx: BuildContext) -> Built:
    """PT2E static int8: ``torch.export``, ``X86InductorQuantizer`` default config calibrated on the same
    inputs as quantdiff; only its compiled row exists (inductor lowers the q/dq pairs to int8 kernels)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(ctx.reference, args=(), kwargs=dict(ctx.inputs), strict=False).module()
        prepared = prepare_pt2e(exported, quantizer)
        for record in ctx.calibration:  # the same inputs quantdiff calibrates on
            prepared(**record.inputs)
        converted = convert_pt2e(prepared)
    detail = (
        f"X86InductorQuantizer default (static per-tensor u8 activations, per-channel s8 weights), "
        f"calibrated on the same {len(ctx.calibration)} inputs; inductor lowers q/dq to oneDNN int8 conv/linear"
    )
    return Built(call=None, module=converted, path="PT2E + inductor", path_detail=detail)


def build_quanto(ctx: BuildContext, activations: bool) -> Built:
    """optimum-quanto qint8 weights, and qint8 activations calibrated on the same inputs when ``activations``."""
    from optimum.quanto import Calibration, freeze, qint8, quantize

    model = share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, weights=qint8, activations=qint8 if activations else None)
        if activations:
            with Calibration():
                for record in ctx.calibration:
                    model(**record.inputs)
        freeze(model)
    detail = "qint8 weights" + (" and activations (calibrated on the same inputs)" if activations else "")
    return _eager(model, ctx, "quanto", detail)


def build_torchao(ctx: BuildContext, dynamic_activations: bool) -> Built:
    """torchao ``Int8WeightOnlyConfig``, or ``Int8DynamicActivationInt8WeightConfig``, on ``nn.Linear``."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    model = share_weights_copy(ctx.reference)
    config = Int8DynamicActivationInt8WeightConfig() if dynamic_activations else Int8WeightOnlyConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config)  # nn.Linear only (torchao's default filter); Conv2d stays fp32
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return _eager(model, ctx, "torchao", f"{type(config).__name__} on nn.Linear; {convs} Conv2d fp32")


def build_sdnq(ctx: BuildContext, weights_dtype: str, quantized_matmul: bool) -> Built:
    """sdnq (SD.Next's quantizer) ``sdnq_post_load_quant`` on nn.Linear and nn.Conv2d, with its defaults otherwise
    (automatic group size, layers under 16384 weights and its model skip keys left fp32). ``quantized_matmul``:
    int8 matmul with inputs quantized per row at each call (sdnq runs it with OpenVINO's matmul on the CPU
    where openvino is installed, else ``torch._int_mm``); without it, weights dequantized per call."""
    import sdnq
    from sdnq import kernel_wrappers
    from sdnq.common import check_torch_compile

    if kernel_wrappers.openvino_int_mm is not None:  # its OpenVINO matmuls get torch's threads, as ORT does
        from sdnq.kernels.openvino_mm import get_ov_core

        get_ov_core()[0].set_property("CPU", {"INFERENCE_NUM_THREADS": ctx.threads})
    model = share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sdnq.sdnq_post_load_quant(
            model,
            weights_dtype=weights_dtype,
            quant_conv=True,
            use_quantized_matmul=quantized_matmul,
            use_quantized_matmul_conv=quantized_matmul,
        )
    layers = [m for m in model.modules() if hasattr(m, "sdnq_dequantizer")]
    if not layers:
        raise RuntimeError("sdnq quantized no layer")
    kinds = Counter(type(m).__name__.removeprefix("SDNQ") for m in layers)
    matmul = sum(m.sdnq_dequantizer.use_quantized_matmul for m in layers)
    skipped = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()) - len(layers)
    detail = f"{weights_dtype} weights in {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; "
    if quantized_matmul:
        kernel = "OpenVINO matmul" if kernel_wrappers.openvino_int_mm is not None else "torch._int_mm"
        detail += f"{matmul} with int8 matmul ({kernel}, inputs quantized per row at each call), the rest dequantized"
    else:
        detail += "weights dequantized per call"
    detail += f"; {skipped} Linear/Conv2d fp32 (sdnq's size floor and skip keys)"
    detail += "; its kernels torch.compile'd" if check_torch_compile() else "; eager kernels"
    built = _eager(model, ctx, "sdnq", detail)
    built.notes.append(
        f"sdnq {sdnq.__version__}; its first call compiles its kernels (in the one-time cost); importing sdnq "
        "raises dynamo's recompile limits for the whole process"
    )
    return built
