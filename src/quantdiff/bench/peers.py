"""Builders of the in-process peers: torch.ao dynamic int8, PT2E static int8, optimum-quanto and torchao."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from quantdiff.bench.builds import _Built, _call, _Context, _share_weights_copy


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
