"""The tiny offline pipelines are real diffusers pipelines: they save, reload and generate reproducibly."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode

import quantdiff
from quantdiff.testing.tiny import TINY_ARCHITECTURES, build_tiny_pipeline, save_tiny_pipeline

# Image side each pipeline generates when called without height/width.
DEFAULT_SIZE = {"sd15": 64, "sdxl": 64, "sd3": 64, "pixart": 256}
PROMPT = "an astronaut riding a horse on the moon"


def go_offline(patch: pytest.MonkeyPatch):
    """Make any attempt to reach the Hub fail. huggingface_hub reads the variable once, at import."""
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    go_offline(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from intra-op threads, and on a machine with two busy cores,
    OpenMP threads waiting for each other make every call up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Saved:
    folder: Path
    built: DiffusionPipeline
    loaded: DiffusionPipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Saved]:
    """arch -> its saved folder, the built pipeline and the one reloaded from the folder; made once."""
    result = {}
    with pytest.MonkeyPatch.context() as patch:
        go_offline(patch)
        for arch in TINY_ARCHITECTURES:
            folder = save_tiny_pipeline(arch, tmp_path_factory.mktemp(arch))
            loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
            result[arch] = Saved(folder, build_tiny_pipeline(arch), loaded)
    return result


def denoiser(pipeline):
    return pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer


def generate(pipeline, steps=2, **kwargs):
    """Images from a seeded call at the pipeline's defaults (size, guidance scale) unless overridden."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(PROMPT, num_inference_steps=steps, generator=generator, **kwargs).images


def differing_tensors(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [name for name in sa if not torch.equal(sa[name], sb[name])]


def assert_same_files(a: Path, b: Path):
    comparison = filecmp.dircmp(a, b)
    assert (comparison.left_only, comparison.right_only) == ([], [])
    _, mismatch, errors = filecmp.cmpfiles(a, b, comparison.common_files, shallow=False)
    assert not mismatch and not errors, f"{a}: {mismatch + errors} differ"
    for sub in comparison.common_dirs:
        assert_same_files(a / sub, b / sub)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_reload_gives_same_pipeline_class_and_bit_identical_denoiser(saved, arch):
    built, loaded = saved[arch].built, saved[arch].loaded
    assert type(loaded) is type(built)
    assert type(denoiser(loaded)) is type(denoiser(built))
    assert not differing_tensors(denoiser(built), denoiser(loaded))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_generation_is_finite_default_sized_and_same_after_reload(saved, arch):
    built, loaded = saved[arch].built, saved[arch].loaded
    size = DEFAULT_SIZE[arch]
    # The size the pipeline falls back to without height/width (PixArt then bins it, to the same size).
    assert denoiser(built).config.sample_size * built.vae_scale_factor == size

    # Default guidance scales are all > 1, so these calls run classifier-free guidance.
    image = generate(built, output_type="np")
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0  # not a blank image
    reloaded_image = generate(loaded, output_type="np")
    assert np.abs(image - reloaded_image).max() < 1e-5

    pil = generate(loaded, output_type="pil")[0]
    assert pil.size == (size, size)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_four_step_cfg_call_fits_a_compute_budget(saved, arch):
    # Counted in FLOPs, not seconds, to mean the same on a busy machine. 5 GFLOP (matmuls and
    # convolutions) is about 0.1-0.2 s on two CPU cores; the pipelines use 1-3.5.
    with FlopCounterMode(display=False) as counter:
        image = generate(saved[arch].loaded, steps=4, guidance_scale=5.0, output_type="np")
    assert np.isfinite(image).all()
    assert counter.get_total_flops() < 5e9


def test_same_seed_gives_byte_identical_folders_in_another_process(saved, tmp_path):
    # Catches anything that depends on per-process state, such as string hashing or set order.
    script = (
        "import sys\n"
        "from quantdiff.testing.tiny import TINY_ARCHITECTURES, save_tiny_pipeline\n"
        "for arch in TINY_ARCHITECTURES:\n"
        "    save_tiny_pipeline(arch, f'{sys.argv[1]}/{arch}')\n"
    )
    package_root = str(Path(quantdiff.__file__).parents[1])
    python_path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONHASHSEED": "1", "PYTHONPATH": python_path}
    command = [sys.executable, "-c", script, str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for arch in TINY_ARCHITECTURES:
        assert_same_files(saved[arch].folder, tmp_path / arch)


def test_sd3_without_t5_builds_saves_loads_and_generates(saved, tmp_path):
    built = build_tiny_pipeline("sd3", with_t5=False)
    assert built.text_encoder_3 is None and built.tokenizer_3 is None
    # Dropping T5 leaves the other components' random weights as they are.
    assert not differing_tensors(built.transformer, saved["sd3"].built.transformer)

    folder = save_tiny_pipeline("sd3", tmp_path, with_t5=False)
    # model_index.json records the absent T5 as [null, null], but SD3 does not list it as optional:
    # loading it needs the absence spelled out, as diffusers documents for dropping T5.
    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    image = generate(loaded, output_type="np")
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert np.abs(image - generate(built, output_type="np")).max() < 1e-5


def test_clip_tokenizer_round_trips_and_pads_to_77(saved):
    built, loaded = saved["sd15"].built, saved["sd15"].loaded
    tokenizer = built.tokenizer
    text = "An  Astronaut riding a ZEBRA\non the moon"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "an astronaut riding a zebra on the moon"
    tokens = tokenizer.convert_ids_to_tokens(ids[1:-1])
    assert "astronaut</w>" in tokens  # a corpus word is one token ...
    assert "zebra</w>" not in tokens  # ... an unseen one is split, but still decodes

    # How the pipelines call it.
    assert tokenizer.model_max_length == 77
    padded = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[: len(ids)] == ids
    assert set(padded[len(ids) :]) == {tokenizer.pad_token_id}
    assert max(padded) < built.text_encoder.config.vocab_size

    # model_max_length survives save_pretrained, or the pipelines would pad to a huge length.
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.tokenizer(text).input_ids == ids


def test_t5_tokenizer_round_trips_with_t5_special_ids(saved):
    built, loaded = saved["pixart"].built, saved["pixart"].loaded
    tokenizer = built.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    text = "A Photo of a zebra, riding 2 horses!"
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) <= built.text_encoder.config.vocab_size
    assert loaded.tokenizer(text).input_ids == ids


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_weights_are_deterministic_from_seed_and_fp32(saved, arch):
    reference = saved[arch].built
    rng_state = torch.random.get_rng_state()
    again = build_tiny_pipeline(arch, seed=0)
    other = build_tiny_pipeline(arch, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "building must not consume the caller's RNG"

    modules = {name: c for name, c in reference.components.items() if isinstance(c, torch.nn.Module)}
    for name, module in modules.items():
        assert not differing_tensors(module, getattr(again, name)), name
        assert differing_tensors(module, getattr(other, name)), name
        assert all(p.dtype == torch.float32 for p in module.parameters()), name


def test_unknown_architecture_is_a_value_error_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="sd15, sdxl, sd3, pixart"):
        save_tiny_pipeline("flux", tmp_path / "out")
    assert not (tmp_path / "out").exists()
