"""The torch._int_mm integer path (quantdiff.nn.kernels.int_mm): the GPU path's math, checked on the CPU.

``torch._int_mm`` has a CPU reference kernel, so every test here runs without a GPU; the one that needs
CUDA skips elsewhere. Against the fake-quant reference per layer (tiny and SD-sized shapes), the exactness
of the integer accumulation, storage, small-row padding, fallbacks, and a whole tiny UNet and MMDiT.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quantized_layers import quantized_like
from torch import nn

from quantdiff.nn import QuantizedLinear, use_integer_kernels, use_reference
from quantdiff.nn.kernels import Int8MatmulKernel
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.plan import LayerPlan
from quantdiff.primitives import quantize, sqnr_db
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe, TensorSpec

W8A8 = PRESETS["w8a8"]


def _quantized(layer: nn.Module, x: torch.Tensor, recipe: Recipe = W8A8):
    return quantized_like(layer, x, recipe)


CASES = {
    "linear 48->24, 5 tokens (rows padded)": (nn.Linear(48, 24), (2, 5, 48)),
    "linear 320->1280, 64 tokens": (nn.Linear(320, 1280), (1, 64, 320)),
    "linear 768->320 no bias": (nn.Linear(768, 320, bias=False), (2, 77, 768)),
    "conv 1x1 320->640 @16 (shortcut)": (nn.Conv2d(320, 640, 1), (1, 320, 16, 16)),
    "conv 1x1 64->32 unbatched": (nn.Conv2d(64, 32, 1), (64, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("activations", ["asymmetric", "symmetric"])
def test_int_mm_matches_fake_quant_reference(name, activations):
    torch.manual_seed(0)
    layer, shape = CASES[name]
    with torch.no_grad():
        layer.weight.normal_(0.0, layer.weight[0].numel() ** -0.5)
    x = F.silu(torch.randn(shape)) if activations == "asymmetric" else torch.randn(shape)
    recipe = W8A8 if activations == "asymmetric" else Recipe("w8a8-sym", W8A8.weights, TensorSpec(8, True, "tensor"))
    quantized = _quantized(layer, x, recipe)
    with torch.no_grad():
        reference = quantized(x)
        stored = quantized.weight_q.clone()
        decision = quantized.set_execution("integer", backend="int_mm")
        integer = quantized(x)
    assert decision.path == "integer" and decision.reason == "int8 GEMM (torch._int_mm)"
    assert isinstance(quantized._kernel, Int8MatmulKernel)
    assert integer.shape == reference.shape and integer.dtype == torch.float32
    quality = sqnr_db(reference, integer)
    assert quality > 100, f"{name}: {quality:.1f} dB"  # the same integers: fp32 rounding of the epilogue only
    # one int8 copy, in the GEMM's (K, C_out) layout, in place of weight_q; saved bytes unchanged
    assert quantized.weight_q is None and quantized.kernel_bytes == stored.numel()
    assert torch.equal(quantized.integer_weight(), stored)
    assert torch.equal(quantized.state_dict()["weight_q"], stored)


def test_integer_accumulation_is_exact():
    torch.manual_seed(1)
    layer, x = nn.Linear(256, 64), F.silu(torch.randn(40, 256))
    quantized = _quantized(layer, x)
    quantized.set_execution("integer", backend="int_mm")
    kernel = quantized._kernel
    q = kernel.quantize(x)  # (M, K) int8 = the reference's uint8 q - 128
    expected_q = quantize(x, quantized.input_scale, quantized.input_zero_point, 8, False)
    assert torch.equal(q.to(torch.int32) + 128, expected_q.to(torch.int32))
    exact = (expected_q.double() - float(quantized.input_zero_point)) @ quantized.integer_weight().double().t()
    with torch.no_grad():
        y = kernel(x, None)
    rescaled = exact * kernel.out_scale.double()
    assert sqnr_db(rescaled, y.double()) > 100  # only the fp32 rounding of the epilogue differs


@pytest.mark.parametrize("kind", ["linear", "conv", "token"])
def test_nan_and_inf_inputs_on_the_int_mm_path(kind):
    """NaN has no int8 image (the cast makes it an arbitrary finite integer): the kernel answers NaN, as the
    reference path does, so the numerics guard downstream sees it. inf clamps to the largest integer on both
    paths (the same finite output); with per-token scales it makes its row's scale inf, NaN on both paths."""
    torch.manual_seed(5)
    layer = nn.Conv2d(64, 32, 1) if kind == "conv" else nn.Linear(64, 32)
    x = torch.randn(2, 64, 5, 5) if kind == "conv" else torch.randn(2, 20, 64)
    if kind == "token":  # dynamic per-token inputs: no stored input scale
        tokens = TensorSpec(8, False, "token", dynamic=True)
        plan = LayerPlan("layer", "Linear", tuple(layer.weight.shape), True, W8A8.weights, tokens, "test")
        quantized = QuantizedLinear.prepared(layer, plan)
        quantized.convert()
        quantized.eval()
    else:
        quantized = _quantized(layer, x)
    infinite, nan = x.clone(), x.clone()
    infinite.view(-1)[3] = float("inf")
    nan.view(-1)[5] = float("nan")
    with torch.no_grad():
        reference_inf, reference_nan = quantized(infinite), quantized(nan)
        assert quantized.set_execution("integer", backend="int_mm").path == "integer"
        integer_inf, integer_nan = quantized(infinite), quantized(nan)
    assert torch.isnan(reference_nan).any()
    assert torch.isnan(integer_nan).any(), "the int8 GEMM turned a NaN input into a finite output"
    if kind == "token":
        assert not torch.isfinite(reference_inf).all() and not torch.isfinite(integer_inf).all()
    else:
        assert torch.isfinite(reference_inf).all() and sqnr_db(reference_inf, integer_inf) > 100


def test_bf16_inputs_return_bf16_and_the_others_keep_the_reference_path():
    torch.manual_seed(2)
    layer, x = nn.Linear(64, 32), torch.randn(3, 20, 64)
    quantized = _quantized(layer, x)
    quantized.set_execution("integer", backend="int_mm")
    with torch.no_grad():
        y = quantized(x.bfloat16())
        assert y.dtype == torch.bfloat16 and sqnr_db(quantized.reference_forward(x), y.float()) > 30
    blocked = {
        "3x3 convolution": _quantized(nn.Conv2d(16, 16, 3, padding=1), torch.randn(1, 16, 8, 8)),
        "K=12, C_out=24": _quantized(nn.Linear(12, 24), torch.randn(4, 12)),
        "per-group weights": _quantized(nn.Linear(256, 32), torch.randn(4, 256), PRESETS["w4a8"]),
    }
    for reason, module in blocked.items():
        decision = module.set_execution("integer", backend="int_mm")
        assert decision.path == "reference" and reason in decision.reason, decision.reason
        assert module.weight_q is not None and module.kernel_bytes == 0
    weight_only = QuantizedLinear(LayerPlan("l", "Linear", (32, 64), True, PRESETS["w8a16"].weights, None, "test"))
    assert "weight-only" in weight_only.set_execution("integer", backend="int_mm").reason
    with pytest.raises(ValueError, match="backend 'cuda' is unknown"):
        weight_only.set_execution("integer", backend="cuda")


@pytest.mark.parametrize("arch", ["sd15", "sd3"])
def test_whole_tiny_denoiser_on_the_int_mm_path(arch, tiny_folders, calibration_sets):
    calibration, held_out = calibration_sets[arch]
    pipe = load_pipeline(tiny_folders[arch])
    _, denoiser = denoiser_of(pipe)
    quantize_denoiser(denoiser, "w8a8", calibration, progress=False)
    reference = torch.cat(list(held_out.replay(denoiser, progress=False)))
    summary = use_integer_kernels(denoiser, backend="int_mm", attention="float32")
    integer = torch.cat(list(held_out.replay(denoiser, progress=False)))
    again = torch.cat(list(held_out.replay(denoiser, progress=False)))
    kinds = {layer.reason for layer in summary.integer}
    assert kinds == {"int8 GEMM (torch._int_mm)"} and len(summary.integer) > 0
    # the 3x3 convs of the UNet keep the reference path, each with the reason
    assert all("convolution" in layer.reason or "K=" in layer.reason for layer in summary.reference)
    if arch == "sd3":
        assert len(summary.reference) == 0  # the MMDiT is all Linear
    assert torch.equal(integer, again)  # deterministic
    quality = sqnr_db(reference, integer)
    print(f"{arch}: int_mm path vs reference path at the output {quality:.1f} dB ({len(summary.integer)} layers)")
    assert quality >= 25  # a whole quantized model amplifies 1-ulp differences (see test_integer_kernels)
    use_reference(denoiser)
    assert torch.equal(torch.cat(list(held_out.replay(denoiser, progress=False))), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layers_take_int_mm_automatically():
    torch.manual_seed(3)
    layer, x = nn.Linear(320, 1280), torch.randn(2, 64, 320)
    quantized = _quantized(layer, x).cuda()
    with torch.no_grad():
        reference = quantized(x.cuda())
        decision = quantized.set_execution("integer")
        integer = quantized(x.cuda())
    assert decision.path == "integer" and "torch._int_mm" in decision.reason
    assert sqnr_db(reference.cpu(), integer.cpu()) >= 35
