"""The OpenVINO peers (``openvino-fp32``, ``openvino-bf16``, ``openvino-int8``): the fp32 denoiser converted with
``openvino.convert_model`` (traced on the evaluation call, then given its static shapes), for ``int8`` quantized by
NNCF's post-training ``nncf.quantize`` on the calibration inputs quantdiff's rows use, and compiled for the CPU
plugin (:func:`build_openvino`).
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from typing import Any

import torch
from torch import Tensor

from quantdiff.bench.builds import BuildContext, Built, MethodUnavailable
from quantdiff.bench.ort import _flatten_tensors, _PositionalDenoiser

# The CPU plugin's INFERENCE_PRECISION_HINT per row; None: the plugin's default (bf16 on CPUs with native bf16,
# f32 elsewhere), what a user of the int8 model gets for the layers NNCF leaves in floating point.
_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": None}


def build_openvino(ctx: BuildContext, mode: str) -> Built:
    """The denoiser in OpenVINO on the CPU plugin: ``mode`` ``fp32`` (precision hint f32: the plugin's default is
    bf16 where the CPU has it), ``bf16`` (hint bf16, only where the plugin reports native BF16) or ``int8``
    (NNCF ``nncf.quantize``, ``ModelType.TRANSFORMER``: int8 Convolution and MatMul inputs and weights, SmoothQuant
    and bias correction, calibrated on ``ctx.calibration``; the other layers at the plugin's default precision)."""
    import openvino as ov

    core = ov.Core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if mode == "bf16" and "BF16" not in capabilities:
        raise MethodUnavailable(
            f"OpenVINO's CPU plugin reports no native bf16 on this CPU (capabilities: {', '.join(capabilities)})"
        )
    names, tensors, constants = _flatten_tensors(ctx.inputs)
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's warnings, one per shape check in diffusers
        wrapper = _PositionalDenoiser(ctx.reference, names, constants).eval()
        model = ov.convert_model(wrapper, example_input=tuple(tensors))  # constants share the fp32 tensors
    model.reshape({index: ov.PartialShape(list(tensor.shape)) for index, tensor in enumerate(tensors)})
    timings = [f"convert_model {time.perf_counter() - start:.1f} s"]
    if mode == "int8":
        start = time.perf_counter()
        model = _nncf_quantize(model, ctx)
        timings.append(f"nncf.quantize {time.perf_counter() - start:.1f} s")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": ctx.threads}
    if _PRECISION[mode] is not None:
        config["INFERENCE_PRECISION_HINT"] = _PRECISION[mode]
    start = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    timings.append(f"compile_model {time.perf_counter() - start:.1f} s")
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    constants_bytes = _constant_bytes(model, halve_floats=precision == "bf16")
    int8_layers = _int8_layers(model) if mode == "int8" else None
    del model, wrapper
    feeds = [tensor.numpy() for tensor in tensors]

    def call() -> Tensor:  # the compiled model's own infer request; the output is a copy
        return torch.from_numpy(compiled(feeds)[0])

    built = Built(call=call, module=None, path="OpenVINO", weight_bytes=constants_bytes)
    built.path_detail = f"CPU plugin, static shapes, execution precision {precision}" + (
        f"; NNCF int8 ({int8_layers}), calibrated on the same {len(ctx.calibration)} inputs" if int8_layers else ""
    )
    built.notes.append("; ".join(timings))
    built.notes.append(
        "weight bytes = the OpenVINO model's constants"
        + (" (fp32 ones at 2 bytes: the plugin runs them in bf16)" if precision == "bf16" else "")
        + "; the plugin's own packed copies show in held"
    )
    return built


def _nncf_quantize(model: Any, ctx: BuildContext) -> Any:
    """``nncf.quantize`` on the calibration set's calls (the inputs quantdiff and PT2E calibrate on)."""
    import nncf

    def transform(inputs: dict[str, Any]) -> list[Any]:
        return [tensor.numpy() for tensor in _flatten_tensors(inputs)[1]]

    dataset = nncf.Dataset([record.inputs for record in ctx.calibration], transform)
    # NNCF draws progress bars on stdout; the benchmark's log is its own
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(
            model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=max(1, len(ctx.calibration))
        )


def _constant_bytes(model: Any, halve_floats: bool) -> int:
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            size = op.get_byte_size()
            element = op.get_output_element_type(0)
            total += size // 2 if halve_floats and element.is_real() and element.bitwidth == 32 else size
    return total


def _int8_layers(model: Any) -> str:
    """What NNCF quantized: the Convolution and MatMul nodes fed by a FakeQuantize, counted by type."""
    fed: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        for output in op.outputs():
            for target in output.get_target_inputs():
                kind = target.get_node().get_type_name()
                if kind in ("Convolution", "MatMul"):
                    fed[kind] = fed.get(kind, 0) + 1
    return ", ".join(f"{count} {kind} inputs" for kind, count in sorted(fed.items())) or "no FakeQuantize"
