"""Model names that quantdiff provides itself, accepted wherever a model folder is.

``digits-sd`` (Stable Diffusion layout) and ``digits-sd3`` (SD3 / MMDiT layout) are small text-to-image
models trained on coloured digits by ``scripts/train_digits.py``; ``digits-sd-turbo`` is ``digits-sd``
distilled to 1-4 steps (a frozen contrastive CLIP text encoder, latent consistency distillation,
``LCMScheduler``; evaluated at 2 steps). Their fp16 weights ship inside the package with the digits demo
(``quantdiff/demo/digits/models``), with their own calibration and evaluation prompts.

``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-pixart`` are random-weight pipelines built from
configs (``quantdiff.testing.tiny``) on first use and cached, so ``quantdiff serve tiny-sd15`` works on
a fresh machine with no download. The cache is ``$QUANTDIFF_CACHE`` or ``~/.cache/quantdiff``.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

from quantdiff.atomic import atomic_directory
from quantdiff.errors import QuantDiffError
from quantdiff.testing.tiny import TINY_ARCHITECTURES, build_tiny_pipeline

TINY = tuple(f"tiny-{arch}" for arch in TINY_ARCHITECTURES)
TRAINED = ("digits-sd", "digits-sd3", "digits-sd-turbo")
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


def unknown_model_hint(text: str) -> str:
    """What to add when ``text``, given as a model, is neither an existing path nor a bundled name.

    A bare name (no folder separator) was probably meant as a bundled name: the hint names the closest one
    and lists them all. A path gets no hint (an empty string).
    """
    if text in BUNDLED:  # the Python API takes folders; the command line resolves bundled names itself
        return f"; '{text}' is a bundled model name: pass resolve_model('{text}') (quantdiff.pipelines.bundled)"
    if "/" in text or os.sep in text or text.startswith(("~", ".")):
        return ""
    close = difflib.get_close_matches(text, BUNDLED, n=1, cutoff=0.6)
    guess = f": did you mean '{close[0]}'?" if close else ""
    return f", and it is not a bundled model name{guess} (bundled: {', '.join(BUNDLED)})"


def trained_model_folder(name: str) -> Path:
    """The shipped folder of a trained bundled model (inside the installed package)."""
    folder = Path(str(resources.files("quantdiff.demo.digits").joinpath("models", name)))
    if not (folder / "model_index.json").is_file():
        model = name.removeprefix("digits-sd-").removeprefix("digits-")  # digits-sd-turbo: --model turbo
        raise QuantDiffError(
            f"bundled model '{name}' is missing from this install ({folder}); "
            f"train it with: python scripts/train_digits.py --model {model}"
        )
    return folder
