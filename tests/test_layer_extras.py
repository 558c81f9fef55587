"""Layer extras in one forward: input pre-scale, low-rank floating-point branch, per-call (per-timestep) input
scales; prepared vs converted states; integer path; skeletons that declare every stored tensor."""

from __future__ import annotations

import pytest
import torch
from kernel_check import KERNELS_EXPECTED, SUPPORT, needs_kernels
from torch import nn

from quantdiff.calibration.timestep import StepClock
from quantdiff.errors import RecipeError
from quantdiff.nn import InputQParams, QuantizedLayer
from quantdiff.nn.quantized import QUANTIZED_CLASSES
from quantdiff.plan import LayerPlan
from quantdiff.primitives import compute_qparams, fake_quantize, sqnr_db
from quantdiff.recipe import PRESETS, LayerOverride, Recipe, TensorSpec


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(64, 48), torch.randn(2, 10, 64)
    return nn.Conv2d(32, 48, 3, padding=1), torch.randn(2, 32, 8, 8)


def _plan(layer: nn.Module, recipe: str = "w8a8") -> LayerPlan:
    spec = PRESETS[recipe]
    kind = type(layer).__name__
    return LayerPlan("layer", kind, tuple(layer.weight.shape), True, spec.weights, spec.activations, "test")


def _prepared(layer: nn.Module, recipe: str = "w8a8") -> QuantizedLayer:
    return QUANTIZED_CLASSES[type(layer).__name__].prepared(layer, _plan(layer, recipe))


def _per_channel(v: torch.Tensor, kind: str) -> torch.Tensor:
    return v if kind == "linear" else v[:, None, None]


def _input_qparams(x: torch.Tensor) -> InputQParams:
    return InputQParams(*compute_qparams(x.min(), x.max(), 8, False))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_pre_scale_and_lowrank_branch_reparametrise_exactly_and_quantize_the_residual(kind):
    layer, x = _layer(kind)
    with torch.no_grad():
        expected = layer(x)
    module = _prepared(layer)
    assert module.is_prepared and module.weight is layer.weight  # the original parameter, not a copy
    c_in, rank = layer.weight.shape[1], 4
    s = torch.exp(torch.randn(c_in) * 0.5)  # (C_in,)
    w = layer.weight.detach() / (s[None, :, None, None] if kind == "conv" else s[None, :])  # W' = W / s
    flat = w.reshape(w.shape[0], -1)  # (C_out, K)
    u, sigma, vh = torch.linalg.svd(flat, full_matrices=False)
    up, down = u[:, :rank] * sigma[:rank], vh[:rank]  # (C_out, r), (r, K)
    with torch.no_grad():
        module.weight.copy_((flat - up @ down).reshape(w.shape))  # the residual R
    plan = module.layer_plan.with_extra("input_pre_scale", channels=c_in).with_extra(
        "lowrank", rank=rank, dtype="float32"
    )
    module.set_layer_plan(
        plan, {"input_pre_scale": s, "lowrank_down": down.reshape(rank, *w.shape[1:]), "lowrank_up": up}
    )
    with torch.no_grad():
        assert sqnr_db(expected, module(x)) > 100  # prepared: floating point, exact up to rounding
    xs = x * _per_channel(s, kind)
    qparams = _input_qparams(xs)
    module.convert(input_qparams=qparams)
    assert not module.is_prepared and "weight" not in dict(module.named_parameters())
    with torch.no_grad():
        got = module(x)
        residual = module._op(fake_quantize(xs, *qparams, 8, False), module.dequantized_weight(), module.bias)
        branch = module._branch(xs, module.lowrank_down, module.lowrank_up)
    assert torch.equal(got, residual + branch)
    assert set(module.state_dict()) == set(plan.stored_tensors())


@pytest.mark.parametrize("kind", ["linear", "conv"])
@needs_kernels
def test_extras_take_the_integer_path_around_the_kernel(kind):
    layer, x = _layer(kind)
    module = _prepared(layer, "w8a8-int")  # pair-safe weights: exact on every x86 CPU
    s = torch.linspace(0.5, 2.0, layer.weight.shape[1])
    down = torch.randn(2, *layer.weight.shape[1:]) * 0.1
    up = torch.randn(layer.weight.shape[0], 2) * 0.1
    plan = module.layer_plan.with_extra("input_pre_scale", channels=s.numel()).with_extra(
        "lowrank", rank=2, dtype="float16"
    )
    module.set_layer_plan(plan, {"input_pre_scale": s, "lowrank_down": down.half(), "lowrank_up": up.half()})
    module.convert(input_qparams=_input_qparams(x * _per_channel(s, kind)))
    with torch.no_grad():
        reference = module.reference_forward(x)
        decision = module.set_execution("integer", support=SUPPORT)
        integer = module(x)
    assert decision.path == "integer", decision.reason
    assert sqnr_db(reference, integer) > 100  # the same integers: fp32 rounding of the rescale only


def test_per_timestep_input_scales_follow_the_denoiser_clock():
    layer, x = _layer("linear")
    module = _prepared(layer, "w8a8-int")  # pair-safe weights: the kernel is exact on every x86 CPU
    plan = module.layer_plan.with_extra("timestep_groups", groups=3)
    module.set_layer_plan(plan, {"timestep_edges": torch.tensor([300.0, 700.0])})
    scales = torch.tensor([0.01, 0.02, 0.04])
    module.convert(input_qparams=InputQParams(scales, torch.tensor([128, 128, 128])))
    assert module.input_scale.shape == (3,)
    with pytest.raises(RuntimeError, match="per-timestep input scales but no current timestep"):
        module(x)
    clock = StepClock(nn.Linear(1, 1))
    module.step_clock = clock
    steps = [(999.0, 2), (700.0, 2), (699.0, 1), (300.0, 1), (10.0, 0), (-5.0, 0), (5000.0, 2)]
    expected = {}
    for timestep, group in steps:
        clock.timestep = timestep
        assert module.timestep_group() == group, timestep
        with torch.no_grad():
            quantized_input = fake_quantize(x, scales[group], torch.tensor(128), 8, False)
            expected[timestep] = module._op(quantized_input, module.dequantized_weight(), module.bias)
            assert torch.equal(module(x), expected[timestep])
    if not KERNELS_EXPECTED:
        return
    decision = module.set_execution("integer", support=SUPPORT)
    assert decision.path == "integer", decision.reason
    for timestep, _ in steps:  # the kernel takes each call's group scale
        clock.timestep = timestep
        with torch.no_grad():
            assert sqnr_db(expected[timestep], module(x)) > 100


def _dynamic(bits: int, symmetric: bool, granularity: str) -> str:
    return f"int{bits} {'sym' if symmetric else 'asym'} {granularity} dynamic"


@pytest.mark.parametrize(
    "kind, granularity, symmetric, clip",
    [
        ("linear", "token", True, 1.0),
        ("linear", "tensor", False, 1.0),
        ("conv1x1", "token", True, 1.0),
        ("conv", "tensor", True, 1.0),
        ("linear", "token", False, 0.9),
        ("linear", "token", True, 0.85),
        ("conv1x1", "token", False, 0.9),
        ("conv", "tensor", False, 0.8),
    ],
)
def test_dynamic_inputs_are_quantized_per_call_and_run_on_the_kernel(kind, granularity, symmetric, clip):
    torch.manual_seed(1)
    layer, x = _layer("conv" if kind != "linear" else "linear")
    if kind == "conv1x1":
        layer = nn.Conv2d(32, 48, 1)
    x = (
        x * torch.linspace(0.1, 10, x.shape[1])[:, None, None]
        if x.dim() == 4
        else x * torch.rand(x.shape[:-1] + (1,)) * 10
    )
    activations = TensorSpec(8, symmetric, granularity, dynamic=True, clip_ratio=clip)
    weights = PRESETS["w8a8-int"].weights
    plan = LayerPlan("layer", type(layer).__name__, tuple(layer.weight.shape), True, weights, activations, "test")
    assert "input_scale" not in plan.stored_tensors() and plan.stored_tensors()["weight_q"]
    module = QUANTIZED_CLASSES[type(layer).__name__].prepared(layer, plan)
    module.convert()  # no calibration: nothing to observe
    assert activations.describe() == _dynamic(8, symmetric, granularity) + (f" clip{clip:g}" if clip != 1 else "")
    channel = -1 if kind == "linear" else 1
    if granularity == "token":
        low, high = x.amin(dim=channel, keepdim=True), x.amax(dim=channel, keepdim=True)
    else:
        low, high = x.min(), x.max()
    scale, zero_point = compute_qparams(low * clip, high * clip, 8, symmetric)
    if clip != 1:  # the clipped range saturates the loudest values of each token: outputs differ from min-max
        assert (x / scale + zero_point).round().amax() > (255 if not symmetric else 127)
    with torch.no_grad():
        expected = module._op(
            fake_quantize(x, scale, zero_point, 8, symmetric), module.dequantized_weight(), module.bias
        )
        reference = module(x)
    assert torch.equal(reference, expected)
    for backend in ("onednn", "int_mm"):
        if backend == "onednn" and not KERNELS_EXPECTED:
            continue
        decision = module.set_execution("integer", support=SUPPORT, backend=backend)
        if backend == "int_mm" and kind == "conv":
            assert decision.path == "reference" and "3x3 convolution" in decision.reason
            continue
        assert decision.path == "integer", (backend, decision.reason)
        with torch.no_grad():
            assert sqnr_db(reference, module(x)) > 100, backend
        module.set_execution("reference")


def test_dynamic_inputs_the_kernels_cannot_take_say_why():
    conv, _ = _layer("conv")
    spec = TensorSpec(8, True, "token", dynamic=True)
    plan = LayerPlan("layer", "Conv2d", tuple(conv.weight.shape), True, PRESETS["w8a8-int"].weights, spec, "t")
    module = QUANTIZED_CLASSES["Conv2d"].prepared(conv, plan)
    module.convert()
    decision = module.set_execution("integer", support=SUPPORT)
    assert (
        decision.path == "reference"
        and "per-pixel input scales do not factor out of a 3x3 convolution" in decision.reason
    )
    linear, x = _layer("linear")
    spec = TensorSpec(8, False, "token", dynamic=True)
    plan = LayerPlan("layer", "Linear", tuple(linear.weight.shape), True, PRESETS["w8a8-int"].weights, spec, "t")
    module = QUANTIZED_CLASSES["Linear"].prepared(linear, plan)
    module.convert()
    # asymmetric per-token inputs: oneDNN subtracts each token's zero point as a rank-1 term, the int8 GEMM in int32
    for backend in ("onednn", "int_mm") if KERNELS_EXPECTED else ("int_mm",):
        decision = module.set_execution("integer", support=SUPPORT, backend=backend)
        assert decision.path == "integer", decision.reason
        with torch.no_grad():
            assert sqnr_db(module.reference_forward(x), module(x)) > 100
        module.set_execution("reference")


def _groupwise_reference(x: torch.Tensor, channel: int, group_size: int, bits: int) -> torch.Tensor:
    """Per-token-group fake quantization written as a loop over the groups (the last one may be shorter)."""
    parts = []
    for part in x.split(group_size, dim=channel):
        low, high = part.amin(dim=channel, keepdim=True), part.amax(dim=channel, keepdim=True)
        scale, zero_point = compute_qparams(low.clamp_max(0), high.clamp_min(0), bits, False)
        parts.append(fake_quantize(part, scale, zero_point, bits, False))
    return torch.cat(parts, dim=channel)


@pytest.mark.parametrize("kind, channels", [("linear", 96), ("linear", 80), ("conv", 32), ("conv", 40)])
def test_per_token_group_inputs_quantize_each_group_of_channels_per_call(kind, channels):
    """4-bit inputs with a few loud channels: one range per token drowns the quiet channels, one range per
    token and group of 16 channels keeps them (Q-DiT's / SVDQuant's input format). 80 and 40 channels leave a
    last group of 16 / 8 channels of its own."""
    torch.manual_seed(2)
    if kind == "linear":
        layer, x, channel = nn.Linear(channels, 48), torch.randn(2, 10, channels), -1
    else:
        layer, x, channel = nn.Conv2d(channels, 48, 3, padding=1), torch.randn(2, channels, 8, 8), 1
    loud = torch.ones(channels)
    loud[:4] = 30.0  # four outlier channels, all in the first group
    x = x * (loud if kind == "linear" else loud[:, None, None])
    quiet_db = {}
    for name, spec in {
        "token": TensorSpec(4, False, "token", dynamic=True),
        "group": TensorSpec(4, False, "group", group_size=16, dynamic=True),
    }.items():
        plan = LayerPlan(
            "layer", type(layer).__name__, tuple(layer.weight.shape), True, PRESETS["w8a8"].weights, spec, "t"
        )
        assert "input_scale" not in plan.stored_tensors()
        module = QUANTIZED_CLASSES[type(layer).__name__].prepared(layer, plan)
        module.convert()
        quiet = x.narrow(channel, 16, channels - 16)  # the channels outside the loud group
        quiet_db[name] = sqnr_db(quiet, module.quantize_input(x).narrow(channel, 16, channels - 16))
        if name == "group":
            assert spec.describe() == "int4 asym token-group16 dynamic"
            with torch.no_grad():
                expected = module._op(_groupwise_reference(x, channel, 16, 4), module.dequantized_weight(), module.bias)
                assert torch.equal(module(x), expected)
            decision = module.set_execution("integer", support=SUPPORT)
            assert decision.path == "reference" and "groups of 16 channels" in decision.reason, decision.reason
    # 30x louder channels widen a per-token range 30x: the quiet channels lose ~29 dB to it
    assert quiet_db["group"] > quiet_db["token"] + 20, quiet_db


def test_dynamic_specs_are_validated():
    with pytest.raises(
        RecipeError, match="granularity 'token' computes a scale per token at run time: set dynamic true"
    ):
        TensorSpec(8, True, "token")
    with pytest.raises(RecipeError, match="dynamic scales are the min-max of each call: remove observer 'mse'"):
        TensorSpec(8, True, "tensor", observer="mse", dynamic=True)
    with pytest.raises(RecipeError, match="weights are quantized once"):
        Recipe("x", TensorSpec(8, True, "tensor", dynamic=True), None)
    recipe = Recipe("x", PRESETS["w8a8"].weights, TensorSpec(4, True, "token", dynamic=True))
    assert not recipe.needs_calibration and recipe.to_dict()["_version"] == 3
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    grouped = Recipe("g", PRESETS["w8a8"].weights, TensorSpec(4, False, "group", group_size=64, dynamic=True))
    assert not grouped.needs_calibration and grouped.to_dict()["_version"] == 4  # activation groups are version 4
    assert Recipe.from_dict(grouped.to_dict()) == grouped
    older = grouped.to_dict()
    older["_version"] = 3  # hand-edited down: the reader names what needs version 4
    with pytest.raises(RecipeError, match="per-token groups of input channels.*needs version 4"):
        Recipe.from_dict(older)
    with pytest.raises(RecipeError, match="activation groups are per token, computed at run time: set dynamic true"):
        Recipe("x", PRESETS["w8a8"].weights, TensorSpec(4, False, "group", group_size=64))
    with pytest.raises(RecipeError, match=r"clip_ratio=1.5 is out of range: use a number in \(0, 1\]"):
        TensorSpec(4, False, "token", dynamic=True, clip_ratio=1.5)
    with pytest.raises(RecipeError, match="clip_ratio=0.9 applies to dynamic scales"):
        TensorSpec(4, False, "tensor", observer="minmax", clip_ratio=0.9)
    clipped = Recipe("c", PRESETS["w8a8"].weights, TensorSpec(4, False, "token", dynamic=True, clip_ratio=0.9))
    assert clipped.to_dict()["_version"] == 4 and Recipe.from_dict(clipped.to_dict()) == clipped
    static = Recipe(
        "y",
        PRESETS["w8a8"].weights,
        TensorSpec(4, True, "tensor", dynamic=True),
        overrides=(LayerOverride("a*", activations={"dynamic": False}),),
    )
    assert static.needs_calibration  # one override brings back a calibrated scale


def test_a_skeleton_declares_every_stored_tensor_and_loads_strictly():
    layer, x = _layer("conv")
    module = _prepared(layer, "w4a8")
    plan = module.layer_plan.with_extra("lowrank", rank=3, dtype="bfloat16").with_extra("timestep_groups", groups=2)
    tensors = {
        "lowrank_down": torch.randn(3, *layer.weight.shape[1:]).bfloat16(),
        "lowrank_up": torch.randn(layer.weight.shape[0], 3).bfloat16(),
        "timestep_edges": torch.tensor([500.0]),
    }
    module.set_layer_plan(plan, tensors)
    module.convert(input_qparams=InputQParams(torch.tensor([0.02, 0.03]), torch.tensor([120, 130])))
    with torch.device("meta"):
        float_layer = nn.Conv2d(32, 48, 3, padding=1)
    skeleton = QUANTIZED_CLASSES["Conv2d"].like(float_layer, plan)
    declared = plan.stored_tensors()
    assert {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()} == {
        name: (decl.shape, decl.dtype) for name, decl in declared.items()
    }
    skeleton.load_state_dict(module.state_dict(), strict=True, assign=True)
    for name, tensor in module.state_dict().items():
        assert torch.equal(skeleton.state_dict()[name], tensor), name
    with pytest.raises(RuntimeError, match="Unexpected key"):
        skeleton.load_state_dict({**module.state_dict(), "input_pre_scale": torch.ones(32)}, strict=True)


def test_extras_are_checked_where_they_are_declared():
    layer, _ = _layer("linear")
    plan = _plan(layer)
    with pytest.raises(ValueError, match="unknown extra 'rotation'"):
        plan.with_extra("rotation")
    with pytest.raises(ValueError, match="'rank' must be a positive integer, got 0"):
        plan.with_extra("lowrank", rank=0, dtype="float16")
    with pytest.raises(ValueError, match="takes exactly the parameters"):
        plan.with_extra("input_pre_scale")
    with pytest.raises(ValueError, match="needs inputs quantized with calibrated scales"):
        _plan(layer, "w8a16").with_extra("timestep_groups", groups=2)
    module = _prepared(layer)
    with pytest.raises(ValueError, match="declares 'input_pre_scale': pass the tensor"):
        module.set_layer_plan(plan.with_extra("input_pre_scale", channels=64))
    with pytest.raises(ValueError, match=r"input_pre_scale is \(32,\) torch.float32, its plan declares \(64,\)"):
        module.set_layer_plan(plan.with_extra("input_pre_scale", channels=64), {"input_pre_scale": torch.ones(32)})
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    conv = QUANTIZED_CLASSES["Conv2d"].prepared(grouped, _plan(grouped))
    with pytest.raises(ValueError, match="low-rank branch needs a convolution with one group"):
        conv.set_layer_plan(conv.layer_plan.with_extra("lowrank", rank=1, dtype="float32"), {})


def _sd_sized(kind: str, mode: str) -> tuple[nn.Module, torch.Tensor]:
    """SD1.5 shapes at 32x32 latents: a transformer Linear over 1024 tokens, and an up-block resnet's conv1
    (3x3) or conv_shortcut (1x1: per-pixel scales factor out of it) whose input is the concatenation of the
    hidden state and a skip (640 = 320 + 320 channels) at 16x16."""
    torch.manual_seed(4)
    if kind == "linear":
        return nn.Linear(320, 320), torch.randn(2, 1024, 320) + 0.5
    x = torch.cat([torch.randn(2, 320, 16, 16), torch.randn(2, 320, 16, 16) * 8], dim=1)  # (B, C_hidden + C_skip, H, W)
    return nn.Conv2d(640, 320, 1) if mode.startswith("token") else nn.Conv2d(640, 320, 3, padding=1), x


@pytest.mark.skipif(not KERNELS_EXPECTED, reason="needs the int8 CPU kernels (oneDNN)")
@pytest.mark.parametrize(
    "kind, mode",
    [
        (kind, mode)
        for kind in ("linear", "conv")
        for mode in ("input_pre_scale", "timestep_groups", "token-sym", "token-asym")
    ]
    + [("conv", "input_split")],  # the split is a convolution's concatenated input
)
def test_each_activation_mode_matches_the_fake_quant_path_at_sd_sizes(kind, mode):
    """The integer path computes the fake-quant path's integers for every activation mode at SD1.5 sizes."""
    layer, x = _sd_sized(kind, mode)
    weights = PRESETS["w8a8-int"].weights  # pair-safe: exact on every x86 CPU
    activations = PRESETS["w8a8"].activations
    if mode.startswith("token"):
        activations = TensorSpec(8, mode == "token-sym", "token", dynamic=True)
    plan = LayerPlan("layer", type(layer).__name__, tuple(layer.weight.shape), True, weights, activations, "test")
    module = QUANTIZED_CLASSES[type(layer).__name__].prepared(layer, plan)
    channel = x.shape[-1] if kind == "linear" else x.shape[1]
    if mode == "input_pre_scale":
        s = torch.linspace(0.25, 4.0, channel)
        module.set_layer_plan(plan.with_extra("input_pre_scale", channels=channel), {"input_pre_scale": s})
        module.convert(input_qparams=_input_qparams(x * _per_channel(s, kind)))
    elif mode == "timestep_groups":
        module.set_layer_plan(plan.with_extra("timestep_groups", groups=2), {"timestep_edges": torch.tensor([500.0])})
        low, high = x.min(), x.max()
        pairs = [compute_qparams(low, high, 8, False), compute_qparams(low / 2, high / 2, 8, False)]
        module.convert(input_qparams=InputQParams(*(torch.stack(t) for t in zip(*pairs, strict=True))))
        module.step_clock = StepClock(nn.Linear(1, 1))
        module.step_clock.timestep = 200.0  # group 0
    elif mode == "input_split":
        module.set_layer_plan(plan.with_extra("input_split", at=320))
        pairs = [compute_qparams(part.min(), part.max(), 8, False) for part in x.split(320, dim=1)]
        module.convert(input_qparams=InputQParams(*(torch.stack(t) for t in zip(*pairs, strict=True))))
    else:
        module.convert()
    with torch.no_grad():
        reference = module.reference_forward(x)
        decision = module.set_execution("integer", support=SUPPORT)
        integer = module(x)
    assert decision.path == "integer", decision.reason
    assert sqnr_db(reference, integer) > 100, decision.reason  # the same integers: fp32 rounding of the rescale
