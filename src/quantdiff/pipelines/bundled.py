"""Model names that quantdiff provides itself, accepted wherever a model folder is.

``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-pixart`` are random-weight pipelines built from
configs (see ``tiny.py``) on first use and cached, so ``quantdiff serve tiny-sd15`` works on a fresh
machine with no download. The cache is ``$QUANTDIFF_CACHE`` or ``~/.cache/quantdiff``.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantdiff.atomic import atomic_directory
from quantdiff.pipelines.tiny import TINY_ARCHITECTURES, build_tiny_pipeline

BUNDLED = tuple(f"tiny-{arch}" for arch in TINY_ARCHITECTURES)


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTDIFF_CACHE", Path.home() / ".cache" / "quantdiff"))


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An existing path as is; a bundled name as the path of its (built on demand) folder."""
    text = str(name_or_path)
    if Path(text).exists() or text not in BUNDLED:
        return text
    folder = cache_dir() / "models" / text
    if not (folder / "model_index.json").is_file():
        with atomic_directory(folder, overwrite=folder.exists()) as staging:
            build_tiny_pipeline(text.removeprefix("tiny-")).save_pretrained(staging)
    return str(folder)
