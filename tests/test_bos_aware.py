"""BOS-aware text keys / values (MixDQ): the first-token check as pure math, then on tiny real pipelines: the
first token's key / value bit-identical to the float model's (reference and integer paths), calibration
without it, save -> load -> generate bit-identical, and refusals for encoders whose first token varies."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quantdiff.algorithms.bos_aware import BOSAwareKV, first_token_check, text_kv_layers
from quantdiff.calibration import capture_calibration
from quantdiff.errors import CalibrationError, RecipeError
from quantdiff.nn import QuantizedLayer, use_attention_dtype, use_integer_kernels, use_reference
from quantdiff.nn.attention import BF16AttentionProcessor, BOSAwareAttentionProcessor
from quantdiff.pipelines.architectures import SD3
from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.plan import resolve_plan
from quantdiff.primitives import compute_qparams
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe, TensorSpec
from quantdiff.serialization import load_quantized_pipeline, save_quantized

W8_INT = PRESETS["w8a8-int"].weights  # pair-safe: the int8 kernel computes it exactly on every x86 CPU
A8_MINMAX = TensorSpec(8, False, "tensor", observer="minmax")
RECIPE = Recipe("w8a8-bos", W8_INT, A8_MINMAX, algorithms=(BOSAwareKV(),))
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.one_torch_thread


# ----------------------------------------------------------------------------------------------- pure math
def test_first_token_check_measures_spread_prompts_and_zero_sequences():
    torch.manual_seed(0)
    states = torch.randn(3, 2, 5, 8)  # 3 batches of 2 sequences, 5 tokens, 8 features
    states[:, :, 0] = torch.linspace(-2, 4, 8)  # one fixed first token
    states[1, 1] = 0  # an empty prompt encoded as zeros
    check = first_token_check(states)
    assert (check.sequences, check.zero_sequences, check.differing) == (6, 1, 4)
    assert check.spread == 0.0 and check.bos_absmax == 4.0 and check.problem(1e-3, "x") is None
    states[2, 0, 0, 3] += 0.5  # one sequence starts differently: 0.5 / 4 = 0.125 of the BOS's magnitude
    check = first_token_check(states)
    assert check.spread == pytest.approx(0.125) and check.worst == 4
    assert "varies across prompts: max |difference| 0.125" in check.problem(1e-3, "x")
    one_prompt = first_token_check(states[:1, :1].expand(3, 2, 5, 8))
    assert one_prompt.differing == 0 and "holds one text sequence only" in one_prompt.problem(1e-3, "x")
    assert "no nonzero text sequence" in first_token_check([torch.zeros(2, 3, 4)]).problem(1e-3, "x")


# ------------------------------------------------------------------------------------ on tiny pipelines
PROMPTS = ["a red fox in the snow", "a watercolor lighthouse on a cliff", "a bowl of ramen, overhead photo"]
CAPTURE = dict(num_inference_steps=2, num_timesteps=1, seed=0, progress=False)


def _calibrate(pipe, folder, prompts=PROMPTS, **options):
    return capture_calibration(pipe, prompts, model_path=folder, **{**CAPTURE, **options})


@pytest.fixture(scope="module")
def quantized_sd15(tiny_folders):
    pipe = load_pipeline(tiny_folders["sd15"])
    calibration = _calibrate(pipe, tiny_folders["sd15"], num_inference_steps=4, num_timesteps=2)
    quantize_denoiser(denoiser_of(pipe)[1], RECIPE, calibration, progress=False)
    return pipe, calibration


class _CaptureAttention(TorchFunctionMode):
    """Records the key and value of every scaled-dot-product attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.keys, self.values = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.keys.append(args[1].detach().clone())  # (B, heads, T, d)
            self.values.append(args[2].detach().clone())
        return func(*args, **(kwargs or {}))


def _heads_to_rows(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, heads, T, d) -> (B, T, heads * d)


@pytest.mark.parametrize("execution", ["reference", "integer"])
def test_first_token_key_value_is_bit_identical_to_float(execution, quantized_sd15, tiny_folders):
    pipe, calibration = quantized_sd15
    unet = denoiser_of(pipe)[1]
    float_unet = denoiser_of(load_pipeline(tiny_folders["sd15"]))[1]
    attn, float_attn = unet.get_submodule(ATTN), float_unet.get_submodule(ATTN)
    assert isinstance(attn.processor, BOSAwareAttentionProcessor)
    encoder = calibration.records[0].inputs["encoder_hidden_states"]  # (2, T, C)
    hidden = torch.randn(encoder.shape[0], 16, float_attn.to_q.in_features)
    if execution == "integer":
        summary = use_integer_kernels(unet, attention="float32")
        assert {f"{ATTN}.to_k", f"{ATTN}.to_v"} <= {layer.name for layer in summary.integer}
    try:
        with torch.no_grad(), _CaptureAttention() as seen:
            attn(hidden, encoder_hidden_states=encoder)
            float_key, float_value = float_attn.to_k(encoder), float_attn.to_v(encoder)  # (B, T, C)
            quantized_rest = attn.to_k(encoder[:, 1:]), attn.to_v(encoder[:, 1:])
    finally:
        use_reference(unet)
    key, value = _heads_to_rows(seen.keys[0]), _heads_to_rows(seen.values[0])
    assert torch.equal(key[:, 0], float_key[:, 0]) and torch.equal(value[:, 0], float_value[:, 0])
    # the other tokens are the quantized projection's (on whichever path), not the float one's
    assert torch.equal(key[:, 1:], quantized_rest[0]) and torch.equal(value[:, 1:], quantized_rest[1])
    assert not torch.equal(key[:, 1:], float_key[:, 1:])


def test_projections_are_calibrated_without_the_first_token(quantized_sd15):
    pipe, calibration = quantized_sd15
    layer = denoiser_of(pipe)[1].get_submodule(f"{ATTN}.to_k")
    assert isinstance(layer, QuantizedLayer) and set(layer.extras) == {"bos_kv"}
    states = torch.stack([r.inputs["encoder_hidden_states"] for r in calibration.records])  # (N, B, T, C)
    rest, everything = states[:, :, 1:], states
    expected = compute_qparams(rest.min(), rest.max(), 8, False)
    assert torch.equal(layer.input_scale, expected[0]) and torch.equal(layer.input_zero_point, expected[1].int())
    with_bos = compute_qparams(everything.min(), everything.max(), 8, False)
    if not torch.equal(with_bos[0], expected[0]):  # the tiny CLIP's BOS may or may not widen the range
        assert not torch.equal(layer.input_scale, with_bos[0])
    assert torch.equal(layer.bos_input, states[0, 0, 0])


def _generate(pipe, prompt="a red fox in the snow"):
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=3, generator=generator, output_type="np").images


def test_save_load_generate_is_bit_identical_on_both_paths(quantized_sd15, tiny_folders, tmp_path):
    pipe, _ = quantized_sd15
    folder = save_quantized(pipe, tmp_path / "q", base_path=tiny_folders["sd15"])
    loaded = load_quantized_pipeline(folder)
    loaded_unet = denoiser_of(loaded)[1]
    assert isinstance(loaded_unet.get_submodule(ATTN).processor, BOSAwareAttentionProcessor)
    import json

    assert json.loads((folder / "quantdiff.json").read_text())["format_version"] == 3
    assert np.array_equal(_generate(pipe), _generate(loaded))
    use_integer_kernels(denoiser_of(pipe)[1], attention="float32")
    use_integer_kernels(loaded_unet, attention="float32")
    try:
        assert np.array_equal(_generate(pipe), _generate(loaded))
    finally:
        use_reference(denoiser_of(pipe)[1])


def test_zero_sequences_take_the_quantized_projection_and_other_tokens_warn(quantized_sd15):
    pipe, calibration = quantized_sd15
    attn = denoiser_of(pipe)[1].get_submodule(ATTN)
    encoder = calibration.records[0].inputs["encoder_hidden_states"].clone()
    encoder[1] = 0  # SDXL encodes an empty negative prompt as zeros
    hidden = torch.randn(2, 16, 32)
    with torch.no_grad(), _CaptureAttention() as seen, warnings.catch_warnings():
        warnings.simplefilter("error")  # zeros are expected: no warning
        attn(hidden, encoder_hidden_states=encoder)
        zero_row = attn.to_k(encoder[1:, :1])[:, 0]
    key = _heads_to_rows(seen.keys[0])
    assert torch.equal(key[0, 0], attn.to_k.bos_output) and torch.equal(key[1, 0], zero_row[0])
    encoder[1] = encoder[0] + 0.5  # another encoder's first token
    with torch.no_grad(), pytest.warns(UserWarning, match="starts with a token other than the BOS"):
        attn(hidden, encoder_hidden_states=encoder)


def test_bf16_attention_wraps_around_and_keeps_it(quantized_sd15):
    pipe, _ = quantized_sd15
    unet = denoiser_of(pipe)[1]
    attn = unet.get_submodule(ATTN)
    use_attention_dtype(unet, "bfloat16")
    assert isinstance(attn.processor, BF16AttentionProcessor)
    assert isinstance(attn.processor.processor, BOSAwareAttentionProcessor)
    use_attention_dtype(unet, "float32")
    assert isinstance(attn.processor, BOSAwareAttentionProcessor)


# ------------------------------------------------------------------------------------------- refusals
def _bert_sd15(folder):
    """The tiny SD 1.5 pipeline with a bidirectional text encoder (BERT): its first token sees the whole prompt."""
    from transformers import BertConfig, BertModel

    pipe = load_pipeline(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(pipe.tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=pipe.tokenizer.model_max_length,
    )
    pipe.text_encoder = BertModel(config).eval()
    return pipe


def test_refused_for_a_bidirectional_encoder_with_the_measured_spread(tiny_folders):
    pipe = _bert_sd15(tiny_folders["sd15"])
    calibration = _calibrate(pipe, tiny_folders["sd15"])
    with pytest.raises(CalibrationError, match=r"first text token varies across prompts: max \|difference\| \d"):
        quantize_denoiser(denoiser_of(pipe)[1], RECIPE, calibration, progress=False)


def test_refused_for_pixart_t5_and_sd3_joint_attention(tiny_folders):
    pixart = load_pipeline(tiny_folders["pixart"])
    calibration = _calibrate(pixart, tiny_folders["pixart"], prompts=PROMPTS[:2])
    with pytest.raises(CalibrationError, match="varies across prompts"):
        quantize_denoiser(denoiser_of(pixart)[1], RECIPE, calibration, progress=False)
    sd3 = denoiser_of(load_pipeline(tiny_folders["sd3"]))[1]
    plan = resolve_plan(sd3, RECIPE, SD3)
    with pytest.raises(RecipeError, match="joint attention"):
        text_kv_layers(plan, SD3)


def test_refused_when_the_calibration_holds_one_prompt(tiny_folders):
    pipe = load_pipeline(tiny_folders["sd15"])
    calibration = _calibrate(pipe, tiny_folders["sd15"], prompts=PROMPTS[:1], guidance_scale=1.0)
    with pytest.raises(CalibrationError, match="one text sequence only"):
        quantize_denoiser(denoiser_of(pipe)[1], RECIPE, calibration, progress=False)
