"""Calibration prompts: the default set shipped with quantdiff, or a user's file (one prompt per line)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from quantdiff.errors import CalibrationError


def default_prompts() -> list[str]:
    """The 64 prompts written for quantdiff: varied subjects, styles, and text inside images."""
    text = resources.files("quantdiff").joinpath("data/calibration_prompts.txt").read_text()
    return _lines(text)


def read_prompts(path: str | os.PathLike | None) -> list[str]:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped); defaults if ``None``."""
    if path is None:
        return default_prompts()
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"prompt file '{path}' does not exist")
    prompts = _lines(file.read_text())
    if not prompts:
        raise CalibrationError(f"prompt file '{path}' holds no prompts")
    return prompts


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
