"""`quantdiff serve`: scheduler safety, numerics guard, PNG metadata, HTTP API under load, and the page
itself in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_check import KERNELS_EXPECTED
from PIL import Image

from quantdiff.generate import a1111_parameters, parse_a1111_parameters, save_png
from quantdiff.nn import QuantizedLayer, execution_summary
from quantdiff.nn.kernels import packed_support
from quantdiff.serving.schedulers import SchedulerError, make_scheduler, scheduler_names
from quantdiff.serving.service import (
    GenerationRequest,
    GenerationService,
    Limits,
    NonFiniteError,
    RequestError,
)

PAGE_TIMEOUT_MS = 120_000


def test_flow_matching_model_refuses_noise_schedulers(tiny_folders, tmp_path):
    service = GenerationService(tiny_folders["sd3"], log_path=tmp_path / "log.jsonl")
    original = service.main.original_scheduler
    assert scheduler_names(original) == ["default", "flow-euler", "flow-heun"]
    for name in ("euler-ancestral", "dpmpp-2m", "ddim"):
        with pytest.raises(SchedulerError, match="trained with flow matching .* broken or black images"):
            make_scheduler(original, name)
    with pytest.raises(SchedulerError, match="cannot be used"):
        service.generate(GenerationRequest("a cat", steps=2, scheduler="dpmpp-2m-karras"))
    shifted = make_scheduler(original, "flow-euler", shift=1.5)
    assert shifted.config.shift == 1.5 and original.config.shift != 1.5
    result = service.generate(GenerationRequest("a cat", steps=2, scheduler="flow-heun", seed=1))
    assert np.isfinite(np.asarray(result.images[0])).all()
    entries = service.history()
    assert [e["status"] for e in entries] == ["ok", "error"]


def test_sd3_without_t5_saves_its_memory(tiny_folders, tmp_path):
    service = GenerationService(tiny_folders["sd3"], log_path=tmp_path / "log.jsonl", no_t5=True)
    assert service.main.pipe.text_encoder_3 is None and service.main.pipe.tokenizer_3 is None
    result = service.generate(GenerationRequest("a cat", steps=2, seed=0))
    assert np.isfinite(np.asarray(result.images[0])).all()
    with pytest.raises(RequestError, match="needs --device cuda"):
        GenerationService(tiny_folders["sd3"], log_path=tmp_path / "log.jsonl", cpu_offload=True)


def test_noise_model_offers_noise_schedulers(tiny_folders, tmp_path):
    service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log.jsonl")
    names = scheduler_names(service.main.original_scheduler)
    assert names[:1] == ["default"] and {"ddim", "euler-ancestral", "dpmpp-2m-karras", "unipc"} <= set(names)
    assert "flow-euler" not in names and "lcm" not in names  # LCM only for LCM-distilled models
    with pytest.raises(SchedulerError, match="is for flow-matching"):
        make_scheduler(service.main.original_scheduler, "flow-euler")
    karras = service.generate(GenerationRequest("a cat", steps=3, scheduler="dpmpp-2m-karras", seed=2))
    ddim = service.generate(GenerationRequest("a cat", steps=3, scheduler="ddim", eta=0.5, seed=2))
    assert karras.parameters["scheduler"] == "dpmpp-2m-karras" and ddim.parameters["eta"] == 0.5
    assert np.asarray(karras.images[0]).tobytes() != np.asarray(ddim.images[0]).tobytes()


def test_bounded_inputs(tiny_folders, tmp_path):
    service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log.jsonl", limits=Limits(max_steps=10))
    bad = {
        "the prompt is empty": GenerationRequest("   "),
        "steps must be between 1 and 10": GenerationRequest("x", steps=11),
        "width must be a multiple of 8": GenerationRequest("x", width=60),
        "batch_size must be between 1 and 4": GenerationRequest("x", batch_size=5),
        "prompts are limited to 1000 characters": GenerationRequest("x" * 1001),
        "'eta' applies to the DDIM scheduler only": GenerationRequest("x", eta=0.3, scheduler="euler"),
        "'shift' applies to flow-matching models only": GenerationRequest("x", shift=3.0),
    }
    for message, request in bad.items():
        with pytest.raises(RequestError, match=message):
            service.generate(request)
    with pytest.raises(RequestError, match=r"unknown field\(s\) \['cfg'\]"):
        GenerationRequest.from_json({"prompt": "x", "cfg": 3})
    with pytest.raises(RequestError, match="'steps' must be int"):
        GenerationRequest.from_json({"prompt": "x", "steps": "20"})
    assert len(service.history(100)) == len(bad)


def test_nan_latents_and_nan_images_give_a_clear_error(tiny_folders, tmp_path):
    service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log.jsonl")
    pipe = service.main.pipe
    with torch.no_grad():
        saved = pipe.unet.conv_out.weight.clone()
        pipe.unet.conv_out.weight[0, 0, 0, 0] = float("nan")
        with pytest.raises(NonFiniteError, match="NaN/inf latents at step 1 of 3"):
            service.generate(GenerationRequest("a cat", steps=3))
        pipe.unet.conv_out.weight.copy_(saved)
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
        with pytest.raises(NonFiniteError, match="decoded image contains NaN/inf .* upcast the VAE"):
            service.generate(GenerationRequest("a cat", steps=3))
    assert [e["error_type"] for e in service.history()] == ["NonFiniteError", "NonFiniteError"]


def test_compare_mode_runs_both_models_on_the_same_seed(tiny_folders, tmp_path):
    from quantdiff.cli import main

    quantized = tmp_path / "q"
    assert main(["--quiet", "quantize", tiny_folders["sd15"], "--recipe", "w8a16", "--out", str(quantized)]) == 0
    service = GenerationService(str(quantized), compare=tiny_folders["sd15"], log_path=tmp_path / "log.jsonl")
    first, second, similarity = service.compare(GenerationRequest("a cat", steps=3, seed=5))
    assert first.seed == second.seed == 5
    assert first.parameters["quantization"] == "W8A16 (w8a16)" and second.parameters["quantization"] is None
    # served in auto execution by default; weight-only layers take the packed backend's dequantize kernel or the
    # float path, whichever was faster at their first call, where it runs; elsewhere they keep the reference
    paths = {path for _, path, _ in service.slots[0].execution_layers()}
    if packed_support().dequantize:
        assert "of 177 quantized layers on int8 kernels" in service.slots[0].execution
        assert paths <= {"integer", "float"}, paths
    else:
        assert service.slots[0].execution.startswith(
            "auto execution: 0 of 177 quantized layers on int8 kernels, 177 on the reference path"
        )
        assert paths == {"reference"}
    assert service.slots[1].execution_layers() == []  # floating point
    assert service.slots[1].execution is None  # floating point
    assert 20 < similarity["psnr"] < float("inf") and 0.5 < similarity["ssim"] < 1.0
    # the figures are those of the two images shown, recomputed here: PSNR in float64 numpy, SSIM by the metric
    from quantdiff.evaluation.metrics import ssim

    (image_q,), (image_fp,) = first.images, second.images
    a, b = np.asarray(image_q, dtype=np.float64), np.asarray(image_fp, dtype=np.float64)  # (H, W, 3) in 0..255
    assert a.shape == b.shape == (64, 64, 3)
    assert similarity["psnr"] == pytest.approx(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)), rel=1e-12)
    assert similarity["ssim"] == pytest.approx(ssim(np.asarray(image_q), np.asarray(image_fp)), rel=1e-12)
    (entry,) = service.history()
    assert entry["kind"] == "compare" and entry["similarity"] == similarity
    # and those images are what each model makes on its own from the same request and seed
    alone_q = service.generate(GenerationRequest("a cat", steps=3, seed=5)).images[0]
    fp_service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log-fp.jsonl")
    alone_fp = fp_service.generate(GenerationRequest("a cat", steps=3, seed=5)).images[0]
    assert np.array_equal(np.asarray(alone_q), np.asarray(image_q))
    assert np.array_equal(np.asarray(alone_fp), np.asarray(image_fp))


def test_bundled_names_resolve_to_a_cached_folder(tmp_path, monkeypatch):
    from quantdiff.pipelines.bundled import resolve_model

    monkeypatch.setenv("QUANTDIFF_CACHE", str(tmp_path))
    folder = resolve_model("tiny-sd3")
    assert Path(folder) == tmp_path / "models" / "tiny-sd3" and (Path(folder) / "model_index.json").is_file()
    stamp = (Path(folder) / "model_index.json").stat().st_mtime_ns
    assert resolve_model("tiny-sd3") == folder and (Path(folder) / "model_index.json").stat().st_mtime_ns == stamp
    assert resolve_model("not-a-bundled-name") == "not-a-bundled-name"


def test_png_parameters_chunk_round_trips(tmp_path):
    parameters = {
        "prompt": "a cat, wearing: a hat",
        "negative_prompt": "blurry, dark",
        "steps": 20,
        "scheduler": "DDIMScheduler",
        "guidance": 7.5,
        "seed": 1234,
        "width": 64,
        "height": 48,
        "model": "/models/tiny-sd15",
        "quantization": "W8A8 (w8a8)",
    }
    save_png(Image.new("RGB", (64, 48)), tmp_path / "x.png", parameters)
    text = Image.open(tmp_path / "x.png").text["parameters"]
    assert text == a1111_parameters(parameters)
    parsed = parse_a1111_parameters(text)
    assert parsed == {
        "prompt": "a cat, wearing: a hat",
        "negative_prompt": "blurry, dark",
        "Steps": "20",
        "Sampler": "DDIMScheduler",
        "CFG scale": "7.5",
        "Seed": "1234",
        "Size": "64x48",
        "Model": "tiny-sd15",
        "Quantization": "W8A8 (w8a8)",
    }


# --------------------------------------------------------------------------------------------------
# A real server on loopback


class _Server:
    def __init__(self, service: GenerationService):
        import uvicorn

        from quantdiff.serving.app import build_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.service = service
        self.server = uvicorn.Server(
            uvicorn.Config(build_app(service), host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if _get(self.url + "/api/health")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, json.loads(response.read())


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_api_under_20_concurrent_requests(tiny_folders, tmp_path):
    service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log.jsonl", limits=Limits(queue_size=4))
    with _Server(service) as server:
        status, body = _post(server.url + "/api/generate", {"prompt": "a cat", "seed": 7, "steps": 2})
        assert status == 200 and body["seed"] == 7 and body["parameters"]["steps"] == 2
        image = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))
        assert image.size == (64, 64) and "Seed: 7" in image.text["parameters"]
        assert _post(server.url + "/api/generate", {"prompt": ""})[0] == 400
        assert _post(server.url + "/api/generate", {"prompt": "x", "scheduler": "flow-euler"})[0] == 400

        # Hold every generation open at its first denoiser call: one runs, queue_size - 1 wait for the model,
        # and every request beyond queue_size is refused at once.
        gate, entered, active, most = threading.Event(), [], [0], [0]
        counter = threading.Lock()

        def hold(module, args, kwargs):
            with counter:
                active[0] += 1
                most[0] = max(most[0], active[0])
                entered.append(threading.get_ident())
            assert gate.wait(timeout=300), "the test never opened the gate"

        def leave(module, args, kwargs, output):
            with counter:
                active[0] -= 1

        unet = service.main.pipe.unet
        handles = [
            unet.register_forward_pre_hook(hold, with_kwargs=True),
            unet.register_forward_hook(leave, with_kwargs=True),
        ]
        answers = []
        try:
            with ThreadPoolExecutor(20) as pool:
                futures = [
                    pool.submit(_post, server.url + "/api/generate", {"prompt": f"cat {i}", "steps": 3})
                    for i in range(20)
                ]
                deadline = time.time() + 120
                while sum(f.done() for f in futures) < 16 and time.time() < deadline:
                    time.sleep(0.05)
                refused_while_held = sum(f.done() for f in futures)
                time.sleep(0.5)  # time for a second generation to start, if the lock let one
                held = (len(entered), active[0], sum(f.done() for f in futures))
                gate.set()
                answers = [f.result() for f in futures]
        finally:
            gate.set()
            for handle in handles:
                handle.remove()
        assert refused_while_held == 16 and held == (1, 1, 16), (refused_while_held, held)
        codes = [code for code, _ in answers]
        assert sorted(codes) == [200] * 4 + [503] * 16, codes  # exactly queue_size served, the rest refused
        assert most[0] == 1  # one generation (one denoiser call) at a time, all through
        assert len(set(entered)) == 4 and len(entered) == 4 * 3 * 1  # 4 generations x 3 steps (CFG batched)
        for code, body in answers:
            assert (
                ("image_png_base64" in body) if code == 200 else ("queue is full (4 requests waiting)" in body["error"])
            )
        assert _get(server.url + "/api/health")[0] == 200  # still up
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 20  # every request is in the log, rejected ones included
    entries = [json.loads(line) for line in lines[3:]]
    assert sorted(e["status"] for e in entries) == ["error"] * 16 + ["ok"] * 4
    assert [e["error_type"] for e in entries if e["status"] == "error"] == ["QueueFullError"] * 16


def test_http_500_when_the_guard_catches_nan_or_inf_on_the_integer_path(tiny_folders, tmp_path):
    """A quantized model served on the int8 kernels: NaN / inf reaching the latents answer 500 with the
    guard's message, logged as NonFiniteError, and the server keeps serving."""
    from quantdiff.cli import main

    quantized = tmp_path / "q"
    calibration = ["--num-prompts", "1", "--steps", "2", "--num-timesteps", "1", "--mode", "noise"]
    assert (
        main(
            ["--quiet", "quantize", tiny_folders["sd15"], "--recipe", "w8a8-int", *calibration, "--out", str(quantized)]
        )
        == 0
    )
    service = GenerationService(str(quantized), log_path=tmp_path / "log.jsonl", execution="integer")  # forced
    unet = service.main.pipe.unet
    with _Server(service) as server:
        status, body = _post(server.url + "/api/generate", {"prompt": "a cat", "seed": 1, "steps": 2})
        assert status == 200, body
        summary = execution_summary(unet)
        if KERNELS_EXPECTED:  # pair-safe weights: every quantized layer runs on the kernel on any x86 CPU
            assert summary.mode == "integer" and len(summary.integer) == len(summary.layers) > 0, summary.format()
        # NaN from a floating-point layer ahead of the int8 kernels (the kernel alone would make it finite),
        # and inf out of a quantized layer running on its kernel (the norms after it turn it into NaN); last,
        # inf that reaches the latents as inf: the last layer's output, no guidance and Euler (no inf - inf),
        # which a NaN-only guard would let through to step 2
        first, quantized = unet.conv_in, unet.get_submodule("up_blocks.1.resnets.2.conv2")
        assert not isinstance(first, QuantizedLayer) and isinstance(quantized, QuantizedLayer)
        as_inf = {"guidance": 1.0, "scheduler": "euler"}
        cases = [(first, float("nan"), {}), (quantized, float("inf"), {}), (quantized, float("nan"), {})]
        for layer, bad, options in [*cases, (unet.conv_out, float("inf"), as_inf)]:
            saved = layer.bias.detach().clone()
            with torch.no_grad():
                layer.bias[0] = bad
            try:
                request = {"prompt": "a cat", "seed": 1, "steps": 2, **options}
                status, body = _post(server.url + "/api/generate", request)
            finally:
                with torch.no_grad():
                    layer.bias.copy_(saved)
            assert status == 500, (bad, status, body)
            assert body["error"].startswith("the denoiser produced NaN/inf latents at step 1 of 2: try float32")
        status, body = _post(server.url + "/api/generate", {"prompt": "a cat", "seed": 1, "steps": 2})
        assert status == 200, body
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e.get("error_type") for e in entries] == [None, *["NonFiniteError"] * 4, None]


def _chromium() -> str | None:
    return shutil.which("chromium")


_CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(_chromium() is None and os.environ.get("CI") != "true", reason="needs Debian's chromium")
def test_browser_generates_shows_history_and_survives_bad_input(tiny_folders, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert _chromium() is not None, "CI must install chromium (scripts/test.sh does)"
    service = GenerationService(tiny_folders["sd15"], log_path=tmp_path / "log.jsonl", outputs=tmp_path / "images")
    with _Server(service) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=_CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(server.url + "/", wait_until="networkidle")

        page.locator("#prompt textarea").fill("a lighthouse at dawn")
        page.locator("#generate").click()
        expect(page.locator("#info")).to_contain_text("seed", timeout=PAGE_TIMEOUT_MS)
        expect(page.locator("#images img").first).to_be_visible()
        info = page.locator("#info").inner_text()
        shown_seed = page.locator("#seed input").input_value()
        assert f"seed {shown_seed}" in info

        page.locator("#prompt textarea").fill("")
        page.locator("#generate").click()
        expect(page.locator("#error")).to_contain_text("the prompt is empty")

        page.locator("#prompt textarea").fill("a red fox in the snow")
        page.locator("#randomize input").uncheck()
        page.locator("#seed input").fill("42")
        page.locator("#generate").click()
        expect(page.locator("#info")).to_contain_text("seed 42")
        expect(page.locator("#error")).not_to_contain_text("Error")
        page.screenshot(path=os.environ.get("QUANTDIFF_SCREENSHOT", str(tmp_path / "serve.png")), full_page=True)

        page.get_by_role("tab", name="History").click()
        page.locator("#refresh-history").click()
        history = page.locator("#history")
        expect(history).to_contain_text("a red fox in the snow")
        expect(history).to_contain_text("a lighthouse at dawn")
        expect(history).to_contain_text("the prompt is empty")
        browser.close()
    statuses = [json.loads(line)["status"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert statuses == ["ok", "error", "ok"]
    assert len(list(Path(tmp_path / "images").glob("*.png"))) == 2


# --------------------------------------------------------------------------------------------------
# Examples and defaults from the model's own prompt set


def test_a_model_with_its_own_prompt_set_supplies_examples_and_defaults(tiny_folders, tmp_path):
    from quantdiff.evaluation.prompt_sets import read_evaluation_set
    from quantdiff.pipelines.bundled import resolve_model
    from quantdiff.pipelines.loading import load_pipeline
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.serialization import save_quantized
    from quantdiff.serving.app import EXAMPLE_PROMPTS
    from quantdiff.serving.service import DEFAULT_STEPS, ModelSlot, own_prompt_set

    folder = resolve_model("digits-sd")
    own = read_evaluation_set(folder)
    assert (own.steps, own.guidance) == (25, 5.0)
    slot = ModelSlot(folder)
    assert (slot.defaults()["steps"], slot.defaults()["guidance"]) == (25, 5.0)
    trained = [p.text for p in own.prompts if not p.heldout]
    assert slot.example_prompts() == trained[:6]
    service = GenerationService(folder, log_path=tmp_path / "log.jsonl")
    resolved = service.resolve(GenerationRequest(prompt=trained[0], seed=0))
    assert (resolved["steps"], resolved["guidance"]) == (25, 5.0)

    # A quantized folder is the same model: it carries its base folder's set.
    pipe = load_pipeline(folder)
    quantize_denoiser(pipe.unet, "w8a16", None, progress=False)
    quantized = save_quantized(pipe, tmp_path / "digits-sd-w8a16", base_path=folder)
    carried = own_prompt_set(quantized)
    assert (carried.prompts, carried.steps, carried.guidance) == (own.prompts, 25, 5.0)

    # A folder without one keeps the generic examples, 20 steps and the pipeline's guidance.
    plain = ModelSlot(tiny_folders["sd15"])
    assert plain.prompt_set is None and plain.example_prompts() is None
    assert (plain.defaults()["steps"], plain.defaults()["guidance"]) == (DEFAULT_STEPS, 7.5) == (20, 7.5)
    assert EXAMPLE_PROMPTS[0] == "a red fox sitting in fresh snow at dawn"


@pytest.mark.skipif(_chromium() is None and os.environ.get("CI") != "true", reason="needs Debian's chromium")
def test_browser_digits_sd_shows_its_own_examples_and_evaluation_settings(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from quantdiff.evaluation.prompt_sets import read_evaluation_set
    from quantdiff.pipelines.bundled import resolve_model
    from quantdiff.serving.app import EXAMPLE_PROMPTS

    assert _chromium() is not None, "CI must install chromium (scripts/test.sh does)"
    folder = resolve_model("digits-sd")
    own = read_evaluation_set(folder)
    examples = [p.text for p in own.prompts if not p.heldout][:6]
    service = GenerationService(folder, log_path=tmp_path / "log.jsonl")
    with _Server(service) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=_CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(server.url + "/", wait_until="networkidle")

        assert page.locator("#steps input[type=number]").input_value() == "25"
        assert page.locator("#guidance input[type=number]").input_value() == "5"
        expect(page.locator("#defaults")).to_contain_text(
            "Examples and defaults (25 steps, guidance 5) come from the model's own prompt set "
            f"({len(own.prompts)} prompts, prompts/evaluation.json)."
        )
        shown = page.locator("#examples")
        for text in examples:
            expect(shown).to_contain_text(text)
        assert EXAMPLE_PROMPTS[0] not in shown.inner_text()

        shown.get_by_text(examples[1], exact=True).click()
        expect(page.locator("#prompt textarea")).to_have_value(examples[1])
        page.locator("#randomize input").uncheck()
        page.locator("#seed input").fill("3")
        page.locator("#generate").click()
        expect(page.locator("#info")).to_contain_text("seed 3", timeout=PAGE_TIMEOUT_MS)
        expect(page.locator("#info")).to_contain_text("25 steps · guidance 5.0")
        browser.close()
    (entry,) = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert entry["status"] == "ok" and entry["request"]["prompt"] == examples[1]
    assert (entry["parameters"]["steps"], entry["parameters"]["guidance"]) == (25, 5.0)
