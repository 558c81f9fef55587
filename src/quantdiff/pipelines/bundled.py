"""Model names that quantdiff provides itself, accepted wherever a model folder is.

``digits-sd`` (Stable Diffusion layout) and ``digits-sd3`` (SD3 / MMDiT layout) are small text-to-image
models trained on coloured digits by ``scripts/train_digits.py``; their fp16 weights ship inside the
package with the digits demo (``quantdiff/demo/digits/models``), with their own calibration and
evaluation prompts.

``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-pixart`` are random-weight pipelines built from
configs (``quantdiff.testing.tiny``) on first use and cached, so ``quantdiff serve tiny-sd15`` works on
a fresh machine with no download. The cache is ``$QUANTDIFF_CACHE`` or ``~/.cache/quantdiff``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from quantdiff.atomic import atomic_directory
from quantdiff.errors import QuantDiffError
from quantdiff.testing.tiny import TINY_ARCHITECTURES, build_tiny_pipeline

TINY = tuple(f"tiny-{arch}" for arch in TINY_ARCHITECTURES)
TRAINED = ("digits-sd", "digits-sd3")
BUNDLED = TRAINED + TINY


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTDIFF_CACHE", Path.home() / ".cache" / "quantdiff"))


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An existing path as is; a bundled name as the path of its (built on demand) folder."""
    text = str(name_or_path)
    if Path(text).exists() or text not in BUNDLED:
        return text
    if text in TRAINED:
        return str(trained_model_folder(text))
    folder = cache_dir() / "models" / text
    if not (folder / "model_index.json").is_file():
        with atomic_directory(folder, overwrite=folder.exists()) as staging:
            build_tiny_pipeline(text.removeprefix("tiny-")).save_pretrained(staging)
    return str(folder)


def trained_model_folder(name: str) -> Path:
    """The shipped folder of a trained bundled model (inside the installed package)."""
    folder = Path(str(resources.files("quantdiff.demo.digits").joinpath("models", name)))
    if not (folder / "model_index.json").is_file():
        raise QuantDiffError(
            f"bundled model '{name}' is missing from this install ({folder}); "
            f"train it with: python scripts/train_digits.py --model {name.removeprefix('digits-')}"
        )
    return folder
