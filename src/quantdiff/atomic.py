"""Write output folders atomically: all of it or nothing.

Every folder quantdiff writes (calibration data, quantized models) is first written to a temporary
sibling and renamed into place only when complete, so an error or Ctrl-C never leaves a half-written
folder that a later command would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantdiff.errors import QuantDiffError


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``target`` when the block exits without error.

    Args:
        target: final folder path. Its parent is created if needed.
        overwrite: replace an existing ``target``; otherwise an existing one is an error, raised before
            any work is done.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise QuantDiffError(f"output '{target}' already exists: choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
