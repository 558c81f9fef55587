"""Write output folders atomically: all of it or nothing.

Every folder quantdiff writes (calibration data, quantized models) is first written to a temporary
sibling and renamed into place only when complete, so an error or Ctrl-C never leaves a half-written
folder that a later command would trust. A process killed outright (``kill -9``, out of memory) cannot
clean up: it leaves its hidden ``.NAME.partial-*`` sibling, which no loader takes for a finished folder
(the file that marks one, ``quantdiff.json`` or ``index.json``, is written last) and which can be deleted.
A full disk (or a file-size limit) is one :class:`QuantDiffError` that says so, with nothing left behind.
"""

from __future__ import annotations

import errno
import os
import re
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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would make the finished folder private
    except OSError as error:
        raise _write_error(target, error) from None
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if _error_code(error) in _CANNOT_WRITE:
            raise _write_error(target, error) from None
        raise


# Writers in native code (safetensors) report the OS error in their message: "... (os error 28)".
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_CANNOT_WRITE = _FULL | {errno.EROFS}


def _error_code(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    match = _OS_ERROR_IN_MESSAGE.search(str(error))
    return int(match.group(1)) if match else None


def _write_error(target: Path, error: BaseException) -> QuantDiffError:
    code = _error_code(error)
    reason = os.strerror(code) if code else str(error)
    if code in _FULL:
        advice = "free some space (or raise the file-size limit) on that disk, or choose another --out, and run again"
    else:
        advice = "check that the folder is writable, or choose another --out"
    return QuantDiffError(f"could not write '{target}': {reason}; nothing was written: {advice}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
