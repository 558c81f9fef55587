"""``torch.compile`` hygiene of ``quantdiff bench``: inductor config changes a peer makes, the settings every
compiled call runs under, the count of compiled graphs, freeing compiled graphs, a private kernel cache.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch


@contextlib.contextmanager
def record_inductor_changes(changes: dict[str, Any]) -> Iterator[None]:
    """Undo changes a peer makes to inductor's global config while it quantizes, remembering them in
    ``changes`` so that only its own compile uses them (torchao sets its recommended flags)."""
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    precision = torch.get_float32_matmul_precision()  # torchao sets "high": every method keeps the default
    try:
        yield
    finally:
        after = inductor_config.get_config_copy()
        for key, value in after.items():
            if key in before and before[key] != value:
                changes[key] = value
                setattr(inductor_config, key, before[key])
        torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def compile_settings(inductor_changes: Mapping[str, Any], freezing: bool) -> Iterator[None]:
    """What every call of a compiled method runs under: its peer's inductor changes, ``freezing``, no FX-graph
    cache (a cold compile, as a user's first), and dynamo compiling each model as it would alone.

    The models of a group share their forward code (one ``UNet2DConditionModel.forward``), so dynamo sees
    each new model as a recompilation of the same frames: it needs cache room for all of them, and its
    automatic-dynamic-shapes rule (and its profile of earlier runs on disk) would otherwise compile the second
    and later models, or a second latent size, with symbolic shapes (measured: 3-4x longer compiles; it also
    broke torchao's tensor-subclass weights). With ``dynamic=False`` at the call, every compile is static.
    Every call, not only the first: models with graph breaks (diffusers' SD3) share resume frames, and a
    guard failure on one of them recompiles in the middle of the timing rounds; that compile must be the same
    kind (frozen, static), or qlinear's lowering fails without freezing.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    dynamo: dict[str, Any] = {"automatic_dynamic_shapes": False}
    if hasattr(dynamo_config, "automatic_dynamic_local_pgo"):  # profiles of earlier runs, kept on disk
        dynamo["automatic_dynamic_local_pgo"] = False
    limits = [name for name in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, name)]
    if limits:  # the name changed across torch versions
        dynamo[limits[0]] = 64
    inductor = {**inductor_changes, "freezing": freezing, "fx_graph_cache": False}
    with inductor_config.patch(inductor), dynamo_config.patch(dynamo):
        yield


def compiled_graph_count() -> int:
    """How many graphs dynamo has compiled in this process so far (to spot compiles inside timed rounds)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


_GENERATED_MODULES = "torch._inductor.runtime.compile_tasks."


def free_compiled() -> None:
    """Drop every compiled graph of this process, with the weights they hold.

    ``torch._dynamo.reset()`` alone frees dynamo's code caches but not inductor's loaded output modules,
    and with freezing those hold the frozen weight copies. ``clear_caches()`` empties inductor's code cache,
    but torch 2.13 also registers each generated module in ``sys.modules`` under
    ``torch._inductor.runtime.compile_tasks.<hash>``, and that reference keeps its constants alive:
    measured, a frozen SD1.5 UNet kept 3.3 GiB (282 prepacked mkldnn weights) after everything else was
    freed, and dropping those entries returned it.
    """
    from torch._inductor.utils import clear_caches

    torch._dynamo.reset()
    clear_caches()
    for name in [name for name in sys.modules if name.startswith(_GENERATED_MODULES)]:
        del sys.modules[name]


@contextlib.contextmanager
def private_inductor_cache() -> Iterator[None]:
    """Compile into a new temporary directory instead of the per-user inductor cache (``/tmp/torchinductor_<user>``).

    So that every compile of a run is a user's first one (no kernels reused from earlier runs), and so that
    a run killed while the C++ compiler was writing a kernel cannot poison later runs: inductor keys its
    ``.so`` files by source hash and loads an existing file as is (measured: a truncated ``.so`` left by a
    killed run failed a later run's compile with "file too short").
    """
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with tempfile.TemporaryDirectory(prefix="quantdiff-inductor-") as directory, temporary_cache_dir(directory):
        yield
