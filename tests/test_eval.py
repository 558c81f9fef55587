"""``quantdiff eval`` end to end on an untrained digits-layout pipeline, and its building blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from quantdiff.cli import main
from quantdiff.demo.digits.data import DigitSpec
from quantdiff.demo.digits.prompts import digits_prompt_sets
from quantdiff.demo.digits.training.sd import build_components
from quantdiff.errors import QuantDiffError
from quantdiff.evaluate import EvalSettings, make_grid
from quantdiff.evaluation.prompt_sets import (
    EvalPrompt,
    EvaluationSet,
    read_calibration_prompts,
    read_evaluation_set,
    write_prompt_sets,
)
from quantdiff.recipe import PRESETS


@pytest.fixture(scope="module")
def untrained_digits_sd(tmp_path_factory) -> str:
    """The digits-sd pipeline layout with random weights (32x32 images), carrying its prompt sets."""
    components = build_components(seed=0)
    components.pop("scheduler")
    from diffusers import DDIMScheduler

    pipe = StableDiffusionPipeline(
        **components,
        scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("digits") / "digits-sd-untrained"
    pipe.save_pretrained(folder)
    calibration, evaluation = digits_prompt_sets(seed=0, num_calibration=8, num_evaluation=10, steps=4, guidance=3.0)
    write_prompt_sets(folder, calibration, evaluation)
    return str(folder)


def test_prompt_sets_round_trip(tmp_path):
    calibration, evaluation = digits_prompt_sets(seed=3, num_calibration=12, num_evaluation=20)
    write_prompt_sets(tmp_path, calibration, evaluation)
    assert read_calibration_prompts(tmp_path) == calibration
    again = read_evaluation_set(tmp_path)
    assert again.prompts == evaluation.prompts and (again.steps, again.guidance) == (
        evaluation.steps,
        evaluation.guidance,
    )
    assert sum(p.heldout for p in again.prompts) == 6  # 30% held-out combinations
    assert read_evaluation_set(tmp_path / "nowhere") is None


def test_malformed_evaluation_set_is_refused(tmp_path):
    write_prompt_sets(tmp_path, ["x"], EvaluationSet((EvalPrompt("a red one on a blue background", None),)))
    path = tmp_path / "prompts" / "evaluation.json"
    data = json.loads(path.read_text())
    data["prompts"][0]["spec"] = {"digit": 12, "foreground": "red", "background": "blue"}
    path.write_text(json.dumps(data))
    with pytest.raises(QuantDiffError, match="malformed prompt entry"):
        read_evaluation_set(tmp_path)


def test_grid_has_one_row_per_model():
    images = {name: np.full((5, 32, 32, 3), value, np.uint8) for name, value in (("fp", 0), ("w8a8", 255))}
    grid = make_grid(images, columns=3, scale=2)
    assert grid.height == 2 * (64 + 2)
    pixels = np.asarray(grid)
    assert (pixels[10, -10] == 0).all() and (pixels[66 + 10, -10] == 255).all()


def test_settings_are_validated():
    with pytest.raises(QuantDiffError, match="num-images"):
        EvalSettings(num_images=0)


def test_eval_end_to_end(untrained_digits_sd, tmp_path, capsys):
    quantized = tmp_path / "w8a16"
    assert main(["--quiet", "quantize", untrained_digits_sd, "--recipe", "w8a16", "--out", str(quantized)]) == 0
    out = tmp_path / "eval"
    argv = ["--quiet", "eval", untrained_digits_sd, str(quantized), "--out", str(out), "--num-images", "6"]
    assert main(argv + ["--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| fp | floating point |" in printed and "W8A16" in printed

    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["fp", "w8a16"]
    fp, q = report["models"]
    assert fp["recipe"] is None and q["recipe"].startswith("W8A16")
    assert set(report["models"][0]["metrics"]) >= {"fid_digits", "is_digits", "alignment", "psnr_vs_fp", "ssim_vs_fp"}
    # The evaluation set of the folder is used (its steps and prompt count) and the digits metrics apply.
    assert report["prompts"]["count"] == 10 and report["settings"]["num_images"] == 6
    # every number recomputed here on the same images (same prompts and seeds, regenerated through the API)
    from quantdiff.demo.digits.data import render_specs, spec_labels
    from quantdiff.demo.digits.evaluator import load_evaluator, predict
    from quantdiff.evaluate import EvalSettings, evaluate
    from quantdiff.evaluation.metrics import fid_from_features

    _, images = evaluate(
        untrained_digits_sd, [str(quantized)], settings=EvalSettings(num_images=6, batch_size=4), progress=False
    )
    prompts = read_evaluation_set(untrained_digits_sd).prompts
    specs = [prompts[i % len(prompts)].spec for i in range(6)]
    evaluator = load_evaluator()
    real_features = predict(evaluator, render_specs(specs, split="eval", seed=0)).features
    labels = spec_labels(specs)
    predicted = {}
    for model in report["models"]:
        predictions = predict(evaluator, images[model["name"]])
        heads = (predictions.digit, predictions.foreground, predictions.background)
        predicted[model["name"]] = [head.argmax(1) for head in heads]  # 3 x (6,) class indices
        hits = np.all([head.argmax(1) == label for head, label in zip(heads, labels, strict=True)], axis=0)
        assert model["metrics"]["alignment"] == pytest.approx(hits.mean(), abs=1e-12)
        p = predictions.digit.astype(np.float64)  # (6, 10) class probabilities
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
        assert model["metrics"]["is_digits"] == pytest.approx(np.exp(kl.mean()), rel=1e-5)
        fid = fid_from_features(predictions.features, real_features)
        assert model["metrics"]["fid_digits"] == pytest.approx(fid, rel=1e-6)
    a, b = (images[name].astype(np.float64) for name in ("w8a16", "fp"))
    psnr = np.mean([10 * np.log10(255.0**2 / np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)])
    assert q["metrics"]["psnr_vs_fp"] == pytest.approx(psnr, rel=1e-9)
    # SSIM per image pair (the metric is checked against a naive reference in test_metrics), then the mean
    from quantdiff.evaluation.metrics import ssim

    pairs = zip(images["w8a16"], images["fp"], strict=True)
    assert q["metrics"]["ssim_vs_fp"] == pytest.approx(np.mean([ssim(x, y) for x, y in pairs]), rel=1e-9)
    _alignment_counts_only_images_right_on_every_head(untrained_digits_sd, predicted["fp"], tmp_path)
    assert fp["metrics"]["psnr_vs_fp"] is None and fp["metrics"]["ssim_vs_fp"] is None
    # W8A16 of the same weights stays close to FP on the same seeds.
    assert q["metrics"]["psnr_vs_fp"] > 25 and q["metrics"]["ssim_vs_fp"] > 0.8
    assert q["metrics"]["latent_psnr_vs_fp"] > 25
    assert report["reference"]["fid_digits_floor"] >= 0 and report["reference"]["real_alignment"] > 0.9

    grid = Image.open(out / "grid.png")
    assert grid.height == 2 * (96 + 2)
    assert "alignment" in (out / "report.md").read_text()

    # Same seeds, same model: the FP images are reproduced exactly by a second run.
    again = tmp_path / "again"
    assert main(["--quiet", "eval", untrained_digits_sd, "--out", str(again), "--num-images", "6"]) == 0
    first = json.loads((out / "report.json").read_text())["models"][0]["metrics"]
    second = json.loads((again / "report.json").read_text())["models"][0]["metrics"]
    assert first == second


def _alignment_counts_only_images_right_on_every_head(folder, predicted, tmp_path):
    """The untrained model's images match no spec on any head, so its alignment is 0 however it is added up. With
    the same prompt texts (so the same images) and specs set from what the evaluator sees in those images, one
    head made wrong per image by role, the report must say exactly: 2 of 6 right on all three heads, 4 of 6 on
    each head. Roles: all right (x2), digit wrong, foreground wrong, background wrong, everything wrong."""
    import shutil

    from quantdiff.demo.digits.data import COLOURS
    from quantdiff.evaluation.prompt_sets import EvalPrompt, EvaluationSet, read_calibration_prompts

    digit, fg, bg = (np.asarray(head) for head in predicted)  # (6,) each: what the evaluator predicts
    both_colours = [i for i in range(6) if fg[i] != bg[i]]  # a spec with both colours right needs them distinct
    assert len(both_colours) >= 3, (fg, bg)
    rest = [i for i in range(6) if i not in both_colours[:3]]
    roles = dict(zip([*both_colours[:3], *rest], ["all", "all", "digit", "fg", "bg", "none"], strict=True))

    def other(*taken):  # a colour index none of ``taken``
        return next(c for c in range(len(COLOURS)) if c not in taken)

    specs = []
    for i in range(6):
        d, f, b = int(digit[i]), int(fg[i]), int(bg[i])
        role = roles[i]
        if role in ("digit", "none"):
            d = (d + 1) % 10
        if role in ("fg", "none"):
            f = other(fg[i], b)
        if role in ("bg", "none"):
            b = other(bg[i], f)
        specs.append(DigitSpec(d, COLOURS[f], COLOURS[b]))
    evaluation = read_evaluation_set(folder)
    relabelled = Path(shutil.copytree(folder, tmp_path / "relabelled"))
    prompts = tuple(EvalPrompt(p.text, spec, p.heldout) for p, spec in zip(evaluation.prompts[:6], specs, strict=True))
    write_prompt_sets(
        relabelled,
        read_calibration_prompts(folder),
        EvaluationSet(prompts, evaluation.steps, evaluation.guidance),
    )
    out = tmp_path / "eval-relabelled"
    assert main(["--quiet", "eval", str(relabelled), "--out", str(out), "--num-images", "6", "--batch-size", "4"]) == 0
    (fp,) = json.loads((out / "report.json").read_text())["models"]
    assert fp["metrics"]["alignment"] == pytest.approx(2 / 6, abs=1e-12), (roles, fp["details"])
    assert fp["details"]["alignment_by_head"] == pytest.approx(
        {"digit": 4 / 6, "foreground": 4 / 6, "background": 4 / 6}, abs=1e-12
    )


def test_eval_refuses_a_second_floating_point_model(untrained_digits_sd, tmp_path, capsys):
    argv = ["--quiet", "eval", untrained_digits_sd, untrained_digits_sd, "--out", str(tmp_path / "e")]
    assert main(argv + ["--num-images", "1"]) == 2
    assert "is not a quantized folder" in capsys.readouterr().err


def test_eval_generic_prompts_skip_the_digits_metrics(tiny_folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\n")
    out = tmp_path / "eval"
    argv = ["--quiet", "eval", tiny_folders["sd15"], "--out", str(out), "--num-images", "2", "--prompts", str(prompts)]
    assert main(argv + ["--steps", "2"]) == 0
    metrics = json.loads((out / "report.json").read_text())["models"][0]["metrics"]
    assert metrics["alignment"] is None and metrics["fid_digits"] is None


def test_existing_report_is_kept(untrained_digits_sd, tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    assert main(["--quiet", "eval", untrained_digits_sd, "--out", str(tmp_path), "--num-images", "1"]) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert (tmp_path / "report.json").read_text() == "{}"


def test_spec_equality_survives_json():
    spec = DigitSpec(3, "red", "blue")
    assert DigitSpec(**json.loads(json.dumps(vars(spec)))) == spec
    assert torch.is_grad_enabled()


def test_eval_quantizes_each_recipe_and_reports_them_together(untrained_digits_sd, tmp_path, capsys):
    """`eval --recipes`: a quality matrix in one command (recipes quantized into OUT/quantized, shared calibration)."""
    out = tmp_path / "matrix"
    argv = ["--quiet", "eval", untrained_digits_sd, "--recipes", "w8a16,w8a8-minmax", "--out", str(out)]
    assert main(argv + ["--num-images", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["fp", "w8a16", "w8a8-minmax"]
    assert (out / "calib" / "index.json").is_file()  # recorded once, from the model's own calibration prompts
    calibration = json.loads((out / "calib" / "index.json").read_text())
    assert calibration["info"]["prompts"] == read_calibration_prompts(untrained_digits_sd)
    for name in ("w8a16", "w8a8-minmax"):
        assert (out / "quantized" / name / "quantdiff.json").is_file()
    # A second run reuses the folders and the calibration, and gives the same numbers.
    assert main(argv + ["--num-images", "2", "--overwrite"]) == 0
    assert "w8a16: reusing" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert [m["metrics"] for m in again["models"]] == [m["metrics"] for m in report["models"]]
    # A recipe file that reuses a name with other settings is quantized again, not silently replaced by the old folder.
    changed = tmp_path / "w8a16.yaml"
    changed.write_text(json.dumps({**PRESETS["w4a16"].to_dict(), "name": "w8a16"}))
    assert (
        main(["--quiet", "eval", untrained_digits_sd, "--recipes", str(changed), "--out", str(out), "--overwrite"]) == 0
    )
    assert "made with another recipe of that name; quantizing again" in capsys.readouterr().out
    stored = json.loads((out / "quantized" / "w8a16" / "quantdiff.json").read_text())
    assert stored["recipe"]["weights"]["bits"] == 4
    assert main(["--quiet", "eval", untrained_digits_sd, "--recipes", "w8a16,w8a16", "--out", str(tmp_path / "x")]) == 2
