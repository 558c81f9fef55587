"""`quantdiff bench` on a tiny denoiser: rows, JSON schema, weight accounting, missing peers, CLI errors, and the
ONNX Runtime child, OpenVINO (+ NNCF) and sdnq peers where they are installed (`.[bench]`; CI skips them).

No timing assertions: the numbers depend on the machine. torch.compile rows are left out (a tiny UNet
takes over a minute to compile on a loaded core); they were validated by hand on tiny configs.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from kernel_check import KERNELS_EXPECTED, SUPPORT
from kernel_layout import packed_int8_bounds

from quantdiff import bench
from quantdiff.cli import main
from quantdiff.errors import QuantDiffError
from quantdiff.nn.kernels import packed_support

ROW_FIELDS = {
    "model",
    "latent",
    "method",
    "median_s",
    "speedup_vs_fp32",
    "speedup_vs_best_fp32",
    "weight_bytes",
    "peak_rss_bytes",
    "sqnr_db",
    "status",
    "reason",
    "path",
    "path_detail",
    "held_bytes",
    "setup_s",
    "first_call_s",
    "one_time_s",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One run on the tiny SD1.5 UNet: fp32, quantdiff W8A8 and W8A16, torch.ao dynamic, and a peer that is
    made to be missing (optimum-quanto), each timed twice, one method per group so grouping runs too. No slow
    cutoff: at this size the reference path's fixed costs can reach 3x fp32 eager, which would time it once."""
    saved = {name: sys.modules.get(name) for name in ("optimum", "optimum.quanto")}
    sys.modules["optimum"] = sys.modules["optimum.quanto"] = None  # import fails as if not installed
    try:
        settings = bench.make_settings(
            models=["tiny-sd15"],
            methods=["qd-w8a8", "qd-w8a16", "ao-dynamic", "quanto-w8a8"],
            repeats=2,
            calibration_inputs=2,
            group_size=2,
            slow_cutoff=None,
        )
        outcome = bench.run_benchmark(settings, command="pytest")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    folder = tmp_path_factory.mktemp("bench")
    bench.write_json(outcome, folder / "rows.json")
    bench.write_markdown(outcome, folder / "RESULTS.md")
    return outcome, folder


def test_rows_and_json_schema(result):
    outcome, folder = result
    data = json.loads((folder / "rows.json").read_text())
    assert data["format"] == "quantdiff-bench" and data["version"] == 1
    assert {"cpu", "flags", "torch", "threads"} <= set(data["machine"])
    assert [row["method"] for row in data["rows"]] == ["fp32", "qd-w8a8", "qd-w8a16", "ao-dynamic", "quanto-w8a8"]
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["model"] == "tiny-sd15" and row["latent"] == 16 and row["latent_shape"] == [1, 4, 16, 16]
        if row["status"] == "ok":
            assert row["median_s"] > 0 and len(row["times_s"]) == (4 if row["method"] == "fp32" else 2)  # 2 groups
            assert row["speedup_vs_fp32"] > 0 and row["weight_bytes"] > 0 and row["peak_rss_bytes"] > 0
            assert row["one_time_s"] == pytest.approx(row["setup_s"] + row["first_call_s"])
    groups = {row["method"]: row["group"] for row in data["rows"] if row["status"] == "ok"}
    # group_size=2, builds in BUILD_ORDER: W8A8 and the int8 peers before the reference-path formats
    assert groups == {"fp32": None, "qd-w8a8": 0, "ao-dynamic": 0, "qd-w8a16": 1}
    assert len(data["cases"]) == 1 and data["cases"][0]["groups"] == 2
    markdown = (folder / "RESULTS.md").read_text()
    assert "## Machine" in markdown and "| qd-w8a8 | ok |" in markdown and "## Targets" in markdown


def test_fp32_is_its_own_reference(result):
    outcome, _ = result
    fp32 = next(row for row in outcome.rows if row.method == "fp32")
    assert fp32.status == "ok" and fp32.identical_to_fp32 and fp32.sqnr_db == math.inf
    assert fp32.speedup_vs_fp32 == 1.0 and fp32.weight_ratio_vs_fp32 == 1.0
    assert fp32.to_dict()["sqnr_db"] is None  # JSON has no infinity
    assert not outcome.cases[0]["notes"]  # the shared fp32 weights were not modified by any method


def test_quantdiff_rows_report_path_and_int8_bytes(result):
    outcome, _ = result
    rows = {row.method: row for row in outcome.rows}
    w8a8, w8a16 = rows["qd-w8a8"], rows["qd-w8a16"]
    assert w8a8.status == "ok" and w8a16.status == "ok"
    # each SQNR and weight count recomputed here, on a model quantized the same way from the same inputs
    recomputed = _recomputed(outcome.settings)
    for row in (w8a8, w8a16):
        assert row.sqnr_db == pytest.approx(recomputed[row.method]["sqnr_db"], abs=0.01), row.method
        assert row.weight_bytes == recomputed[row.method]["weight_bytes"], row.method
    assert w8a8.weight_bytes == pytest.approx(w8a8.weight_ratio_vs_fp32 * recomputed["fp32_bytes"], rel=1e-9)
    assert w8a16.weight_bytes == pytest.approx(w8a16.weight_ratio_vs_fp32 * recomputed["fp32_bytes"], rel=1e-9)
    assert w8a16.quantized_layers == w8a8.quantized_layers
    quantized_fp32_bytes = 4 * w8a16.stored_bytes  # int8 weight_q: one byte per weight of the quantized layers
    if KERNELS_EXPECTED:
        assert w8a8.path == "integer" and w8a8.integer_layers == w8a8.quantized_layers > 0
        # integer mode holds the prepacked copy *instead of* weight_q: 1 byte per weight (+ oneDNN's blocking)
        assert w8a8.stored_bytes == 0
        saturates = SUPPORT.saturates
        most = sum(  # over every Linear / Conv2d, the few the plan keeps in fp32 included
            packed_int8_bounds(m.weight.shape[0], m.weight[0].numel(), saturates)[1]
            for m in bench.build_denoiser(bench.DENOISERS["tiny-sd15"]).modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        )
        assert quantized_fp32_bytes / 4 <= w8a8.kernel_bytes <= most
        if saturates:  # AVX2: no padding, so exactly the 1/4 of fp32 it is at real sizes on any CPU
            assert w8a8.kernel_bytes / quantized_fp32_bytes < 0.26
    # the whole model (fp32 layers the plan keeps, biases, norms included) is 0.25-0.6x of fp32
    assert 0.25 < w8a8.weight_ratio_vs_fp32 < 0.6
    assert "weight-only" in w8a16.path_detail
    if packed_support().dequantize:  # the packed backend's weight-only kernel holds the stored int8 weight
        assert w8a16.path == "integer" and w8a16.integer_layers == w8a16.quantized_layers
        assert w8a16.stored_bytes == 0 and w8a16.kernel_bytes > 0
    else:
        assert w8a16.path == "reference" and w8a16.reference_layers == w8a16.quantized_layers
        assert w8a16.kernel_bytes == 0
    assert 0.25 < w8a16.weight_ratio_vs_fp32 < 0.35
    assert rows["ao-dynamic"].status == "ok" and rows["ao-dynamic"].path == "torch.ao dynamic"


def _recomputed(settings) -> dict:
    """fp32 bytes, and per quantdiff row the SQNR vs fp32 and the bytes held, recomputed from scratch: the
    same denoiser, evaluation input and calibration set, quantized with the same recipe, bytes counted per
    tensor from the layers themselves (the kernel's packed copy in place of weight_q in integer mode)."""
    import copy

    from quantdiff.bench.builds import call_denoiser, integer_w8a8_recipe
    from quantdiff.nn import QuantizedLayer, use_integer_kernels
    from quantdiff.primitives import sqnr_db
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import PRESETS

    spec, latent = bench.DENOISERS["tiny-sd15"], 16
    reference = bench.build_denoiser(spec, settings.seed)
    inputs = bench.denoiser_inputs(
        spec, latent, settings.batch, bench.EVAL_TIMESTEP, settings.seed + bench.EVAL_SEED_OFFSET
    )
    calibration = bench.bench_calibration(
        spec, reference, latent, settings.batch, settings.calibration_inputs, settings.seed
    )
    with torch.no_grad():
        y_ref = call_denoiser(reference, inputs)
    tensors = [*reference.parameters(), *reference.buffers()]
    out = {"fp32_bytes": sum(t.numel() * t.element_size() for t in tensors)}
    for method, recipe in (("qd-w8a8", integer_w8a8_recipe()), ("qd-w8a16", PRESETS["w8a16"])):
        model = copy.deepcopy(reference)
        quantize_denoiser(model, recipe, calibration, progress=False)
        use_integer_kernels(model)
        with torch.no_grad():
            y = call_denoiser(model, inputs)
        held = 0
        for module in model.modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            held += sum(t.numel() * t.element_size() for t in own if t is not None)
            if isinstance(module, QuantizedLayer):
                held += module.kernel_bytes
        out[method] = {"sqnr_db": sqnr_db(y_ref, y), "weight_bytes": held}
    return out


def test_missing_peer_is_a_row(result):
    outcome, _ = result
    quanto = next(row for row in outcome.rows if row.method == "quanto-w8a8")
    assert quanto.status == "not installed" and quanto.reason == "optimum-quanto is not installed"
    assert quanto.median_s is None and quanto.to_dict()["speedup_vs_fp32"] is None
    assert "quanto-w8a8: not installed" in bench.format_table(outcome)


def test_every_build_has_its_place_in_the_build_order():
    from quantdiff.bench.methods import BUILD_ORDER, BUILDERS

    assert sorted(BUILD_ORDER) == sorted({"fp32", *BUILDERS}) and len(set(BUILD_ORDER)) == len(BUILD_ORDER)


def test_mixed_row_gives_each_layer_role_its_searched_width():
    """qd-w4a8-mixed: 2-bit text keys, 8-bit attention in / out projections and skip convolutions, 4-bit the
    rest, on the real SD1.5 layout (tiny sizes)."""
    from collections import Counter

    from quantdiff.bench.methods import _QD_RECIPES
    from quantdiff.pipelines.architectures import architecture_of
    from quantdiff.plan import resolve_plan

    denoiser = bench.build_denoiser(bench.DENOISERS["tiny-sd15"])
    plan = resolve_plan(denoiser, _QD_RECIPES["qd-w4a8-mixed"], architecture_of(denoiser))
    bits = {layer.name: layer.weights.bits for layer in plan.quantized}
    assert Counter(bits.values()).keys() == {2, 4, 8}
    assert all((bits[name] == 2) == name.endswith("attn2.to_k") for name in bits)
    assert all(bits[name] == 8 for name in bits if name.endswith(("proj_in", "proj_out", "conv_shortcut")))


def test_activation_mode_rows_differ_from_w8a8_by_their_mode_alone():
    """qd-w8a8-<mode> rows are read as the cost of one activation mode over qd-w8a8: same weights, and the
    inputs or the algorithm list changed in that one respect."""
    from quantdiff.algorithms.rotation import Rotation
    from quantdiff.algorithms.shortcut_split import ShortcutSplit
    from quantdiff.algorithms.smoothquant import SmoothQuant
    from quantdiff.algorithms.timestep_groups import TimestepGroups
    from quantdiff.bench.builds import integer_w8a8_recipe
    from quantdiff.bench.methods import _QD_RECIPES, ACTIVATION_MODE_ROWS
    from quantdiff.recipe import PRESETS

    algorithm_of = {"tg4": TimestepGroups, "sq": SmoothQuant, "split": ShortcutSplit, "rot": Rotation}
    for base in (PRESETS["w8a8"], integer_w8a8_recipe()):
        for mode in ACTIVATION_MODE_ROWS:
            variant = _QD_RECIPES[f"qd-w8a8-{mode}"](base)
            assert variant.weights == base.weights, mode
            if mode in algorithm_of:
                assert variant.activations == base.activations, mode
                assert [type(a) for a in variant.algorithms] == [algorithm_of[mode]], mode
            else:
                assert variant.algorithms == () and variant.activations.dynamic, mode
                assert variant.activations.bits == 8, mode
                assert variant.activations.granularity == mode, mode
    assert _QD_RECIPES["qd-w8a8-group"](PRESETS["w8a8"]).activations.group_size == 64


def test_algorithms_leave_the_weight_sharing_reference_as_it_was():
    """The bench quantizes weight-sharing copies of its fp32 reference: smoothing (folded into norms and
    stored as pre-scales), rotation and the low-rank split must give the copy new tensors, not edit the
    shared ones (they did: the next build calibrated a model whose weights were smoothed twice)."""
    from quantdiff.algorithms.lowrank import LowRank
    from quantdiff.algorithms.rotation import Rotation
    from quantdiff.algorithms.smoothquant import SmoothQuant
    from quantdiff.bench.builds import share_weights_copy
    from quantdiff.quantize import quantize_denoiser
    from quantdiff.recipe import PRESETS, Recipe

    spec = bench.DENOISERS["tiny-sd15"]
    reference = bench.build_denoiser(spec)
    before = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    calibration = bench.bench_calibration(spec, reference, 16, 1, 2, seed=0)
    recipe = Recipe(
        "w8a8-sq-rot-lowrank",
        PRESETS["w8a8"].weights,
        PRESETS["w8a8"].activations,
        algorithms=(SmoothQuant(alphas=(0.5,)), Rotation(), LowRank(rank=2)),
    )
    copy = share_weights_copy(reference)
    info = quantize_denoiser(copy, recipe, calibration, progress=False)
    extras = {extra for layer in info.plan.quantized for extra in layer.extras}
    assert {"input_pre_scale", "input_rotation", "lowrank"} <= extras  # every transform ran
    changed = [name for name, tensor in reference.state_dict().items() if not torch.equal(tensor, before[name])]
    assert changed == []


def test_settings_presets_and_errors():
    quick = bench.make_settings(quick=True)
    assert quick.models == ("sd15",) and quick.latents["sd15"] == (32,) and quick.repeats == 3
    assert "fp32-compile" in quick.methods and "qd-w8a8-compile" in quick.methods and "ort-qdq" not in quick.methods
    full = bench.make_settings()
    assert dict(full.latents) == {"sd15": (32, 64), "sdxl": (64,), "sd3": (64,)}
    assert {"pt2e-compile", "ort-qdq", "quanto-w8a8", "torchao-w8"} <= set(full.methods)
    chosen = bench.make_settings(models=["sd3", "tiny-sd15"], methods=["qd-*"], latents={"sd3": [32]})
    assert chosen.methods[0] == "fp32" and all(m.startswith("qd-") for m in chosen.methods[1:])
    assert dict(chosen.latents) == {"sd3": (32,), "tiny-sd15": (16,)}
    for kwargs, message in (
        ({"models": ["sd4"]}, "unknown model"),
        ({"methods": ["nope"]}, "unknown method"),
        ({"models": ["sd15"], "latents": [30]}, "multiple of 8"),
        ({"models": ["sd3"], "latents": [512]}, "position table"),
        ({"repeats": 0}, "repeats"),
    ):
        with pytest.raises(QuantDiffError, match=message):
            bench.make_settings(**kwargs)


def test_published_configs_build_on_meta():
    # Parameter counts of the published configs, without allocating them.
    counts = {name: bench.parameter_count(bench.DENOISERS[name]) for name in ("sd15", "sdxl", "sd3")}
    assert 855e6 < counts["sd15"] < 865e6 and 2.55e9 < counts["sdxl"] < 2.58e9 and 2.02e9 < counts["sd3"] < 2.04e9


def test_inputs_have_the_real_shapes():
    sdxl = bench.denoiser_inputs(bench.DENOISERS["sdxl"], 64, 2, 500.0, 0)
    assert sdxl["encoder_hidden_states"].shape == (2, 77, 2048)
    assert sdxl["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    assert sdxl["added_cond_kwargs"]["time_ids"][0].tolist() == [512, 512, 0, 0, 512, 512]
    sd3 = bench.denoiser_inputs(bench.DENOISERS["sd3"], 64, 1, 500.0, 0)
    assert sd3["hidden_states"].shape == (1, 16, 64, 64) and sd3["encoder_hidden_states"].shape == (1, 333, 4096)
    assert sd3["timestep"].dtype == torch.float32 and sd3["pooled_projections"].shape == (1, 2048)


def test_cli_bench_errors_are_one_line(capsys):
    assert main(["bench", "--models", "sd4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantdiff bench: error: unknown model(s) sd4") and "\n" not in err
    assert main(["bench", "--latent", "sd15=abc"]) == 2
    assert "--latent" in capsys.readouterr().err


def test_cli_bench_writes_report_and_rows(tmp_path, capsys):
    # fp32 only (always run), two latent sizes: the files are written after each case and at the end.
    report, rows = tmp_path / "out" / "RESULTS.md", tmp_path / "rows.json"
    args = ["bench", "--models", "tiny-sd3", "--methods", "fp32", "--latent", "8,16", "--repeats", "1"]
    assert main([*args, "--results", str(report), "--json", str(rows)]) == 0
    captured = capsys.readouterr()
    assert f"report -> {report}" in captured.out and "tiny SD3-layout MMDiT, latent 8x8" in captured.out
    assert captured.err.count("tiny-sd3 16x16: fp32 built") == 1  # the child's progress, passed on
    data = json.loads(rows.read_text())
    pids = [case["pid"] for case in data["cases"]]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two cases: each in its own process
    assert data["complete"] and [(r["latent"], r["status"]) for r in data["rows"]] == [(8, "ok"), (16, "ok")]
    assert data["command"].startswith("quantdiff bench --models tiny-sd3")
    assert "PARTIAL" not in report.read_text() and "latent 16x16" in report.read_text()


def test_json_reads_back_row_for_row(result):
    outcome, folder = result
    again = bench.read_json(folder / "rows.json")
    assert [row.to_dict() for row in again.rows] == [row.to_dict() for row in outcome.rows]
    assert again.settings == outcome.settings and again.machine == outcome.machine
    assert bench.render_markdown(again) == bench.render_markdown(outcome)


def test_cli_bench_resume_keeps_finished_cases(tmp_path, capsys):
    rows = tmp_path / "rows.json"
    args = ["bench", "--models", "tiny-sd3", "--methods", "fp32", "--repeats", "1", "--no-results", "--json", str(rows)]
    assert main([*args, "--latent", "8"]) == 0
    first = json.loads(rows.read_text())
    assert main([*args, "--latent", "8,16", "--resume"]) == 0
    both = json.loads(rows.read_text())
    assert [r["latent"] for r in both["rows"]] == [8, 16] and both["complete"]
    assert both["rows"][0] == first["rows"][0]  # kept, not measured again
    assert both["cases"][0]["run_started"] == first["cases"][0]["run_started"] == first["started"]
    assert both["started"] == first["started"] and both["duration_s"] > first["duration_s"]
    assert "run_started" in both["cases"][1] and "load_average_start" in both["cases"][1]
    markdown = bench.render_markdown(bench.read_json(rows))
    assert "measured in 2 resumed parts" in markdown
    # Resuming with another model keeps the cases it does not ask for, and says it holds them.
    assert main(["bench", "--models", "tiny-sd15", *args[3:], "--latent", "8", "--resume"]) == 0
    three = json.loads(rows.read_text())
    assert [(r["model"], r["latent"]) for r in three["rows"]] == [("tiny-sd3", 8), ("tiny-sd3", 16), ("tiny-sd15", 8)]
    assert three["rows"][:2] == both["rows"]
    assert three["settings"]["models"] == ["tiny-sd3", "tiny-sd15"]
    assert three["settings"]["latents"] == {"tiny-sd3": [8, 16], "tiny-sd15": [8]}
    capsys.readouterr()
    before = rows.read_text()
    assert main([*args, "--latent", "8", "--repeats", "2", "--resume"]) == 2  # other settings: refused
    assert "cannot resume" in capsys.readouterr().err and rows.read_text() == before
    assert main(["bench", "--models", "tiny-sd3", "--resume"]) == 2
    assert "give --json FILE" in capsys.readouterr().err


def test_slow_cutoff_is_validated():
    assert bench.make_settings(quick=True).slow_cutoff == 3.0
    assert bench.make_settings(quick=True, slow_cutoff=None).slow_cutoff is None
    with pytest.raises(QuantDiffError, match="slow cutoff"):
        bench.make_settings(quick=True, slow_cutoff=1.0)


def test_weight_bytes_counts_every_torch_ao_packed_layer():
    # _weight_bias() returns fresh tensors: counting them by id() lost layers to id reuse (SD3: 0.06x of fp32).
    model = bench.build_denoiser(bench.DENOISERS["tiny-sd15"])
    fp32 = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 20
    int8 = sum(m.weight.numel() * 3 for m in linears)  # 4 bytes -> 1 byte per weight; biases stay fp32
    dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert bench.weight_bytes(dynamic) == fp32 - int8


def test_a_killed_case_keeps_the_groups_it_timed():
    """The case child checkpoints its rows after every timed group; when it dies (e.g. killed for memory),
    the rows of those groups are kept with their ratios and only the methods not timed yet fail."""
    from quantdiff.bench.runner import measure_case, salvaged_rows

    settings = bench.make_settings(
        models=["tiny-sd15"], methods=["qd-w8a8", "qd-w8a16"], repeats=1, calibration_inputs=1, group_size=1
    )
    spec, latent = bench.DENOISERS["tiny-sd15"], settings.latents["tiny-sd15"][0]
    checkpoints = []
    final, case = measure_case("tiny-sd15", latent, settings, checkpoint=checkpoints.append)
    assert len(checkpoints) == case["groups"] == 2
    first = {row.method: row for row in checkpoints[0]}
    assert set(first) == {"fp32", "qd-w8a8"}  # qd-w8a16 was not built yet
    final_by_name = {row.method: row for row in final}
    assert first["qd-w8a8"].speedup_vs_fp32 == pytest.approx(final_by_name["qd-w8a8"].speedup_vs_fp32, rel=1e-12)

    salvaged = salvaged_rows(spec, latent, settings, checkpoints[0], "the case failed: killed")
    by_name = {row.method: row for row in salvaged}
    assert [row.method for row in salvaged] == list(settings.methods)
    assert by_name["qd-w8a8"].status == "ok" and by_name["qd-w8a8"].median_s > 0
    assert by_name["fp32"].median_s > 0
    assert by_name["qd-w8a16"].status == "failed" and by_name["qd-w8a16"].reason == "the case failed: killed"


def test_onnx_runtime_peer_exports_quantizes_and_runs():
    """The ort-qdq child on the tiny UNet: export + quantize_static in its own process, the quantized model timed
    here; its int8 model on disk is well under fp32's bytes and its output tracks fp32."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    settings = bench.make_settings(models=["tiny-sd15"], methods=["ort-qdq"], repeats=1, calibration_inputs=2)
    outcome = bench.run_benchmark(settings, command="pytest")
    fp32, ort = (next(row for row in outcome.rows if row.method == name) for name in ("fp32", "ort-qdq"))
    assert ort.status == "ok", ort.reason
    assert ort.path == "ONNX Runtime" and ort.median_s > 0
    # the child's own peak, above the model it built
    assert ort.setup_peak_rss_bytes > fp32.weight_bytes
    # int8 weights + fp32 biases, norms and the QDQ graph: at this tiny size the graph weighs a lot (0.59x
    # measured; 0.25x at SD1.5 size), but an fp32 copy on disk would be 1.0x or more
    assert 0.25 < ort.weight_bytes / fp32.weight_bytes < 0.75
    print(f"ort-qdq on tiny-sd15: SQNR {ort.sqnr_db:.1f} dB, {ort.weight_bytes / fp32.weight_bytes:.3f}x fp32 bytes")
    assert ort.sqnr_db > 10.0


def test_slow_cutoff_times_a_slow_method_once():
    """A cutoff just above 1x: a method slower than fp32 eager in the first timed round is timed in that round
    only, with a note giving its measured ratio; one at most as slow gets every round. The int4 reference path
    (unpack and dequantize every weight on every call) is the slow one at any size."""
    from quantdiff.bench.runner import measure_case

    cutoff = 1.000001
    methods = ["qd-w4a16", "qd-w8a16"]
    settings = bench.make_settings(
        models=["tiny-sd15"], methods=methods, repeats=3, calibration_inputs=1, slow_cutoff=cutoff
    )
    rows, case = measure_case("tiny-sd15", 8, settings)
    fp32, *others = rows
    assert case["groups"] == 1 and len(fp32.times_s) == 3 and sorted(row.method for row in others) == sorted(methods)
    anchor = fp32.times_s[0]  # fp32 eager in the first timed round (one group)
    retired = 0
    for row in others:
        assert row.status == "ok", row.reason
        notes = [n for n in row.notes if n.startswith("timed in one round only")]
        if row.times_s[0] > cutoff * anchor:
            retired += 1
            assert len(row.times_s) == 1 and row.median_s == row.times_s[0], row.method
            (note,) = notes
            ratio = float(note.split(": ")[1].split("x ")[0])
            assert ratio == pytest.approx(row.times_s[0] / anchor, abs=0.051)
            assert note.endswith("above the slow cutoff (1x); more rounds would not change its place")
        else:
            assert len(row.times_s) == 3 and not notes, row.method
    assert retired >= 1, [(row.method, row.times_s, anchor) for row in others]

    kept = bench.make_settings(models=["tiny-sd15"], methods=methods, repeats=3, calibration_inputs=1, slow_cutoff=None)
    rows, _ = measure_case("tiny-sd15", 8, kept)
    assert all(len(row.times_s) == 3 for row in rows) and not any(
        "timed in one round" in n for r in rows for n in r.notes
    )


def test_memory_budget_decides_what_is_built_and_grouped():
    """No group size: a budget the process already exceeds skips every method with the reason (fp32 is still
    timed, alone, in one group); an ample budget puts every method in one group."""
    from quantdiff.bench.runner import measure_case

    methods = ["qd-w8a8", "qd-w8a16", "ao-dynamic"]
    tight = bench.make_settings(
        models=["tiny-sd15"], methods=methods, repeats=1, calibration_inputs=1, group_size=0, memory_budget_bytes=1
    )
    assert tight.group_size is None and tight.memory_budget_bytes == 1
    rows, case = measure_case("tiny-sd15", 8, tight)
    assert case["budget_bytes"] == 1 and case["groups"] == 1
    assert rows[0].method == "fp32" and rows[0].status == "ok" and len(rows[0].times_s) == 1
    for row in rows[1:]:
        assert row.status == "skipped" and row.median_s is None, row
        assert "budget 0.0 GiB" in row.reason and "set a larger --memory-budget or fewer methods" in row.reason

    ample = bench.make_settings(
        models=["tiny-sd15"], methods=methods, repeats=1, calibration_inputs=1, group_size=0, memory_budget_bytes=2**50
    )
    rows, case = measure_case("tiny-sd15", 8, ample)
    assert case["groups"] == 1 and all(row.status == "ok" for row in rows), [(r.method, r.reason) for r in rows]
    assert {row.method: row.group for row in rows} == {"fp32": None, "qd-w8a8": 0, "qd-w8a16": 0, "ao-dynamic": 0}


def test_memory_budget_fits_some_builds_of_a_group_but_not_all(monkeypatch):
    """No group size, a budget 2 GiB above this process: builds whose estimate fits share a group; one that does
    not first ends the group (timed and freed, in case that makes room), is then skipped with its need, budget and
    RSS in the reason, and the builds after it start the next group. The estimates are set here (in bytes) so the
    decision does not hang on a few MB of RSS noise; the runner's own RSS readings and budget check are real."""
    from quantdiff.bench import runner
    from quantdiff.bench.memory import settled_rss

    gib = 2**30
    fp32_bytes = bench.weight_bytes(bench.build_denoiser(bench.DENOISERS["tiny-sd15"]))
    needs = {"qd-w8a8": 0.25 * gib, "ao-dynamic": 0.25 * gib, "qd-w4a16": 64 * gib, "qd-w8a16": 0.25 * gib}
    asked = []

    def estimate(build: str, linear_share: float, compiled: bool) -> float:  # in units of the fp32 weight bytes
        asked.append(build)
        return needs[build] / fp32_bytes

    monkeypatch.setattr(runner, "memory_estimate", estimate)
    methods = list(needs)
    budget = settled_rss() + 2 * gib
    settings = bench.make_settings(
        models=["tiny-sd15"], methods=methods, repeats=1, calibration_inputs=1, group_size=0, memory_budget_bytes=budget
    )
    checkpoints = []
    rows, case = runner.measure_case("tiny-sd15", 8, settings, checkpoint=checkpoints.append)
    by_name = {row.method: row for row in rows}
    assert asked == ["qd-w8a8", "ao-dynamic", "qd-w4a16", "qd-w8a16"]  # the build order
    assert case["budget_bytes"] == budget and case["groups"] == 2
    assert {name: row.group for name, row in by_name.items()} == {
        "fp32": None,  # the anchor, timed in every group
        "qd-w8a8": 0,
        "ao-dynamic": 0,
        "qd-w4a16": None,
        "qd-w8a16": 1,
    }
    for name in ("fp32", "qd-w8a8", "ao-dynamic", "qd-w8a16"):
        assert by_name[name].status == "ok" and by_name[name].median_s > 0, (name, by_name[name].reason)
    assert len(by_name["fp32"].times_s) == 2  # once per group
    skipped = by_name["qd-w4a16"]
    assert skipped.status == "skipped" and skipped.median_s is None
    prefix = f"needs about 64.0 GiB more; budget {budget / gib:.1f} GiB, "
    assert skipped.reason.startswith(prefix) and skipped.reason.endswith(
        " GiB held (set a larger --memory-budget or fewer methods)"
    ), skipped.reason
    held = float(skipped.reason.removeprefix(prefix).split(" GiB held")[0])
    assert 0 < held * gib <= budget - 1.5 * gib  # the RSS it read: well under the budget, far under the need
    # group 0 was timed (its checkpoint written) before the over-budget build was considered, group 1 after it
    assert len(checkpoints) == 2
    assert {row.method for row in checkpoints[0]} == {"fp32", "qd-w8a8", "ao-dynamic"}
    assert {row.method: row.status for row in checkpoints[1]} == {name: row.status for name, row in by_name.items()}


def _peer_rows(methods: list[str]) -> dict[str, bench.BenchRow]:
    settings = bench.make_settings(
        models=["tiny-sd15"], methods=methods, repeats=1, calibration_inputs=2, slow_cutoff=None, threads=1
    )
    outcome = bench.run_benchmark(settings, command="pytest")
    assert not outcome.cases[0]["notes"]  # no method changed the fp32 reference's shared weights
    return {row.method: row for row in outcome.rows}


def test_openvino_peers_convert_quantize_and_run():
    """OpenVINO on the tiny UNet: the converted fp32 model matches torch (f32 precision hint), bf16 runs where
    the CPU plugin reports native bf16 and is skipped with the reason elsewhere, and NNCF's int8 model holds int8
    weights and tracks fp32 (measured on the AMX Xeon, where int8's float layers run in bf16: fp32 118.9 dB,
    bf16 24.5 dB, int8 16.0 dB; a tiny UNet's 32-channel layers quantize poorly)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import openvino as ov

    rows = _peer_rows(["openvino-fp32", "openvino-bf16", "openvino-int8"])
    fp32, f32, bf16, int8 = (rows[n] for n in ("fp32", "openvino-fp32", "openvino-bf16", "openvino-int8"))
    for row in (f32, int8):
        assert row.status == "ok", row.reason
        assert row.path == "OpenVINO" and row.median_s > 0 and row.setup_s > 0
        assert any("convert_model" in note for note in row.notes)
    print({n: round(r.sqnr_db, 1) for n, r in rows.items() if r.sqnr_db not in (None, math.inf)})
    assert f32.sqnr_db >= 60.0 and "precision f32" in f32.path_detail
    assert 0.95 < f32.weight_bytes / fp32.weight_bytes < 1.05
    assert "nncf.quantize" in " ".join(int8.notes)
    assert "Convolution" in int8.path_detail and "MatMul" in int8.path_detail
    assert int8.weight_bytes / fp32.weight_bytes < 0.3  # int8 weights (0.26x measured; biases and norms stay float)
    assert int8.sqnr_db >= 12.0
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert bf16.status == "ok", bf16.reason
        assert bf16.sqnr_db >= 18.0 and "precision bf16" in bf16.path_detail
    else:
        assert bf16.status == "skipped" and "no native bf16" in bf16.reason


def test_sdnq_peers_quantize_and_run():
    """sdnq on the tiny UNet: int8 weights with its int8 matmul, and uint4 weights; at this size only the 30
    Linear / Conv2d layers over its 16384-weight floor are quantized (measured: 37.1 dB and 20.3 dB)."""
    pytest.importorskip("sdnq")
    rows = _peer_rows(["sdnq-w8a8", "sdnq-w4"])
    fp32, w8a8, w4 = rows["fp32"], rows["sdnq-w8a8"], rows["sdnq-w4"]
    for row in (w8a8, w4):
        assert row.status == "ok", row.reason
        assert row.path == "sdnq" and row.median_s > 0 and "18 Conv2d, 12 Linear" in row.path_detail
    print(f"sdnq on tiny-sd15: w8a8 {w8a8.sqnr_db:.1f} dB, w4 {w4.sqnr_db:.1f} dB")
    assert "30 with int8 matmul" in w8a8.path_detail and "dequantized per call" in w4.path_detail
    assert w4.weight_bytes < w8a8.weight_bytes < 0.6 * fp32.weight_bytes
    assert w8a8.sqnr_db >= 30.0 and w4.sqnr_db >= 15.0


def test_int8_attention_row_differs_from_w8a8_by_its_attention_alone():
    """qd-w8a8-int8attn is read as the cost of int8 attention over qd-w8a8: the same quantized layers on the
    same kernels, every SDPA call of the model in int8 (none falls back), its output close to the row's with
    bf16 / fp32 attention but not equal to it."""
    from quantdiff.bench.builds import BuildContext, call_denoiser
    from quantdiff.bench.methods import BUILDERS
    from quantdiff.nn.attention import attention_dtype, int8_fallbacks
    from quantdiff.primitives import sqnr_db

    spec = bench.DENOISERS["tiny-sd15"]
    reference = bench.build_denoiser(spec)
    inputs = bench.denoiser_inputs(spec, 16, 1, 500.0, 0)
    calibration = bench.bench_calibration(spec, reference, 16, 1, 2, seed=0)
    ctx = BuildContext(spec, reference, inputs, calibration, threads=torch.get_num_threads())
    plain, int8 = BUILDERS["qd-w8a8"](ctx), BUILDERS["qd-w8a8-int8attn"](ctx)
    assert attention_dtype(int8.module) == "int8" and attention_dtype(plain.module) != "int8"
    assert int8.counts == plain.counts and int8.stored_bytes == plain.stored_bytes
    assert "attention in int8" in int8.path_detail
    with torch.no_grad():
        expected, got, fp32 = plain.call(), int8.call(), call_denoiser(reference, inputs)
    assert int8_fallbacks(int8.module) == {}
    assert not torch.equal(got, expected)
    assert sqnr_db(expected, got) >= 20.0  # measured 27.1 dB: the W8A8 layers amplify a changed rounding
    assert sqnr_db(fp32, got) >= sqnr_db(fp32, expected) - 1.0
