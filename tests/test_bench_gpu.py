"""The GPU suite of quantdiff bench (bf16 baseline), run on the CPU with tiny denoisers.

Its timings mean nothing here; what is checked is everything else it does on a GPU: building bf16 and W8A8
(int8 GEMM) models from one fp32 model, SQNR against fp32, weight bytes, interleaved timing, the report.
"""

from __future__ import annotations

import json

import pytest
import torch

from quantdiff import bench
from quantdiff.errors import QuantDiffError


def test_gpu_runner_on_cpu_with_tiny_models(tmp_path):
    settings = bench.make_settings(
        models=("tiny-sd15", "tiny-sd3"),
        methods=("bf16", "qd-w8a8"),
        repeats=2,
        warmup=0,
        calibration_inputs=2,
        device="cpu",
        baseline="bf16",
        slow_cutoff=None,  # every row timed twice: on a loaded machine the int8 GEMM's CPU math can pass 3x bf16
    )
    cases = []
    result = bench.run_benchmark(settings, on_case=lambda r: cases.append(len(r.rows)))
    assert cases == [2, 4]  # the result so far after each (model, latent)
    rows = {(r.model, r.method): r for r in result.rows}
    assert set(rows) == {(m, k) for m in ("tiny-sd15", "tiny-sd3") for k in ("bf16", "qd-w8a8")}
    for (model, _), row in rows.items():
        assert row.status == "ok" and row.latent == 16 and len(row.times_s) == 2
        assert row.median_s > 0 and row.device_peak_bytes is None  # no CUDA memory counters on the CPU
        assert row.speedup_vs_bf16 == pytest.approx(rows[(model, "bf16")].median_s / row.median_s)
    for model in ("tiny-sd15", "tiny-sd3"):
        bf16, w8a8 = rows[(model, "bf16")], rows[(model, "qd-w8a8")]
        expected = _recomputed_sqnr(model, result.settings)
        assert bf16.sqnr_db == pytest.approx(expected["bf16"], abs=0.01), (model, bf16.sqnr_db, expected)
        assert w8a8.sqnr_db == pytest.approx(expected["qd-w8a8"], abs=0.01), (model, w8a8.sqnr_db, expected)
        assert "int8 GEMM (torch._int_mm)" in w8a8.path_detail and w8a8.setup_s > 0
        # int8 weights (1 byte) against bf16 (2 bytes), plus the bf16 tensors both keep
        assert w8a8.weight_bytes < 0.8 * bf16.weight_bytes
    assert "convolution" in rows[("tiny-sd15", "qd-w8a8")].path_detail  # 3x3 convs: reference, counted
    bench.write_markdown(result, tmp_path / "RESULTS-gpu.md")
    bench.write_json(result, tmp_path / "gpu.json")
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["format"] == "quantdiff-bench" and data["settings"]["baseline"] == "bf16" and len(data["rows"]) == 4
    markdown = bench.render_markdown(result)
    assert "| qd-w8a8 | ok |" in markdown and "tiny SD3-layout MMDiT, latent 16x16" in markdown


def _recomputed_sqnr(model: str, settings) -> dict[str, float]:
    """SQNR vs fp32 of the bf16 model and of W8A8 on the int8 GEMM, rebuilt here from the same fp32 model,
    evaluation input and calibration set as the runner's (bf16 inputs, as the GPU suite calls them)."""
    import copy

    from quantdiff.bench.builds import bf16_copy, call_denoiser
    from quantdiff.bench.denoisers import cast_inputs
    from quantdiff.nn import use_integer_kernels
    from quantdiff.primitives import sqnr_db
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import PRESETS

    spec, latent = bench.DENOISERS[model], 16
    reference = bench.build_denoiser(spec, settings.seed)
    raw = bench.denoiser_inputs(
        spec, latent, settings.batch, bench.EVAL_TIMESTEP, settings.seed + bench.EVAL_SEED_OFFSET
    )
    fp32_inputs = cast_inputs(raw, "cpu")
    calibration = bench.bench_calibration(
        spec, reference, latent, settings.batch, settings.calibration_inputs, settings.seed
    )
    inputs = cast_inputs(fp32_inputs, dtype=torch.bfloat16)
    quantized = copy.deepcopy(reference)
    quantize_denoiser(quantized, PRESETS["w8a8"], calibration, progress=False)
    use_integer_kernels(quantized.to(torch.bfloat16), backend="int_mm", attention="float32")
    with torch.no_grad():
        y_ref = call_denoiser(reference, fp32_inputs)
        outputs = {"bf16": call_denoiser(bf16_copy(reference), inputs), "qd-w8a8": call_denoiser(quantized, inputs)}
    return {name: sqnr_db(y_ref, y.float()) for name, y in outputs.items()}


def test_gpu_settings_are_validated():
    with pytest.raises(QuantDiffError, match="unknown GPU method"):
        bench.make_settings(models=("tiny-sd15",), methods=("fp32",), device="cpu", baseline="bf16")
    with pytest.raises(QuantDiffError, match="unknown model"):
        bench.make_settings(models=("sd9",), device="cpu", baseline="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(QuantDiffError, match="no CUDA GPU is visible"):
            bench.make_settings(models=("sdxl",), device="cuda")
