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
        assert 30 < bf16.sqnr_db < 80 and 10 < w8a8.sqnr_db < 60
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


def test_gpu_settings_are_validated():
    with pytest.raises(QuantDiffError, match="unknown GPU method"):
        bench.make_settings(models=("tiny-sd15",), methods=("fp32",), device="cpu", baseline="bf16")
    with pytest.raises(QuantDiffError, match="unknown model"):
        bench.make_settings(models=("sd9",), device="cpu", baseline="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(QuantDiffError, match="no CUDA GPU is visible"):
            bench.make_settings(models=("sdxl",), device="cuda")
