"""Behaviours the README promises that no other test checked: calibration replay on every denoiser family and in
noise mode, the "base folder changed" warning, the server's size limit, and ``eval --execution integer``."""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import CALIBRATION_PROMPTS, CAPTURE
from kernel_check import KERNELS_EXPECTED

from quantdiff.calibration import capture_calibration
from quantdiff.calibration.dataset import denoiser_output
from quantdiff.cli import main
from quantdiff.pipelines.loading import denoiser_of, load_pipeline


def _recording(denoiser):
    """Every call's arguments by name (positional ones bound to their names) and output, as the pipeline made it."""
    calls = []
    signature = inspect.signature(denoiser.forward)

    def pre(module, args, kwargs):
        calls.append([copy.deepcopy(dict(signature.bind(*args, **kwargs).arguments)), None])

    def post(module, args, kwargs, output):
        calls[-1][1] = denoiser_output(output).clone()

    return calls, [
        denoiser.register_forward_pre_hook(pre, with_kwargs=True),
        denoiser.register_forward_hook(post, with_kwargs=True),
    ]


@pytest.mark.parametrize("arch", ["sd3", "pixart"])
def test_replay_reproduces_the_pipeline_calls_of_a_dit(tiny_folders, arch):
    """Trajectory mode on the transformers: replaying the records gives the outputs the pipeline got, bit
    for bit (SD3's pooled projections, PixArt's resolution / aspect-ratio conditioning included)."""
    pipe = load_pipeline(tiny_folders[arch])
    _, transformer = denoiser_of(pipe)
    calls, handles = _recording(transformer)
    try:
        recorded = capture_calibration(pipe, CALIBRATION_PROMPTS[:2], **CAPTURE)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 * 6 and len(recorded) == 2 * 3
    kept = [prompt * 6 + step for prompt in range(2) for step in (0, 2, 5)]
    for record, index in zip(recorded, kept, strict=True):
        kwargs, _ = calls[index]
        assert set(record.inputs) <= set(kwargs)
        for key, value in record.inputs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, kwargs[key]), key
    replayed = list(recorded.replay(transformer, progress=False))
    assert len(replayed) == len(kept)
    for output, index in zip(replayed, kept, strict=True):
        assert torch.equal(output, calls[index][1])


@pytest.mark.parametrize("arch", ["sd15", "sd3"])
def test_noise_mode_replays_the_pipeline_conditioning_on_drawn_latents(tiny_folders, arch):
    """Noise mode: each record is the pipeline's first call with its latents and timestep replaced; replaying it
    equals calling the denoiser with the pipeline's own kwargs and those two changed."""
    pipe = load_pipeline(tiny_folders[arch])
    _, denoiser = denoiser_of(pipe)
    calls, handles = _recording(denoiser)
    try:
        noise = capture_calibration(pipe, CALIBRATION_PROMPTS[:2], mode="noise", **CAPTURE)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 and len(noise) == 2 * 3  # the pipeline stops at its first call, once per prompt
    sample_key = "sample" if arch == "sd15" else "hidden_states"
    replayed = list(noise.replay(denoiser, progress=False))
    schedule = pipe.scheduler.timesteps  # the sampler's 6 timesteps, set by the pipeline before its first call
    assert [r.step_index for r in noise] == [0, 2, 5] * 2
    for record, output in zip(noise, replayed, strict=True):
        assert record.timestep == pytest.approx(float(schedule[record.step_index]), rel=1e-6)
        timestep = record.inputs["timestep"]  # () on the UNet, (2,) per guidance branch on SD3
        assert torch.equal(timestep, torch.full_like(timestep, schedule[record.step_index].item())), timestep
        kwargs, _ = calls[record.prompt_index]
        changed = {sample_key: record.inputs[sample_key], "timestep": record.inputs["timestep"]}
        assert not torch.equal(changed[sample_key], kwargs[sample_key])
        expected_kwargs = {**kwargs, **changed}
        with torch.no_grad():
            expected = denoiser_output(denoiser(**expected_kwargs))
        assert torch.equal(output, expected)
        for key, value in record.inputs.items():
            if key not in changed and isinstance(value, torch.Tensor):
                assert torch.equal(value, kwargs[key]), key


def test_loading_warns_when_the_base_folder_changed(tiny_folders, tmp_path):
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.serialization import load_quantized_pipeline, save_quantized

    base = shutil.copytree(tiny_folders["sd15"], tmp_path / "base")
    pipe = load_pipeline(base)
    quantize_denoiser(pipe.unet, "w8a16", None, progress=False)
    quantized = save_quantized(pipe, tmp_path / "q", base_path=base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged: no warning
        load_quantized_pipeline(quantized)
    scheduler = base / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config["steps_offset"] = int(config.get("steps_offset", 0)) + 1
    scheduler.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"base pipeline folder '.*base' changed since quantization"):
        load_quantized_pipeline(quantized)


def test_server_refuses_sizes_over_max_size(tiny_folders, tmp_path):
    from quantdiff.serving.service import GenerationRequest, GenerationService, Limits, RequestError

    service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log.jsonl", limits=Limits(max_size=64))
    assert service.resolve(GenerationRequest("x", width=64, height=64))["width"] == 64
    assert service.resolve(GenerationRequest("x", width=8, height=56))["height"] == 56
    for field in ("width", "height"):
        with pytest.raises(RequestError, match=f"{field} must be a multiple of 8 between 8 and 64, got 72"):
            service.generate(GenerationRequest("x", **{field: 72}))
    assert [entry["status"] for entry in service.history()] == ["error", "error"]
    default = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log2.jsonl")
    assert default.limits.max_size == 2048
    assert default.resolve(GenerationRequest("x", width=2048))["width"] == 2048
    with pytest.raises(RequestError, match="between 8 and 2048, got 2056"):
        default.resolve(GenerationRequest("x", width=2056))


def test_eval_execution_integer_scores_the_kernel_path(tiny_folders, tmp_path):
    """`eval --execution integer` runs the quantized folder on the int8 kernels and says so; its images are
    those `generate` makes on the same path (and not the reference path's), the fp row unchanged."""
    from PIL import Image

    model, quantized = tiny_folders["sd15"], tmp_path / "q"
    calibration = ["--num-prompts", "1", "--steps", "2", "--num-timesteps", "1", "--mode", "noise"]
    assert main(["--quiet", "quantize", model, "--recipe", "w8a8-int", *calibration, "--out", str(quantized)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    reports = {}
    for execution in ("integer", "reference"):
        out = tmp_path / f"eval-{execution}"
        argv = ["--quiet", "eval", model, str(quantized), "--out", str(out), "--num-images", "1", "--prompts"]
        assert main([*argv, str(prompts), "--steps", "2", "--execution", execution]) == 0
        reports[execution] = json.loads((out / "report.json").read_text())
    for execution, report in reports.items():
        fp, q = report["models"]
        assert fp["details"]["execution"] is None
        shown = q["details"]["execution"]
        if execution == "reference":
            assert shown.startswith("reference (fake-quant) execution"), shown
        elif KERNELS_EXPECTED:
            assert shown.startswith("integer execution: 177 of 177 quantized layers on int8 kernels"), shown
    assert reports["integer"]["models"][0]["metrics"] == reports["reference"]["models"][0]["metrics"]
    # the integer row's numbers are those of the images generate makes on the kernel path
    for execution in ("integer", "reference"):
        png = tmp_path / f"{execution}.png"
        args = ["--quiet", "generate", str(quantized), "--prompt", "a red fox", "--steps", "2", "--seed", "0"]
        assert main([*args, "--out", str(png), "--execution", execution]) == 0
    fp_png = tmp_path / "fp.png"
    assert (
        main(
            ["--quiet", "generate", model, "--prompt", "a red fox", "--steps", "2", "--seed", "0", "--out", str(fp_png)]
        )
        == 0
    )
    fp_image = np.asarray(Image.open(fp_png), dtype=np.float64)
    for execution in ("integer", "reference"):
        image = np.asarray(Image.open(tmp_path / f"{execution}.png"), dtype=np.float64)
        psnr = 10 * np.log10(255.0**2 / np.mean((image - fp_image) ** 2))
        reported = reports[execution]["models"][1]["metrics"]["psnr_vs_fp"]
        assert reported == pytest.approx(psnr, abs=1e-6), execution
    if KERNELS_EXPECTED:
        integer, reference = (reports[e]["models"][1]["metrics"]["psnr_vs_fp"] for e in ("integer", "reference"))
        assert integer != reference  # the kernel path was scored, not the reference path twice
