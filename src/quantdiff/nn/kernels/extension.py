"""Building quantdiff's C++ extensions (``csrc/``), once per process each, with the reason when one cannot be.

Each library is JIT-built by ``torch.utils.cpp_extension.load`` on its first use and then loaded from torch's
extension cache. torch hashes the listed sources and the flags, not the headers they include, so the
hash of ``csrc/amx_common.h`` goes into the flags: editing the shared header rebuilds every extension.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["CSRC", "load_extension_once"]

CSRC = Path(__file__).parent / "csrc"
_SHARED_HEADER = CSRC / "amx_common.h"

_lock = threading.Lock()
_outcomes: dict[str, tuple[str, float]] = {}  # library name -> ("" or why it is not there, build seconds)


def load_extension_once(name: str, source: Path, after_load: Callable[[], None] | None = None) -> tuple[str, float]:
    """Build (or load from the cache) library ``name`` from ``source`` once per process, whatever happens to the
    callers' caches: a library's ops can be registered only once (a second, rebuilt copy of it would abort the
    process). ``after_load`` runs once after a successful load (e.g. registering fake kernels). Returns
    ``("", seconds)`` or ``(reason, 0.0)``: no compiler, no headers and compile errors are reasons, not errors."""
    with _lock:
        if name not in _outcomes:
            _outcomes[name] = _build(name, source, after_load)
        return _outcomes[name]


def _build(name: str, source: Path, after_load: Callable[[], None] | None) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        header_hash = hashlib.sha256(_SHARED_HEADER.read_bytes()).hexdigest()[:12]
        cpp_extension.load(
            name,
            [str(source)],
            extra_cflags=["-O3", "-fopenmp", f"-DQD_AMX_COMMON_HASH={header_hash}"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no headers, a compile error: the extensions are optional
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the C++ extension did not build ({type(error).__name__}: {first[:200]})", 0.0
    if after_load is not None:
        after_load()
    return "", time.perf_counter() - start
