"""Auto execution: each quantized layer takes the faster of the int8 kernel and the float path (the reference
math on a cached fp32 weight), measured at its first call; forced modes stay forced; every choice says why.

Speeds are not asserted here (benchmarks/notes/execution-choice.md has them): the tests check what was
chosen against what was measured, that the float path computes the reference bit for bit, and the bytes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_check import IN_CI, needs_kernels
from quantized_layers import quantized_like
from torch import nn

from quantdiff.nn import execution_summary, use_execution, use_reference
from quantdiff.nn.quantized import FLOAT_MARGIN, KERNEL_WITHOUT_TIMING_MACS, MEASURED_PATHS, PathTiming
from quantdiff.recipe import PRESETS

W8A8 = PRESETS["w8a8"]


def _tiny_linear(seed: int = 0):
    torch.manual_seed(seed)
    layer, x = nn.Linear(8, 4), torch.randn(1, 8)  # one token: the kernel's fixed cost is all there is
    return quantized_like(layer, x, W8A8), x


def _tiny_conv(seed: int = 0):
    torch.manual_seed(seed)
    layer, x = nn.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 3, 3)  # (N, C, H, W)
    return quantized_like(layer, x, W8A8), x


@pytest.fixture(autouse=True)
def fresh_measurements():
    MEASURED_PATHS.clear()  # each test measures (or seeds) its own shapes
    yield
    MEASURED_PATHS.clear()


@pytest.fixture
def one_thread():
    # On a loaded machine a 2-thread call waits for its second thread to be scheduled (milliseconds), which
    # drowns a tiny layer's microseconds; threads are part of the measured key, so one thread is a fair test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_kernels
def test_auto_picks_the_float_path_on_a_tiny_layer_and_computes_the_reference_bit_for_bit(one_thread):
    for make in (_tiny_linear, _tiny_conv):
        layer, x = make()
        reference = layer.reference_forward(x)
        # oneDNN: its fixed cost per call (input quantization, primitive) makes the float path win at one token
        # every time; the packed AMX kernel is about as fast as the float op there (0.008 vs 0.007 ms measured)
        assert layer.set_execution("auto", backend="onednn").path == "pending"
        with torch.no_grad():
            first, second = layer(x), layer(x)
        decision = layer.execution_decision()
        timing = MEASURED_PATHS[layer._speed_key(x)]
        print(f"{type(layer).__name__} {tuple(x.shape)}: {decision.reason}")
        assert decision.path == "float" and timing.float_wins
        assert timing.float_seconds * FLOAT_MARGIN < timing.kernel_seconds and 3 <= timing.calls <= 9
        assert decision.reason.startswith(f"float: {timing.describe()} at input {'x'.join(map(str, x.shape))}")
        # the same fake-quantized input and the same dequantized weight: identical bits, first call included
        for y in (first, second):
            assert torch.equal(y.view(torch.int32), reference.view(torch.int32))
        # the float copy is held beside weight_q (which stays: no kernel took it)
        assert layer.holds_weight_q and layer.kernel_bytes == 0
        assert layer.float_weight_bytes == 4 * layer.weight_shape.numel()


def test_float_path_matches_the_reference_for_per_timestep_and_asymmetric_inputs():
    """The float path's fast input quantization against primitives.fake_quantize, whatever the zero point."""
    torch.manual_seed(1)
    layer, x = nn.Linear(16, 8), torch.randn(3, 5, 16) * 4
    for preset in ("w8a8", "w8a8-int", "w4a8"):
        quantized = quantized_like(layer, x, PRESETS[preset])
        quantized.set_execution("auto")
        quantized._take_float_path("float: seeded by the test")
        x_edges = torch.cat([x, torch.tensor([-1e-6, 0.0, 1e9, -1e9] * 4).reshape(1, 1, 16).expand(3, 1, 16)], dim=1)
        with torch.no_grad():
            fast, reference = quantized(x_edges), quantized.reference_forward(x_edges)
        assert torch.equal(fast.view(torch.int32), reference.view(torch.int32)), preset


@needs_kernels
def test_a_measured_shape_decides_for_every_layer_of_that_shape_in_both_directions(one_thread):
    layer, x = _tiny_linear()
    other, _ = _tiny_linear(seed=1)  # other weights, same shape
    layer.set_execution("auto")
    with torch.no_grad():
        layer(x)
    (key,) = MEASURED_PATHS
    # seed the cache with the opposite verdict: the second layer follows it without measuring
    MEASURED_PATHS[key] = PathTiming(kernel_seconds=1e-5, float_seconds=1e-3, calls=9)
    other.set_execution("auto")
    with torch.no_grad():
        y = other(x)
    decision = other.execution_decision()
    assert decision.path == "integer" and "(same shape measured before)" in decision.reason
    assert "float 1.000 ms vs int8 kernel 0.010 ms per call" in decision.reason
    assert other.kernel_bytes > 0 and not other.holds_weight_q and other.float_weight_bytes == 0
    assert torch.allclose(y, other.reference_forward(x), atol=1e-5)  # the kernel: exact up to fp32 rescale
    MEASURED_PATHS[key] = PathTiming(kernel_seconds=1e-3, float_seconds=1e-5, calls=9)
    other.set_execution("auto")  # a switch forgets the layer's choice, not the measurements
    with torch.no_grad():
        other(x)
    assert other.execution_decision().path == "float" and other.holds_weight_q and other.kernel_bytes == 0


@needs_kernels
@pytest.mark.parametrize(
    "name, layer, x",
    [
        # SD1.5 at a 64x64 latent, batch 2 (guidance): attention projections and convs of each resolution
        ("linear 320 at 4096 tokens", nn.Linear(320, 320), torch.randn(2, 4096, 320)),
        ("linear 640 at 1024 tokens", nn.Linear(640, 640), torch.randn(2, 1024, 640)),
        ("linear 1280 at 256 tokens", nn.Linear(1280, 1280), torch.randn(2, 256, 1280)),
        ("linear 1280 at 64 tokens", nn.Linear(1280, 1280), torch.randn(2, 64, 1280)),
        ("conv 1280 3x3 at 8x8", nn.Conv2d(1280, 1280, 3, padding=1), torch.randn(2, 1280, 8, 8)),
        ("conv 320->640 1x1 at 32x32", nn.Conv2d(320, 640, 1), torch.randn(2, 320, 32, 32)),
    ],
)
def test_sd15_sized_layers_take_the_kernel(name, layer, x):
    quantized = quantized_like(layer.eval(), x, W8A8)
    quantized.set_execution("auto")
    with torch.no_grad():
        y = quantized(x)
    decision = quantized.execution_decision()
    macs = quantized._macs_per_call(x)
    print(f"{name}: {macs / 1e6:.0f} MMAC, {decision.reason}")
    assert macs >= KERNEL_WITHOUT_TIMING_MACS
    assert decision.path == "integer" and f"{macs / 1e6:.0f} MMAC per call" in decision.reason
    assert not MEASURED_PATHS  # nothing timed: no extra calls on the first step
    assert quantized.float_weight_bytes == 0 and quantized.kernel_bytes > 0
    assert torch.allclose(y, quantized.reference_forward(x), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_forced_modes_are_respected_and_the_summary_says_why(one_thread):
    linear, x = _tiny_linear()
    model = nn.Sequential(linear)
    summary = use_execution(model, "auto", backend="onednn")  # oneDNN: the float path wins at one token (above)
    assert summary.mode == "auto" and len(summary.pending) == 1
    assert summary.pending[0].reason.startswith("auto: the int8 kernel or the float path")
    with torch.no_grad():
        reference = linear.reference_forward(x)
        model(x)
    summary = execution_summary(model)
    (layer,) = summary.layers
    assert layer.path == "float" and layer.reason.startswith("float: float ")
    assert layer.float_bytes == 4 * 8 * 4 and layer.stored_bytes == 8 * 4 and layer.kernel_bytes == 0
    info = summary.to_dict()
    assert (info["float_layers"], info["integer_layers"], info["pending_layers"], info["float_bytes"]) == (1, 0, 0, 128)
    assert "1 on the float path (+0.00 MiB fp32 weight copies)" in summary.headline()
    # integer forces the kernel where float is faster; reference forces the fake-quant path
    summary = use_execution(model, "integer")
    assert summary.layers[0].path == "integer" and summary.layers[0].float_bytes == 0
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-6)
    assert execution_summary(model).layers[0].path == "integer"
    summary = use_reference(model)
    assert summary.layers[0].path == "reference" and summary.layers[0].reason == "reference mode"
    assert linear.float_weight_bytes == 0 and linear.kernel_bytes == 0
    with pytest.raises(ValueError, match="execution mode 'fastest' is unknown: use one of auto, integer, reference"):
        use_execution(model, "fastest")


def test_layers_without_a_kernel_keep_the_reference_path_in_auto_with_the_reason():
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 4), torch.randn(2, 8)
    weight_only = quantized_like(layer, x, PRESETS["w8a16"])
    decision = weight_only.set_execution("auto", backend="onednn")  # oneDNN has no weight-only kernel
    assert decision.path == "reference" and "weight-only layer" in decision.reason
    with torch.no_grad():
        assert torch.equal(weight_only(x), weight_only.reference_forward(x))
    assert weight_only.float_weight_bytes == 0 and not MEASURED_PATHS


@needs_kernels
def test_auto_layers_save_the_same_tensors_and_copy():
    layer, x = _tiny_linear()
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    layer.set_execution("auto")
    with torch.no_grad():
        y = layer(x)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    copied = copy.deepcopy(layer)  # copies rebuild their path at their first call
    assert copied.float_weight_bytes == 0
    with torch.no_grad():
        assert torch.equal(copied(x), y)


def test_fused_input_fake_quantization_is_bit_identical_to_the_five_ops():
    """The C++ one-pass fake-quantization of the float path against the torch ops it replaces, on values that
    hit every corner: exact .5 ties (round half to even), -0.0 (the "+ 0" makes it +0.0), both clamp bounds,
    NaN (kept) and +-inf (clamped), at 8 and 4 bits, asymmetric ranges; sizes around the parallel grain."""
    from quantdiff.nn.kernels.packed import packed_support
    from quantdiff.nn.quantized import fused_fake_quantize

    fused = fused_fake_quantize()
    if fused is None:  # as the packed-kernel tests: under CI=true a failed build is a failure, not a skip
        assert not IN_CI, f"the C++ extension did not build (scripts/setup.sh builds it): {packed_support().reason}"
        pytest.skip(f"the C++ extension is not built here: {packed_support().reason}")
    torch.manual_seed(0)
    scale = 0.0371
    corners = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -0.0, 0.0, -0.3, 1e9, -1e9]) * scale
    special = torch.tensor([float("nan"), float("inf"), float("-inf")])
    for numel in (7, 4099, (1 << 16) + 33):
        x = torch.cat([corners, special, torch.randn(numel) * 6 * scale])  # about +-20 steps: clamps at 4 bits
        for low, high in ((-128 - 3, 127 - 3), (-8 + 2, 7 + 2), (0, 255)):
            expected = (x / scale).round_().add_(0.0).clamp_(low, high).mul_(scale)
            got = fused(x, scale, low, high)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (numel, low, high)
    views = torch.randn(4, 6, 5).transpose(0, 2)  # non-contiguous input: same values, contiguous output
    assert torch.equal(fused(views, scale, -128, 127), (views / scale).round().add(0.0).clamp(-128, 127) * scale)
