"""Integer execution (oneDNN int8 kernels) against the fake-quant reference, storage, fallbacks, pair-safe weights.

The kernel tests skip only when the oneDNN int8 ops are missing from this torch build; the pair-safe and
recipe tests run everywhere. Acceptance is per layer, as benchmarks/KERNELS.md explains: a quantized model
is chaotic with respect to 1-ulp differences (the reference against itself with 1 vs 2 threads agrees to
only ~30 dB at a tiny UNet's output), so whole-model agreement is judged against floating point. The tests
pin ``backend="onednn"``: on AMX CPUs ``auto`` gives int8 layers to the packed kernel, which
tests/test_int4_kernels.py checks.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_check import EXACT_DB, IN_CI, OPS_MISSING, SUPPORT, exact_integer_output, needs_kernels
from kernel_layout import packed_int8_bounds
from quantized_layers import quantized_like
from safetensors.torch import load_file
from torch import nn

from quantdiff.errors import RecipeError
from quantdiff.nn import (
    QuantizedLayer,
    execution_summary,
    use_integer_kernels,
    use_reference,
)
from quantdiff.nn.kernels import KernelDecision, KernelSupport
from quantdiff.nn.kernels.onednn import OneDNNBackend
from quantdiff.nn.weights import quantize_weight
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import PAIR_LIMIT, compute_qparams, quantize, sqnr_db, unpack_int4
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, RECIPE_VERSION, LayerOverride, Recipe, TensorSpec
from quantdiff.serialization import WEIGHTS_NAME, load_quantized_denoiser, save_quantized

PAIR_SAFE = PRESETS["w8a8-int"]


def _layer_and_input(kind: str, shape: tuple, init: str, inputs: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        k, n, tokens = shape
        layer, x = nn.Linear(k, n), torch.randn(2, tokens, k)  # (B, T, K)
    else:
        c_in, c_out, kernel, stride, padding, groups, hw = shape
        layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups)
        x = torch.randn(2, c_in, hw, hw)  # (B, C, H, W)
    if init == "normal":  # bell-shaped like trained weights; "default" = kaiming-uniform, the saturation worst case
        with torch.no_grad():
            layer.weight.normal_(0.0, layer.weight[0].numel() ** -0.5)
    if inputs == "silu":  # one-sided, zero point near 0
        x = F.silu(1.5 * x)
    return layer.eval(), x  # "ln": centred, zero point ~128, the saturation worst case among real inputs


LAYERS = {
    # tiny
    "linear 48->24 tiny": ("linear", (48, 24, 5), "default", "ln"),
    "linear 77->40 odd K": ("linear", (77, 40, 9), "normal", "ln"),
    "conv 6->8 3x3 tiny": ("conv", (6, 8, 3, 1, 1, 1, 7), "default", "ln"),
    "conv 5->8 3x3 s2 p1 odd C_in": ("conv", (5, 8, 3, 2, 1, 1, 9), "default", "silu"),
    "conv 8->16 3x3 groups 2": ("conv", (8, 16, 3, 1, 1, 2, 6), "default", "ln"),
    # SD-sized (SD1.5 down block 0 at a 16x16 latent)
    "linear 320->1280, 64 tokens": ("linear", (320, 1280, 64), "normal", "ln"),
    "linear 320->1280 default init": ("linear", (320, 1280, 64), "default", "ln"),
    "conv 320->320 3x3 @16": ("conv", (320, 320, 3, 1, 1, 1, 16), "normal", "silu"),
    "conv 320->320 3x3 @16 centred input": ("conv", (320, 320, 3, 1, 1, 1, 16), "default", "ln"),
    "conv 320->320 3x3 s2 p1 @16 (downsample)": ("conv", (320, 320, 3, 2, 1, 1, 16), "normal", "ln"),
    "conv 320->640 1x1 @16 (shortcut)": ("conv", (320, 640, 1, 1, 0, 1, 16), "normal", "ln"),
}


@needs_kernels
@pytest.mark.parametrize("name", list(LAYERS))
def test_integer_path_matches_fake_quant_reference(name):
    layer, x = _layer_and_input(*LAYERS[name])
    quantized = quantized_like(layer, x, PAIR_SAFE)
    with torch.no_grad():
        reference = quantized(x)
        decision = quantized.set_execution("integer", support=SUPPORT, backend="onednn")
        integer = quantized(x)
    assert decision.path == "integer" and decision.exact, decision
    assert integer.shape == reference.shape == layer(x).shape
    assert integer.is_contiguous()  # NCHW in, NCHW out, like nn.Conv2d
    exact = exact_integer_output(quantized, x)
    sqnr = sqnr_db(exact, integer.double())
    print(f"{name}: integer vs exact {sqnr:.1f} dB; reference vs fp32 {sqnr_db(layer(x), reference):.1f} dB")
    assert sqnr >= EXACT_DB, (name, sqnr)
    assert sqnr_db(exact, reference.double()) >= EXACT_DB  # the reference path computes the same integers
    # the kernel's uint8 input is exactly the reference's integers (shifted to uint8 as the kernel takes them)
    expected = quantize(x, quantized.input_scale, quantized.input_zero_point, 8, False)
    assert torch.equal(quantized._kernel.quantize(x), expected)


@needs_kernels
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_nan_and_inf_inputs_on_the_integer_path(kind):
    """NaN has no uint8 image: the kernel answers NaN, as the reference path does, so the guard downstream sees
    it. inf clamps to the largest integer on both paths (a finite output, the same on both)."""
    shape = (48, 24, 5) if kind == "linear" else (6, 8, 3, 1, 1, 1, 7)
    layer, x = _layer_and_input(kind, shape, "normal", "ln")
    quantized = quantized_like(layer, x, PAIR_SAFE)
    with torch.no_grad():
        infinite, nan = x.clone(), x.clone()
        infinite.view(-1)[3] = float("inf")
        nan.view(-1)[5] = float("nan")
        reference_inf, reference_nan = quantized(infinite), quantized(nan)
        assert quantized.set_execution("integer", support=SUPPORT, backend="onednn").path == "integer"
        integer_inf, integer_nan = quantized(infinite), quantized(nan)
    assert torch.isfinite(reference_inf).all() and torch.isnan(reference_nan).any()
    assert torch.isfinite(integer_inf).all() and sqnr_db(reference_inf.double(), integer_inf.double()) >= EXACT_DB
    assert torch.isnan(integer_nan).any()


@needs_kernels
def test_channels_last_and_unbatched_conv_inputs():
    layer, x = _layer_and_input("conv", (16, 16, 3, 1, 1, 1, 8), "default", "ln")
    quantized = quantized_like(layer, x, PAIR_SAFE)
    with torch.no_grad():
        reference = quantized(x)
        quantized.set_execution("integer", support=SUPPORT, backend="onednn")
        channels_last = quantized(x.to(memory_format=torch.channels_last))
        unbatched = quantized(x[0])
    exact = exact_integer_output(quantized, x)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert sqnr_db(exact, channels_last.double()) >= EXACT_DB
    assert unbatched.shape == reference[0].shape and sqnr_db(exact[0], unbatched.double()) >= EXACT_DB


@needs_kernels
def test_integer_mode_holds_one_int8_copy_and_rebuilds_weight_q_exactly():
    c_out, k = 1280, 320
    layer, x = _layer_and_input("linear", (k, c_out, 64), "normal", "ln")
    quantized = quantized_like(layer, x, PAIR_SAFE)
    stored = quantized.weight_q.clone()
    assert stored.dtype == torch.int8 and tuple(stored.shape) == (c_out, k)
    saved_before = {key: value.clone() for key, value in quantized.state_dict().items()}
    summary_entry = quantized.set_execution("integer", support=SUPPORT, backend="onednn")
    assert summary_entry.path == "integer"
    # the prepacked copy is the only copy held: one byte per weight (+ blocking), weight_q released
    assert not quantized.holds_weight_q and quantized.weight_q is None
    fewest, most = packed_int8_bounds(c_out, k, SUPPORT.saturates)
    assert fewest <= quantized.kernel_bytes <= most <= 1.0125 * c_out * k
    # ... and everything that reads the weight gets it back bit for bit
    assert torch.equal(quantized.integer_weight(), stored)
    saved = quantized.state_dict()
    assert saved.keys() == saved_before.keys() and not any("packed" in key for key in saved)
    assert all(torch.equal(saved[key], saved_before[key]) for key in saved)
    assert torch.equal(copy.deepcopy(quantized).weight_q, stored)
    with torch.no_grad():
        integer = quantized(x)
        assert torch.equal(quantized.reference_forward(x), quantized_like(layer, x, PAIR_SAFE).reference_forward(x))
    quantized.set_execution("reference")
    assert quantized.holds_weight_q and torch.equal(quantized.weight_q, stored)
    quantized.set_execution("integer", support=SUPPORT, backend="onednn")
    with torch.no_grad():
        assert torch.equal(quantized(x), integer)  # re-prepacked from the restored weight: same kernel
    quantized.to(torch.device("cpu"))
    assert quantized.holds_weight_q and torch.equal(quantized.weight_q, stored)

    conv, xc = _layer_and_input("conv", (320, 320, 3, 1, 1, 1, 16), "normal", "silu")
    qconv = quantized_like(conv, xc, PAIR_SAFE)
    stored_conv = qconv.weight_q.clone()
    qconv.set_execution("integer", support=SUPPORT, backend="onednn")
    kc = 320 * 9
    assert qconv.weight_q is None
    assert 320 * kc <= qconv.kernel_bytes <= 320 * kc + 4 * 320  # + oneDNN's int32 compensation per channel
    assert qconv.kernel_bytes <= packed_int8_bounds(320, kc, SUPPORT.saturates)[1]
    assert torch.equal(qconv.integer_weight(), stored_conv)
    assert torch.equal(qconv.state_dict()["weight_q"], stored_conv)


@needs_kernels
def test_packed_int4_per_channel_weights_are_widened_for_the_kernel():
    c_out, k = 40, 77
    layer, x = _layer_and_input("linear", (k, c_out, 9), "normal", "ln")
    recipe = Recipe("w4a8-channel", TensorSpec(4, True, "channel"), PAIR_SAFE.activations)
    quantized = quantized_like(layer, x, recipe)
    with torch.no_grad():
        reference = quantized(x)
        stored = quantized.weight_q.clone()
        decision = quantized.set_execution("integer", support=SUPPORT, backend="onednn")
        integer = quantized(x)
    assert stored.dtype == torch.uint8 and stored.numel() == c_out * math.ceil(k / 2)  # stored and saved packed
    assert decision.path == "integer" and decision.widened and "widened to int8" in decision.reason
    assert quantized.kernel_bytes >= c_out * k  # the kernel's copy is int8
    assert torch.equal(quantized._kernel.dense_weight(), unpack_int4(stored, k, signed=True))
    assert torch.equal(quantized.integer_weight(), stored)  # re-packed from the kernel's copy, bit for bit
    assert sqnr_db(exact_integer_output(quantized, x), integer.double()) >= EXACT_DB
    assert sqnr_db(reference, integer) >= EXACT_DB - 10


@needs_kernels
@pytest.mark.parametrize(
    "recipe, reason",
    [
        ("w4a16", "reference: weight-only layer"),
        ("w4a16", "per-group weights (group128)"),
        ("w4a8", "reference: per-group weights (group128): the kernel takes one scale per output channel"),
        ("w8a16", "reference: weight-only layer"),
    ],
)
def test_layers_the_kernel_cannot_run_fall_back_with_the_reason(recipe, reason):
    layer, x = _layer_and_input("linear", (320, 64, 8), "normal", "ln")
    quantized = quantized_like(layer, x, PRESETS[recipe])
    with torch.no_grad():
        reference = quantized(x)
        decision = quantized.set_execution("integer", support=SUPPORT, backend="onednn")
        assert torch.equal(quantized(x), reference)
    assert decision.path == "reference" and reason in decision.reason, decision.reason
    assert quantized.kernel_bytes == 0


@needs_kernels
def test_asymmetric_weights_fall_back():
    layer, x = _layer_and_input("conv", (8, 8, 3, 1, 1, 1, 6), "default", "ln")
    recipe = Recipe("asym", TensorSpec(8, False, "channel"), PAIR_SAFE.activations)
    decision = quantized_like(layer, x, recipe).set_execution("integer", support=SUPPORT, backend="onednn")
    assert decision.path == "reference" and "asymmetric weights" in decision.reason


# Both kinds of x86 CPU, described: the decision runs on any machine (no kernel is built or called).
AVX2 = KernelSupport(True, "", "AVX2", vnni=False, saturates=True, probe="constructed")
VNNI = KernelSupport(True, "", "AVX512", vnni=True, saturates=False, probe="constructed")
VNNI_PROBE_SATURATED = KernelSupport(True, "", "AVX512", vnni=True, saturates=True, probe="constructed")
MISSING = KernelSupport(False, "torch 0.0 has no torch.ops.onednn.qlinear_prepack", "AVX2", False, True, "not run")


def _decide(layer, x, recipe, support, allow_inexact=False):
    inputs = quantized_like(layer, x, recipe).kernel_inputs()
    return OneDNNBackend().decide(inputs, support, allow_inexact)


def test_kernel_decision_on_either_kind_of_cpu():
    layer, x = _layer_and_input("linear", (320, 320, 64), "default", "ln")
    plain, safe = PRESETS["w8a8"], PAIR_SAFE
    # AVX2 without VNNI: plain int8 weights overflow the int16 pair sums, so they keep the reference path ...
    for saturating in (AVX2, VNNI_PROBE_SATURATED):  # ... also where the flags say VNNI but the probe saturated
        refused = _decide(layer, x, plain, saturating)
        assert refused.path == "reference" and refused.exact
        assert "not pair-safe" in refused.reason and "w8a8-int" in refused.reason, refused.reason
        # ... unless the caller accepts wrong results
        forced = _decide(layer, x, plain, saturating, allow_inexact=True)
        assert forced.path == "integer" and not forced.exact and "INEXACT" in forced.reason, forced
        # pair-safe weights are exact there
        paired = _decide(layer, x, safe, saturating)
        assert paired.path == "integer" and paired.exact and paired.reason == "int8 oneDNN; pair-safe weights"
    # VNNI / AMX: u8 x s8 accumulates straight into int32, any int8 weight is exact, allow_inexact changes nothing
    for recipe in (plain, safe):
        for allow_inexact in (False, True):
            decision = _decide(layer, x, recipe, VNNI, allow_inexact)
            assert decision == KernelDecision("integer", "int8 oneDNN; no int16 saturation on this CPU", True, False)
    # plain int8 weights whose same-sign pairs cannot overflow run on AVX2 too (alternating signs: the worst pair is one weight, 127)
    with torch.no_grad():
        layer.weight.abs_().mul_(torch.tensor([1.0, -1.0]).repeat(160))
    within = _decide(layer, x, plain, AVX2)
    assert (
        within.path == "integer" and within.exact and within.reason.endswith("pairs within int16 (worst pair sum 127)")
    )
    # int4 per-channel weights are widened on either CPU
    w4 = Recipe("w4a8-channel", TensorSpec(4, True, "channel"), PAIR_SAFE.activations)
    for support in (AVX2, VNNI):
        widened = _decide(layer, x, w4, support)
        assert widened.path == "integer" and widened.widened and "int4 weights widened to int8" in widened.reason
    # no usable ops: the reason is the self-check's
    missing = _decide(layer, x, safe, MISSING)
    assert missing == KernelDecision("reference", "reference: torch 0.0 has no torch.ops.onednn.qlinear_prepack")


@needs_kernels
def test_plain_int8_weights_on_this_cpu():
    """What the constructed descriptions decide, measured on this CPU's kernel."""
    if not SUPPORT.vnni:
        assert SUPPORT.saturates, SUPPORT  # no VNNI flag: the int16 pair sums can saturate
    layer, x = _layer_and_input("linear", (320, 320, 64), "default", "ln")
    quantized = quantized_like(layer, x, PRESETS["w8a8"])
    exact = exact_integer_output(quantized, x)
    described = AVX2 if SUPPORT.saturates else VNNI
    assert quantized.set_execution("integer", support=SUPPORT, backend="onednn") == _decide(
        layer, x, PRESETS["w8a8"], described
    )
    forced = quantized.set_execution("integer", support=SUPPORT, allow_inexact=True, backend="onednn")
    with torch.no_grad():
        wrong = sqnr_db(exact, quantized(x).double())
    print(f"plain W8A8 on this CPU's kernel ({SUPPORT.describe()}): {wrong:.1f} dB vs exact integer math")
    assert forced.path == "integer"
    if SUPPORT.saturates:
        assert not forced.exact and wrong < 50  # 14-46 dB: why pair-safe weights exist
    else:
        assert forced.exact and wrong >= EXACT_DB


def test_kernel_self_check_passes_where_the_ops_exist():
    """A failing self-check must not turn the kernel tests into skips in CI."""
    if OPS_MISSING:
        pytest.skip(f"oneDNN int8 ops missing from this torch build: {OPS_MISSING}")
    if not IN_CI and not SUPPORT.available:
        pytest.skip(f"oneDNN int8 self-check failed (a failure under CI=true): {SUPPORT.reason}")
    assert SUPPORT.available, SUPPORT.reason
    assert SUPPORT.probe.startswith("worst-case pair sums: ") and SUPPORT.per_call_scales


@needs_kernels
def test_summary_switch_back_and_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 16))
    x = torch.randn(4, 32)
    first = quantized_like(model[0], x, PAIR_SAFE)
    second = quantized_like(model[2], F.silu(model[0](x)), PRESETS["w4a16"])
    model[0], model[2] = first, second
    with torch.no_grad():
        reference = model(x)
        summary = use_integer_kernels(model, backend="onednn")  # oneDNN alone (auto: the packed backend takes layer 2)
        integer = model(x)
        copied = copy.deepcopy(model)  # the packed oneDNN tensor is not copied: rebuilt on first use
        assert torch.equal(copied(x), integer)
    assert [(layer.name, layer.path) for layer in summary.layers] == [("0", "integer"), ("2", "reference")]
    assert summary.layers[1].reason.startswith("reference: weight-only layer")
    fewest, most = packed_int8_bounds(64, 32, SUPPORT.saturates)
    assert summary.to_dict()["kernel_bytes"] == first.kernel_bytes and fewest <= first.kernel_bytes <= most
    assert "1 on the reference path" in summary.format()
    assert execution_summary(model).mode == "integer"
    with torch.no_grad():
        assert sqnr_db(exact_integer_output(first, x), model[0](x).double()) >= EXACT_DB
    assert sqnr_db(reference, integer) >= EXACT_DB - 10  # the second layer is the same reference path in both
    back = use_reference(model)
    assert back.mode == "reference" and all(layer.kernel_bytes == 0 for layer in back.layers)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


@needs_kernels
def test_changing_the_buffers_rebuilds_the_kernel():
    layer, x = _layer_and_input("linear", (64, 32, 4), "normal", "ln")
    quantized = quantized_like(layer, x, PAIR_SAFE)
    quantized.set_execution("integer", support=SUPPORT, backend="onednn")
    with torch.no_grad():
        before = quantized(x)
        quantized.set_input_qparams(*compute_qparams(2 * x.min(), 2 * x.max(), 8, False))
        after = quantized(x)
        quantized.set_execution("reference")
        reference = quantized(x)
    assert not torch.equal(before, after)  # the new scale was used, not a stale kernel
    assert sqnr_db(exact_integer_output(quantized, x), after.double()) >= EXACT_DB
    assert sqnr_db(reference, after) >= EXACT_DB - 10


# ------------------------------------------------------------------------------------------ pair-safe weights
def _same_sign_pair_sums(q: torch.Tensor) -> torch.Tensor:
    """|w[2j] + w[2j+1]| of same-sign pairs along dim 1 of (C_out, C_in, taps); odd C_in pairs with 0."""
    q = q.to(torch.int32)
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    a, b = q[:, 0::2], q[:, 1::2]
    same = ((a > 0) & (b > 0)) | ((a < 0) & (b < 0))
    return torch.where(same, (a + b).abs(), torch.zeros_like(a))


@pytest.mark.parametrize("shape", [(96, 320), (64, 77), (32, 15, 3, 3), (16, 4, 3, 3)])
def test_pair_safe_weights_satisfy_the_pair_constraint(shape):
    torch.manual_seed(0)
    weight = torch.rand(shape) * 2 - 1  # uniform: nearly every plain int8 channel violates
    spec = TensorSpec(8, True, "channel", pair_safe=True)
    weight_q, scale, zero_point = quantize_weight(weight, spec)
    assert weight_q.dtype == torch.int8 and tuple(weight_q.shape) == (shape[0], math.prod(shape[1:]))
    assert tuple(scale.shape) == (shape[0], 1) and zero_point is None
    pairs = _same_sign_pair_sums(weight_q.reshape(shape[0], shape[1], -1))  # pairs per kernel tap
    assert int(pairs.max()) <= PAIR_LIMIT
    plain_q, plain_scale, _ = quantize_weight(weight, TensorSpec(8, True, "channel"))
    assert int(_same_sign_pair_sums(plain_q.reshape(shape[0], shape[1], -1)).max()) > PAIR_LIMIT
    growth = scale / plain_scale
    assert bool((growth >= 1 - 1e-6).all() and (growth <= 2 + 1e-6).all())
    restored = weight_q.float() * scale
    plain = plain_q.float() * plain_scale
    flat = weight.reshape(shape[0], -1)
    assert sqnr_db(flat, restored) > sqnr_db(flat, plain) - 7  # uniform weights: about a 7-bit weight


def test_pair_safe_costs_about_a_db_on_bell_shaped_weights():
    torch.manual_seed(0)
    weight = torch.randn(256, 320) / 320**0.5
    safe_q, safe_scale, _ = quantize_weight(weight, TensorSpec(8, True, "channel", pair_safe=True))
    plain_q, plain_scale, _ = quantize_weight(weight, TensorSpec(8, True, "channel"))
    loss = sqnr_db(weight, plain_q.float() * plain_scale) - sqnr_db(weight, safe_q.float() * safe_scale)
    print(f"pair-safe weight SQNR loss on Gaussian weights: {loss:.2f} dB")
    assert 0 <= loss < 3


def test_pair_safe_is_validated_and_serialized_compatibly():
    with pytest.raises(RecipeError, match="pair_safe applies to 8-bit symmetric per-channel weights"):
        TensorSpec(4, True, "group", 128, pair_safe=True)
    with pytest.raises(RecipeError, match="pair_safe applies to 8-bit symmetric per-channel weights"):
        TensorSpec(8, False, "channel", pair_safe=True)
    with pytest.raises(RecipeError, match="pair_safe is a weight option"):
        Recipe("x", PAIR_SAFE.weights, TensorSpec(8, True, "channel", pair_safe=True))
    with pytest.raises(RecipeError, match=r"override 'down\.\*': pair_safe applies"):
        Recipe("x", PAIR_SAFE.weights, None, overrides=(LayerOverride("down.*", weights={"bits": 4}),))
    # a recipe file written before pair_safe existed (format version 1) still loads, unchanged
    old = {
        "_type": "Recipe",
        "_version": 1,
        "name": "w8a8",
        "weights": {"bits": 8, "symmetric": True, "granularity": "channel", "group_size": None, "observer": "minmax"},
        "activations": {"bits": 8, "symmetric": False, "granularity": "tensor", "observer": "mse"},
        "ignore": [],
        "use_default_ignore": True,
        "overrides": [],
        "layer_types": ["Linear", "Conv2d"],
    }
    recipe = Recipe.from_dict(json.loads(json.dumps(old)))
    assert recipe == PRESETS["w8a8"] and not recipe.weights.pair_safe
    assert recipe.to_dict()["_version"] == 1 and "pair_safe" not in recipe.to_dict()["weights"]
    # the option is written only when set, with the version that introduced it
    data = json.loads(json.dumps(PAIR_SAFE.to_dict()))
    assert data["_version"] == 2 and data["weights"]["pair_safe"] is True
    assert Recipe.from_dict(data) == PAIR_SAFE
    assert PAIR_SAFE.weights.describe() == "int8 sym channel minmax pair-safe"
    assert PAIR_SAFE.activations == PRESETS["w8a8"].activations  # the same A8 as w8a8
    data["_version"] = RECIPE_VERSION + 1  # a version this reader does not know yet
    with pytest.raises(RecipeError, match="newer than this quantdiff understands"):
        Recipe.from_dict(data)


# ----------------------------------------------------------------------------------------- whole denoiser
@needs_kernels
@pytest.mark.parametrize("arch", ["sd15", "sd3"])
def test_saved_pair_safe_denoiser_runs_integer_kernels(arch, tiny_folders, calibration_sets, tmp_path):
    folder = tiny_folders[arch]
    calibration, held_out = calibration_sets[arch]
    pipe = load_pipeline(folder)
    _, denoiser = denoiser_of(pipe)
    fp_out = torch.cat(list(held_out.replay(denoiser, progress=False)))
    quantize_denoiser(denoiser, "w8a8-int", calibration, progress=False)
    use_integer_kernels(denoiser, backend="onednn")
    in_memory_out = torch.cat(list(held_out.replay(denoiser, progress=False)))
    use_reference(denoiser)
    out = save_quantized(pipe, tmp_path / "q", base_path=folder)

    loaded = load_quantized_denoiser(out)
    reference_out = torch.cat(list(held_out.replay(loaded, progress=False)))
    # per layer, teacher-forced: each layer's reference input and output, recorded in reference mode
    recorded = {}

    def record(name):
        def hook(module, args, y) -> None:  # returns None: the output is not replaced
            recorded.setdefault(name, (args[0], y))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in loaded.named_modules()
        if isinstance(module, QuantizedLayer)
    ]
    next(iter(held_out.replay(loaded, progress=False)))
    for hook in hooks:
        hook.remove()

    summary = use_integer_kernels(loaded, backend="onednn")
    assert len(summary.layers) == len(summary.integer) > 0, summary.format()
    # pair-safe weights are what makes them exact on AVX2; VNNI / AMX CPUs are exact for any int8 weight
    exact_because = "pair-safe" if SUPPORT.saturates else "no int16 saturation"
    assert all(layer.exact and exact_because in layer.reason for layer in summary.integer)
    first = torch.cat(list(held_out.replay(loaded, progress=False)))
    second = torch.cat(list(held_out.replay(loaded, progress=False)))
    assert torch.equal(first, second)  # integer inference after save -> load is bit-stable
    assert torch.equal(first, in_memory_out)  # and identical to the model before saving
    with torch.no_grad():
        per_layer = {
            name: sqnr_db(exact_integer_output(loaded.get_submodule(name), x), loaded.get_submodule(name)(x).double())
            for name, (x, y) in recorded.items()
        }
        reference_per_layer = min(sqnr_db(y, loaded.get_submodule(name)(x)) for name, (x, y) in recorded.items())
    worst = min(per_layer, key=per_layer.get)
    reference_vs_fp, integer_vs_fp = sqnr_db(fp_out, reference_out), sqnr_db(fp_out, first)
    print(
        f"{arch}: {len(per_layer)} layers, integer vs exact per layer min {per_layer[worst]:.1f} dB ({worst}), "
        f"vs reference {reference_per_layer:.1f} dB, "
        f"end to end {sqnr_db(reference_out, first):.1f} dB; vs fp32: reference {reference_vs_fp:.1f} dB, "
        f"integer {integer_vs_fp:.1f} dB"
    )
    assert len(per_layer) == len(summary.layers) and per_layer[worst] >= EXACT_DB
    assert integer_vs_fp >= reference_vs_fp - 1.0  # the quality measured in simulation holds on the kernels

    # saving in integer mode writes exactly the tensors the reference mode writes
    again = save_quantized(loaded, tmp_path / "q2", base_path=folder)
    stored = load_file(out / _component(out) / WEIGHTS_NAME)
    stored_again = load_file(again / _component(again) / WEIGHTS_NAME)
    assert stored.keys() == stored_again.keys()
    assert all(torch.equal(stored[name], stored_again[name]) for name in stored)


def _component(folder) -> str:
    return json.loads((folder / "quantdiff.json").read_text())["denoiser"]["component"]
