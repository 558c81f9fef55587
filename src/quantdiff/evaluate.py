"""``quantdiff eval``: the same prompts and seeds through the floating-point model and each quantized
folder, scored and written as ``report.json``, ``report.md`` and ``grid.png``.

Image ``i`` of every model uses prompt ``i mod P`` and seed ``seed + i``, so column ``i`` of the grid
and the fidelity metrics compare like with like. Which metrics apply depends on the prompts:

- prompts with a ``spec`` (the digits models' own evaluation sets) are judged by the digits
  evaluator: ``alignment`` (digit and both colours right), ``is_digits`` and ``fid_digits`` against
  real renders of the same specs from held-out source digits, with the FID of a second real render
  set as the floor;
- every quantized model gets ``psnr_vs_fp`` / ``ssim_vs_fp`` (images) and ``latent_psnr_vs_fp`` (the
  final latents, before the VAE) against the floating-point model;
- real-model metrics (``fid_inception`` against the FP images, ``clip_score``, ``image_reward``) run
  when the user points at local weights (:class:`RealMetricWeights`).

A metric that does not apply is ``None`` (``null`` in JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from quantdiff.demo.digits.data import render_specs
from quantdiff.demo.digits.evaluator import adherence, load_evaluator, predict
from quantdiff.errors import QuantDiffError
from quantdiff.evaluation.metrics import fid_from_features, inception_score, psnr, ssim
from quantdiff.evaluation.prompt_sets import EvalPrompt, EvaluationSet, read_evaluation_set
from quantdiff.generate import describe_execution, load_any_pipeline, refuse_inert_attention, step_callback_kwargs
from quantdiff.pipelines.loading import denoiser_of
from quantdiff.progress import Progress
from quantdiff.quantize import quantization_info

REPORT_VERSION = 1
METRICS = ("fid_digits", "is_digits", "alignment", "psnr_vs_fp", "ssim_vs_fp", "latent_psnr_vs_fp")
REAL_METRICS = ("fid_inception", "clip_score", "image_reward")


@dataclass(frozen=True)
class EvalSettings:
    """How many images and how they are made.

    Attributes:
        num_images: images per model (prompts repeat when there are fewer prompts than images).
        steps, guidance: ``None`` takes the evaluation set's value, else the pipeline's default.
        seed: seed of image 0; image ``i`` uses ``seed + i``.
        batch_size: images per pipeline call.
        grid_columns: images per row in ``grid.png``.
    """

    num_images: int = 100
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 50
    grid_columns: int = 10

    def __post_init__(self) -> None:
        for name in ("num_images", "batch_size", "grid_columns"):
            if getattr(self, name) < 1:
                raise QuantDiffError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise QuantDiffError(f"steps must be at least 1, got {self.steps}")


@dataclass(frozen=True)
class RealMetricWeights:
    """Local weights for the real-model metrics; each metric runs only when its weights are given."""

    inception: str | None = None
    clip: str | None = None
    image_reward: str | None = None
    image_reward_config: str | None = None


@dataclass
class GeneratedSet:
    """One model's images for the evaluation prompts: (N, H, W, 3) uint8 and (N, C, h, w) final latents."""

    images: np.ndarray
    latents: torch.Tensor
    seconds: float


@dataclass
class ModelResult:
    name: str
    path: str
    recipe: str | None
    metrics: dict[str, float | None]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalReport:
    settings: EvalSettings
    prompts_source: str
    num_prompts: int
    heldout_fraction: float | None
    reference: dict[str, float | None]
    models: list[ModelResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "settings": dataclasses.asdict(self.settings),
            "prompts": {
                "source": self.prompts_source,
                "count": self.num_prompts,
                "heldout_fraction": self.heldout_fraction,
            },
            "reference": self.reference,
            "models": [dataclasses.asdict(model) for model in self.models],
        }

    def to_markdown(self) -> str:
        return format_markdown(self)


def evaluation_set_for(model: str | os.PathLike, prompts: Sequence[str] | None = None) -> EvaluationSet:
    """The prompts to evaluate ``model`` with: given ones, else the folder's own set, else generic ones."""
    if prompts:
        return EvaluationSet(tuple(EvalPrompt(p) for p in prompts), source="--prompts")
    own = read_evaluation_set(model)
    if own is not None:
        return own
    from quantdiff.calibration.prompts import default_prompts

    return EvaluationSet(tuple(EvalPrompt(p) for p in default_prompts()), source="quantdiff default prompts")


def generate_set(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None,
    guidance: float | None,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> GeneratedSet:
    """Images and final latents of ``pipe`` for ``prompts[i]`` with seed ``seeds[i]``, in batches."""
    images: list[np.ndarray] = []
    latents: list[torch.Tensor] = []
    last: dict[str, torch.Tensor] = {}

    def keep_latents(step: int, value: torch.Tensor) -> None:
        last["latents"] = value

    extra = step_callback_kwargs(pipe, keep_latents)
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with Progress(total=len(prompts), desc=desc, unit="img", enabled=progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            kwargs: dict[str, Any] = {
                "prompt": list(prompts[batch]),
                "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[batch]],
                "output_type": "np",
                **extra,
            }
            if steps is not None:
                kwargs["num_inference_steps"] = steps
            if guidance is not None:
                kwargs["guidance_scale"] = guidance
            with torch.no_grad():
                output = pipe(**kwargs).images  # (B, H, W, 3) float in [0, 1]
            images.append(np.rint(np.clip(output, 0.0, 1.0) * 255.0).astype(np.uint8))
            latents.append(last["latents"].detach().float().cpu())
            bar.update(len(output))
    return GeneratedSet(np.concatenate(images), torch.cat(latents), time.perf_counter() - started)


def _mean_pairwise(metric, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([metric(x, y) for x, y in zip(a, b, strict=True)]))


def _latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of the final latents, with the peak-to-peak range of the reference latents as the data range."""
    ref = reference.double()
    mse = float(((latents.double() - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def _finite(value: float | None) -> float | None:
    # JSON has no infinity: identical outputs would give PSNR = inf; report it as None with a flag instead.
    return None if value is None or not np.isfinite(value) else float(value)


def evaluate(
    model: str | os.PathLike,
    quantized: Sequence[str | os.PathLike] = (),
    *,
    settings: EvalSettings = EvalSettings(),
    prompts: Sequence[str] | None = None,
    real_weights: RealMetricWeights = RealMetricWeights(),
    device: str = "cpu",
    progress: bool = True,
    execution: str = "reference",
    attention: str = "auto",
) -> tuple[EvalReport, dict[str, np.ndarray]]:
    """Generates and scores the floating-point ``model`` and each quantized folder.

    ``execution`` / ``attention``: how the quantized folders run (:func:`quantdiff.generate.load_any_pipeline`):
    the reference (fake-quant) path by default, or ``"integer"`` to score the int8-kernel path as deployed.

    Returns:
        The report and each model's images by name ((N, H, W, 3) uint8), for the grid.
    """
    if quantized:
        refuse_inert_attention(attention, execution)  # before the FP model's images, not after
    evaluation = evaluation_set_for(model, prompts)
    chosen = [evaluation.prompts[i % len(evaluation.prompts)] for i in range(settings.num_images)]
    texts = [p.text for p in chosen]
    seeds = [settings.seed + i for i in range(settings.num_images)]
    steps = settings.steps if settings.steps is not None else evaluation.steps
    guidance = settings.guidance if settings.guidance is not None else evaluation.guidance
    specs = [p.spec for p in chosen]
    judged = all(spec is not None for spec in specs)

    sets: dict[str, GeneratedSet] = {}
    entries: list[tuple[str, str, str | None]] = []
    paths = [str(model), *(str(q) for q in quantized)]
    executions: dict[str, str | None] = {}
    for index, path in enumerate(paths):
        pipe = load_any_pipeline(path, device=device, execution=execution, attention=attention)
        executions[path] = describe_execution(pipe)
        _, denoiser = denoiser_of(pipe)
        info = quantization_info(denoiser)
        if index > 0 and info is None:
            raise QuantDiffError(f"'{path}' is not a quantized folder: give the floating-point model first, once")
        recipe = None if info is None else f"{info.recipe.label} ({info.recipe.name})"
        name = "fp" if index == 0 else _unique_name(Path(path).name, {n for n, _, _ in entries})
        sets[name] = generate_set(
            pipe,
            texts,
            seeds,
            steps=steps,
            guidance=guidance,
            batch_size=settings.batch_size,
            desc=name,
            progress=progress,
        )
        entries.append((name, path, recipe))
        del pipe, denoiser

    reference: dict[str, float | None] = {"fid_digits_floor": None, "real_alignment": None}
    evaluator = reference_features = None
    if judged:
        evaluator = load_evaluator()
        real = render_specs(specs, split="eval", seed=settings.seed)
        second = render_specs(specs, split="eval", seed=settings.seed + 1)
        reference_features = predict(evaluator, real).features
        real_predictions = predict(evaluator, second)
        reference["fid_digits_floor"] = fid_from_features(real_predictions.features, reference_features)
        reference["real_alignment"] = adherence(real_predictions, specs)["all"]

    fp = sets["fp"]
    results: list[ModelResult] = []
    real_scorer = _RealMetrics(real_weights, fp.images, texts, device) if _any_real(real_weights) else None
    for name, path, recipe in entries:
        generated = sets[name]
        metrics: dict[str, float | None] = dict.fromkeys(METRICS)
        details: dict[str, Any] = {
            "seconds": round(generated.seconds, 2),
            "identical_to_fp": None,
            "execution": executions[path],
        }
        if judged:
            predictions = predict(evaluator, generated.images)
            scores = adherence(predictions, specs)
            metrics["alignment"] = scores["all"]
            metrics["is_digits"] = inception_score(predictions.digit)
            metrics["fid_digits"] = fid_from_features(predictions.features, reference_features)
            details["alignment_by_head"] = {head: scores[head] for head in ("digit", "foreground", "background")}
            held = np.array([p.heldout for p in chosen])
            if held.any():
                details["alignment_heldout"] = adherence(
                    predictions.select(held), [s for s, h in zip(specs, held, strict=True) if h]
                )["all"]
        if name != "fp":
            details["identical_to_fp"] = bool(np.array_equal(generated.images, fp.images))
            metrics["psnr_vs_fp"] = _finite(_mean_pairwise(psnr, generated.images, fp.images))
            metrics["ssim_vs_fp"] = _mean_pairwise(ssim, generated.images, fp.images)
            metrics["latent_psnr_vs_fp"] = _finite(_latent_psnr(generated.latents, fp.latents))
        if real_scorer is not None:
            metrics.update(real_scorer.score(generated.images, is_fp=name == "fp"))
        results.append(ModelResult(name, path, recipe, metrics, details))

    held_fraction = float(np.mean([p.heldout for p in chosen])) if judged else None
    report = EvalReport(settings, evaluation.source, len(evaluation.prompts), held_fraction, reference, results)
    return report, {name: generated.images for name, generated in sets.items()}


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken or candidate == "fp":
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _any_real(weights: RealMetricWeights) -> bool:
    return any(value is not None for value in (weights.inception, weights.clip, weights.image_reward))


class _RealMetrics:
    """Real-model metrics with the user's local weights, each network loaded once for all models."""

    def __init__(self, weights: RealMetricWeights, fp_images: np.ndarray, prompts: list[str], device: str) -> None:
        from quantdiff.evaluation import real_metrics

        self.prompts, self.module = prompts, real_metrics
        self.inception = real_metrics.load_inception(weights.inception, device) if weights.inception else None
        self.clip = real_metrics.load_clip(weights.clip, device) if weights.clip else None
        self.reward = None
        if weights.image_reward is not None:
            if weights.image_reward_config is None:
                raise QuantDiffError("--image-reward needs --image-reward-config (ImageReward's med_config.json)")
            self.reward = real_metrics.load_image_reward(weights.image_reward, weights.image_reward_config, device)
        self.fp_features = None
        if self.inception is not None:
            self.fp_features = real_metrics.inception_features(self.inception, fp_images)  # (N, 2048)

    def score(self, images: np.ndarray, *, is_fp: bool) -> dict[str, float | None]:
        out: dict[str, float | None] = dict.fromkeys(REAL_METRICS)
        if self.inception is not None and not is_fp:
            features = self.module.inception_features(self.inception, images)
            out["fid_inception"] = self.module.inception_fid_from_features(features, self.fp_features)
        if self.clip is not None:
            out["clip_score"] = self.module.clip_score(self.clip, images, self.prompts)
        if self.reward is not None:
            out["image_reward"] = float(np.mean(self.module.image_reward_scores(self.reward, images, self.prompts)))
        return out


# ---------------------------------------------------------------------------------------------- output


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if kind != "db" else f"{value:.1f}"


_COLUMNS = (
    ("alignment", "alignment", "percent"),
    ("fid_digits", "FID-digits", "number"),
    ("is_digits", "IS-digits", "number"),
    ("psnr_vs_fp", "PSNR vs FP (dB)", "db"),
    ("ssim_vs_fp", "SSIM vs FP", "number"),
    ("latent_psnr_vs_fp", "latent PSNR vs FP (dB)", "db"),
    ("fid_inception", "FID (Inception) vs FP", "number"),
    ("clip_score", "CLIPScore", "number"),
    ("image_reward", "ImageReward", "number"),
)


def format_table(report: EvalReport) -> str:
    """A Markdown table: one row per model, one column per metric that any model has."""
    present = [c for c in _COLUMNS if any(m.metrics.get(c[0]) is not None for m in report.models)]
    header = ["model", "recipe", *(title for _, title, _ in present), "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in report.models:
        row = [model.name, model.recipe or "floating point"]
        for key, _, kind in present:
            value = model.metrics.get(key)
            if value is None and key in ("psnr_vs_fp", "latent_psnr_vs_fp") and model.details.get("identical_to_fp"):
                row.append("identical")
            else:
                row.append(_cell(value, kind))
        row.append(f"{model.details.get('seconds', 0):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_markdown(report: EvalReport) -> str:
    s = report.settings
    lines = [
        "# quantdiff eval",
        "",
        f"{s.num_images} images per model (seeds {s.seed}..{s.seed + s.num_images - 1}), "
        f"{report.num_prompts} prompts from {report.prompts_source}"
        + (f", {100 * report.heldout_fraction:.0f}% of them held-out combinations" if report.heldout_fraction else "")
        + ".",
        "",
        format_table(report),
        "",
    ]
    floor = report.reference.get("fid_digits_floor")
    if floor is not None:
        lines += [
            f"FID-digits floor (a second real render set of the same prompts): {floor:.2f}; "
            f"alignment of real images: {100 * report.reference['real_alignment']:.1f}%.",
            "",
        ]
    for model in report.models:
        held = model.details.get("alignment_heldout")
        if held is not None:
            lines.append(f"- {model.name}: alignment on held-out combinations {100 * held:.1f}%")
    lines += ["", "`grid.png`: one row per model (in table order), the same seed in each column."]
    return "\n".join(lines) + "\n"


def make_grid(images: dict[str, np.ndarray], columns: int, scale: int | None = None) -> Image.Image:
    """One row per model, the first ``columns`` images, with the model name on the left."""
    names = list(images)
    first = next(iter(images.values()))
    columns = min(columns, len(first))
    height, width = first.shape[1:3]
    scale = scale or max(1, 96 // max(height, width))
    cell_h, cell_w = height * scale, width * scale
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in names)
    grid = Image.new("RGB", (label_w + columns * (cell_w + 2), len(names) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(names):
        top = row * (cell_h + 2)
        draw.text((4, top + cell_h // 2 - 6), name, fill="black", font=font)
        for col in range(columns):
            tile = Image.fromarray(images[name][col]).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (label_w + col * (cell_w + 2), top))
    return grid


def write_report(report: EvalReport, images: dict[str, np.ndarray], out: str | os.PathLike) -> Path:
    """``out/report.json``, ``out/report.md`` and ``out/grid.png``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (folder / "report.md").write_text(report.to_markdown())
    make_grid(images, report.settings.grid_columns).save(folder / "grid.png")
    return folder
