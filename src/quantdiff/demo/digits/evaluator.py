"""The digits evaluator: a small CNN that reads digit, foreground and background colour off a 32x32 image.

It judges generated images of the digits models the way Inception-v3 judges ImageNet-like ones: its
three heads give prompt adherence (does the image show what the caption says?) and an Inception Score,
and its penultimate features give "FID-digits". Trained on renders of the train-split source digits
only (``scripts/train_evaluator.py``); the trained weights ship next to this module as
``evaluator.safetensors``, with their config in the file's metadata.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quantdiff.demo.digits.data import COLOURS, PALETTE, DigitsDataset, DigitSpec, make_dataset, spec_labels
from quantdiff.evaluation.metrics import fid_from_features, inception_score

FORMAT = "quantdiff-digits-evaluator"
FORMAT_VERSION = 1
HEADS = ("digit", "foreground", "background")
_SHIPPED = "evaluator.safetensors"  # in this package


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture of the evaluator (stored in the weights file, so a file rebuilds its own model).

    Attributes:
        channels: conv widths of the four stages (32 -> 16 -> 8 -> 4 px); the last is the feature size.
        num_digits: classes of the digit head.
        colours: palette names in head order; a file trained on another palette is refused.
        image_size: input height and width.
    """

    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    num_digits: int = 10
    colours: tuple[str, ...] = COLOURS
    image_size: int = 32

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EvaluatorConfig:
        fields = json.loads(text)
        return cls(
            channels=tuple(fields["channels"]),
            num_digits=int(fields["num_digits"]),
            colours=tuple(fields["colours"]),
            image_size=int(fields["image_size"]),
        )


class EvaluatorOutput(NamedTuple):
    """Logits of the three heads."""

    digit: torch.Tensor  # (N, 10)
    foreground: torch.Tensor  # (N, 8)
    background: torch.Tensor  # (N, 8)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsEvaluator(nn.Module):
    """CNN on (N, 3, 32, 32) images in [-1, 1] with digit, foreground- and background-colour heads.

    Stages: conv(16) pool | conv(32) conv(32) pool | conv(64) conv(64) pool | conv(128), then global
    average pooling to the 128-d feature vector shared by the three linear heads: 147,306 parameters.
    """

    def __init__(self, config: EvaluatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or EvaluatorConfig()
        c1, c2, c3, c4 = self.config.channels
        self.body = nn.Sequential(
            _conv(3, c1),
            nn.MaxPool2d(2),  # 16x16
            _conv(c1, c2),
            _conv(c2, c2),
            nn.MaxPool2d(2),  # 8x8
            _conv(c2, c3),
            _conv(c3, c3),
            nn.MaxPool2d(2),  # 4x4
            _conv(c3, c4),
        )
        self.digit_head = nn.Linear(c4, self.config.num_digits)
        self.foreground_head = nn.Linear(c4, len(self.config.colours))
        self.background_head = nn.Linear(c4, len(self.config.colours))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) in [-1, 1] -> (N, feature_dim) penultimate features (the FID-digits embedding)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> EvaluatorOutput:
        feats = self.features(x)  # (N, D)
        return EvaluatorOutput(self.digit_head(feats), self.foreground_head(feats), self.background_head(feats))


# --- input conversion and inference ---------------------------------------------------------------


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 RGB (or one (32, 32, 3) image) -> (N, 3, 32, 32) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) RGB, got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


@dataclass(frozen=True)
class EvaluatorPredictions:
    """What the evaluator sees in a set of images.

    Attributes:
        digit: (N, 10) probabilities.
        foreground: (N, 8) probabilities, classes in ``COLOURS`` order.
        background: (N, 8) probabilities.
        features: (N, D) penultimate features.
    """

    digit: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    features: np.ndarray

    def select(self, mask: np.ndarray) -> EvaluatorPredictions:
        """The predictions of the images where ``mask`` (N,) is true (or of the indices it lists)."""
        return EvaluatorPredictions(self.digit[mask], self.foreground[mask], self.background[mask], self.features[mask])

    def specs(self) -> list[DigitSpec | None]:
        """The most likely spec of each image (``None`` where foreground and background come out equal)."""
        out: list[DigitSpec | None] = []
        for d, f, b in zip(self.digit.argmax(1), self.foreground.argmax(1), self.background.argmax(1), strict=True):
            out.append(DigitSpec(int(d), COLOURS[f], COLOURS[b]) if f != b else None)
        return out


@torch.no_grad()
def predict(model: DigitsEvaluator, images: np.ndarray, batch_size: int = 500) -> EvaluatorPredictions:
    """Runs ``model`` (in eval mode) on (N, 32, 32, 3) uint8 images, in batches."""
    model.eval()
    device = next(model.parameters()).device
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(device)
        feats = model.features(x)
        logits = (model.digit_head(feats), model.foreground_head(feats), model.background_head(feats))
        for part, value in zip(parts, (*(lg.softmax(-1) for lg in logits), feats), strict=True):
            part.append(value.double().cpu().numpy())
    if not parts[0]:
        raise ValueError("no images to evaluate")
    return EvaluatorPredictions(*(np.concatenate(p) for p in parts))


def adherence(predictions: EvaluatorPredictions, specs: Sequence[DigitSpec]) -> dict[str, float]:
    """Fraction of images whose predicted digit / foreground / background (and all three) match ``specs``."""
    if len(specs) != len(predictions.digit):
        raise ValueError(f"{len(specs)} specs for {len(predictions.digit)} predictions")
    digits, fgs, bgs = spec_labels(specs)
    hits = {
        "digit": predictions.digit.argmax(1) == digits,
        "foreground": predictions.foreground.argmax(1) == fgs,
        "background": predictions.background.argmax(1) == bgs,
    }
    hits["all"] = hits["digit"] & hits["foreground"] & hits["background"]
    return {name: float(hit.mean()) for name, hit in hits.items()}


def head_accuracies(model: DigitsEvaluator, dataset: DigitsDataset) -> dict[str, float]:
    """Per-head accuracy (and all three right) of ``model`` on a rendered dataset."""
    return adherence(predict(model, dataset.images), dataset.specs)


def fid_digits(model: DigitsEvaluator, images_a: np.ndarray, images_b: np.ndarray) -> float:
    """FID between two (N, 32, 32, 3) uint8 image sets in the evaluator's feature space."""
    return fid_from_features(predict(model, images_a).features, predict(model, images_b).features)


def digits_inception_score(model: DigitsEvaluator, images: np.ndarray, splits: int = 1) -> float:
    """Inception Score of the digit head (1..10): are images recognisable, and all digits used?"""
    return inception_score(predict(model, images).digit, splits=splits)


# --- training -------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light corruptions a generator's output may show: colour drift, pixel noise, blur.

    Per image: each channel scaled by 1 +- ~5% and shifted by +- ~0.06 (of the [-1, 1] range), Gaussian
    noise with a standard deviation up to 0.1, and a 3x3 blur on a third of the images.
    """
    n = x.shape[0]
    scale = 1.0 + 0.05 * torch.randn(n, 3, 1, 1, generator=generator)
    shift = 0.06 * torch.randn(n, 3, 1, 1, generator=generator)
    x = x * scale + shift
    sigma = 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    x = x + sigma * torch.randn(x.shape, generator=generator)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = (torch.rand(n, 1, 1, 1, generator=generator) < 1 / 3).float()
    return (blur * blurred + (1 - blur) * x).clamp(-1.2, 1.2)


def train_evaluator(
    seed: int = 0,
    steps: int = 1000,
    *,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    combos: str = "all",
    augment: bool = True,
    config: EvaluatorConfig | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
) -> DigitsEvaluator:
    """Trains an evaluator from scratch on fresh renders of train-split source digits.

    Every batch is a new ``make_dataset(batch_size, split="train", combos=combos, seed=...)`` draw
    (unlimited data: only the 1438 source digits repeat, never an exact image). Adam with a one-cycle
    schedule (linear warm-up over 5% of the steps, cosine decay to zero), cross-entropy summed over
    the three heads. Deterministic for a seed on a given machine and thread count.

    Args:
        seed: seeds the weights, the data stream and the augmentation.
        steps: optimiser steps.
        batch_size: images per step.
        learning_rate: peak Adam learning rate.
        weight_decay: AdamW decoupled weight decay.
        combos: which combinations to render (``"all"``: the evaluator must also judge held-out prompts).
        augment: apply ``_augment`` to the training batches.
        config: architecture (default ``EvaluatorConfig()``).
        log: called with a progress line every ``log_every`` steps.
        log_every: steps between log lines.

    Returns:
        The trained model, in eval mode.
    """
    torch.manual_seed(seed)
    model = DigitsEvaluator(config)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        # One independent data seed per step: (seed, step) never collides across steps or runs.
        batch = make_dataset(batch_size, split="train", combos=combos, seed=seed * 1_000_003 + step)
        x = images_to_tensor(batch.images)
        if augment:
            x = _augment(x, generator)
        targets = [torch.from_numpy(t) for t in batch.labels()]
        logits = model(x)
        loss = sum(F.cross_entropy(lg, t) for lg, t in zip(logits, targets, strict=True))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += float(loss.detach())
        if log is not None and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  {elapsed:.0f}s")
            running = 0.0
    return model.eval()


# --- files ----------------------------------------------------------------------------------------------


def save_evaluator(model: DigitsEvaluator, path: str | Path, *, extra_metadata: dict | None = None) -> Path:
    """Writes the weights (fp32) and the config (metadata ``config``, JSON) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
        "palette": json.dumps({name: list(PALETTE[name]) for name in model.config.colours}),
    }
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an evaluator file (config, palette, training settings and measured accuracies)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def shipped_evaluator_path() -> resources.abc.Traversable:
    """The evaluator file inside the installed package."""
    return resources.files(__package__).joinpath(_SHIPPED)


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsEvaluator:
    """Rebuilds an evaluator from a safetensors file (the shipped one by default), in eval mode.

    Raises:
        ValueError: the file is not a digits evaluator, is of a newer format, or was trained on
            another palette than this version of quantdiff renders.
    """
    if path is None:
        with resources.as_file(shipped_evaluator_path()) as shipped:
            return load_evaluator(shipped, device)
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a digits evaluator file (format {metadata.get('format')!r})")
    if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {metadata['format_version']}; this quantdiff reads {FORMAT_VERSION}"
        )
    config = EvaluatorConfig.from_json(metadata["config"])
    palette = json.loads(metadata.get("palette", "{}"))
    current = {name: list(PALETTE.get(name, ())) for name in config.colours}
    if config.colours != COLOURS or palette != current:
        raise ValueError(f"{path} was trained on another palette ({palette}); retrain it for {current}")
    model = DigitsEvaluator(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()
