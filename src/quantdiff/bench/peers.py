"""Builders of the in-process peers: bf16, torch.ao dynamic int8, PT2E static int8, optimum-quanto and torchao."""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from quantdiff.bench.builds import MethodUnavailable, _Built, _call, _Context, _share_weights_copy
from quantdiff.calibration.dataset import denoiser_output
from quantdiff.nn.attention import native_bf16


def _to_bf16(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to(torch.bfloat16) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _to_bf16(item) for key, item in value.items()}
    return value


class _BF16Denoiser(nn.Module):
    """A bf16 denoiser called with the fp32 inputs of every other method: casts them, returns fp32."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, **inputs: Any) -> Tensor:
        return denoiser_output(self.denoiser(**_to_bf16(inputs))).float()


def _build_bf16(ctx: _Context) -> _Built:
    native, flags = native_bf16()
    if not native:
        raise MethodUnavailable(
            f"this CPU has no native bf16 ({flags}): bf16 convolutions and matmuls run emulated, "
            "tens of times slower than fp32"
        )
    # model.to(bfloat16) on a weight-sharing copy would convert the shared fp32 Parameters in place: map each
    # tensor to a new bf16 one instead (0.5x the fp32 bytes, no second fp32 copy).
    memo = {}
    for tensor in itertools.chain(ctx.reference.parameters(), ctx.reference.buffers()):
        converted = tensor.detach().to(torch.bfloat16) if tensor.is_floating_point() else tensor
        memo[id(tensor)] = (
            nn.Parameter(converted, requires_grad=False) if isinstance(tensor, nn.Parameter) else converted
        )
    model = _BF16Denoiser(copy.deepcopy(ctx.reference, memo))
    detail = f"every floating-point tensor in bf16 (CPU {flags}); inputs cast to bf16, output back to fp32"
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="bf16", path_detail=detail)


def _build_ao_dynamic(ctx: _Context) -> _Built:
    from torch.ao.quantization import quantize_dynamic

    model = _share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization is deprecated in 2.13; still what users find
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    linears = sum(type(m).__name__ == "Linear" and "dynamic" in type(m).__module__ for m in model.modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    detail = f"{linears} Linear as fbgemm/oneDNN dynamic int8 (per-call activation range); {convs} Conv2d fp32"
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="torch.ao dynamic", path_detail=detail)


def _build_pt2e(ctx: _Context) -> _Built:
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
    return _Built(call=None, module=converted, path="PT2E + inductor", path_detail=detail)


def _build_quanto(ctx: _Context, activations: bool) -> _Built:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    model = _share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, weights=qint8, activations=qint8 if activations else None)
        if activations:
            with Calibration():
                for record in ctx.calibration:
                    model(**record.inputs)
        freeze(model)
    detail = "qint8 weights" + (" and activations (calibrated on the same inputs)" if activations else "")
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="quanto", path_detail=detail)


def _build_torchao(ctx: _Context, dynamic_activations: bool) -> _Built:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    model = _share_weights_copy(ctx.reference)
    config = Int8DynamicActivationInt8WeightConfig() if dynamic_activations else Int8WeightOnlyConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config)  # nn.Linear only (torchao's default filter); Conv2d stays fp32
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    detail = f"{type(config).__name__} on nn.Linear; {convs} Conv2d fp32"
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="torchao", path_detail=detail)
