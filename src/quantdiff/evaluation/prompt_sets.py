"""The prompt sets a model folder can carry: what to calibrate on and what to evaluate with.

A pipeline folder may hold ``prompts/calibration.txt`` (one prompt per line) and ``prompts/evaluation.json``
next to ``model_index.json``; diffusers ignores both. The bundled digits models carry their own, so
``quantdiff calibrate digits-sd`` and ``quantdiff eval digits-sd`` use prompts of their domain without
options. ``evaluation.json``::

    {"version": 1,
     "generation": {"steps": 25, "guidance": 5.0},           # optional defaults for evaluation runs
     "prompts": [{"prompt": "a red seven on a white background",
                  "spec": {"digit": 7, "foreground": "red", "background": "white"},  # or null
                  "heldout": false}, ...]}

A ``spec`` says what the image must show: a digits demo ``DigitSpec`` (``quantdiff.demo.digits.data``),
which the digits evaluator can check; prompts without one are scored only by the metrics that need no
ground truth. The digits models' own sets are made by ``quantdiff.demo.digits.prompts``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantdiff.calibration.prompts import read_prompts
from quantdiff.demo.digits.data import DigitSpec
from quantdiff.errors import QuantDiffError
from quantdiff.jsonfile import read_json_object

PROMPTS_FOLDER = "prompts"
CALIBRATION_FILE = "calibration.txt"
EVALUATION_FILE = "evaluation.json"
VERSION = 1


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt and, where known, what its image must show."""

    text: str
    spec: DigitSpec | None = None
    heldout: bool = False


@dataclass(frozen=True)
class EvaluationSet:
    """A model's evaluation prompts and its preferred generation settings (``None``: pipeline default)."""

    prompts: tuple[EvalPrompt, ...]
    steps: int | None = None
    guidance: float | None = None
    source: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "generation": {"steps": self.steps, "guidance": self.guidance},
            "prompts": [
                {
                    "prompt": p.text,
                    "spec": None if p.spec is None else vars(p.spec),
                    "heldout": p.heldout,
                }
                for p in self.prompts
            ],
        }


def read_calibration_prompts(folder: str | os.PathLike) -> list[str] | None:
    """The folder's own calibration prompts, or ``None`` when it carries none."""
    path = Path(folder) / PROMPTS_FOLDER / CALIBRATION_FILE
    return read_prompts(path) if path.is_file() else None


def read_evaluation_set(folder: str | os.PathLike) -> EvaluationSet | None:
    """The folder's own evaluation set, or ``None`` when it carries none."""
    path = Path(folder) / PROMPTS_FOLDER / EVALUATION_FILE
    if not path.is_file():
        return None
    data = read_json_object(path, QuantDiffError, "write it with quantdiff.evaluation.write_prompt_sets")
    if int(data.get("version", 0)) > VERSION:
        raise QuantDiffError(f"{path} has version {data['version']}; this quantdiff reads up to {VERSION}")
    try:
        prompts = tuple(
            EvalPrompt(
                text=str(row["prompt"]),
                spec=None if row.get("spec") is None else DigitSpec(**row["spec"]),
                heldout=bool(row.get("heldout", False)),
            )
            for row in data["prompts"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise QuantDiffError(f"{path}: malformed prompt entry ({error})") from error
    if not prompts:
        raise QuantDiffError(f"{path} holds no prompts")
    generation = data.get("generation") or {}
    return EvaluationSet(prompts, generation.get("steps"), generation.get("guidance"), source=str(path))


def write_prompt_sets(
    folder: str | os.PathLike, calibration: list[str], evaluation: EvaluationSet
) -> tuple[Path, Path]:
    """Writes both prompt files into a pipeline folder."""
    target = Path(folder) / PROMPTS_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    calibration_path = target / CALIBRATION_FILE
    calibration_path.write_text("\n".join(calibration) + "\n")
    evaluation_path = target / EVALUATION_FILE
    evaluation_path.write_text(json.dumps(evaluation.to_dict(), indent=1) + "\n")
    return calibration_path, evaluation_path
