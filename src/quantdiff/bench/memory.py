"""Memory measurement of ``quantdiff bench``: settled RSS, peak RSS over a block, the weight bytes a model holds
(what is counted is described in the ``quantdiff.bench`` package docstring), and why a child process died.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import signal
import threading
from typing import Any

import psutil
import torch
from torch import Tensor, nn


def rss() -> int:
    """This process's resident set size in bytes, as it is (see :func:`settled_rss`)."""
    return psutil.Process().memory_info().rss


def settled_rss() -> int:
    """RSS after gc and glibc ``malloc_trim``: freed heap pages go back to the OS, so RSS shows what is held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def exit_diagnosis(returncode: int) -> str:
    """A child process's exit code in words; SIGKILL without a traceback is the kernel's OOM killer in practice."""
    killed = " (killed: most likely out of memory)" if returncode == -signal.SIGKILL else ""
    return f"exited with {returncode}{killed}"


def peak_rss() -> int | None:
    """This process's peak RSS in bytes (VmHWM: since it started or since the last reset), ``None`` off Linux."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return peak_rss() is not None


class PeakWatch:
    """Peak RSS over a block: VmHWM reset at entry where possible, else a 2 ms RSS sampler thread."""

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakWatch:
        self.start = settled_rss()
        if not _reset_peak_rss():
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss())
        else:
            self.peak = max(peak_rss() or 0, rss())

    @property
    def extra(self) -> int:
        """Peak above the RSS at entry."""
        return max(0, self.peak - self.start)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights ``model`` holds, each storage counted once (see the module docstring)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set[tuple[str, int]] = set()
    # Keys by id() hold only while the object lives; torch.ao's _weight_bias() hands back a fresh tensor per
    # call, whose id the next one would reuse (it undercounted 340 packed layers 4x), so each stays alive.
    counted: list[Tensor] = []
    total = 0

    def add(tensor: Tensor) -> None:
        nonlocal total
        if is_traceable_wrapper_subclass(tensor):  # torchao / quanto: count the inner tensors
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                add(getattr(tensor, name))
            return
        if tensor.is_meta:
            return
        if tensor.is_mkldnn:
            key, size = ("mkldnn", id(tensor)), int(torch.ops.mkldnn._nbytes(tensor))
        elif tensor.is_quantized:
            key, size = ("quantized", id(tensor)), tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            key, size = ("storage", storage.data_ptr()), storage.nbytes()
        if key not in seen:
            seen.add(key)
            counted.append(tensor)
            total += size

    try:
        from torch.ao.nn.quantized.modules.linear import LinearPackedParams
    except ImportError:  # pragma: no cover - torch without torch.ao
        LinearPackedParams = ()  # noqa: N806
    inside_graphs: set[int] = set()
    for module in model.modules():
        if id(module) in inside_graphs:
            continue
        if isinstance(module, torch.fx.GraphModule):
            # PT2E: only what the graph reads. Its submodules still hold the fp32 parameters the export
            # lifted, which convert_pt2e replaced by int8 constants (they are the reference's, shared).
            inside_graphs.update(id(sub) for sub in module.modules())
            for node in module.graph.nodes:
                if node.op == "get_attr":
                    value = _get_attr(module, node.target)
                    if isinstance(value, Tensor):
                        add(value)
            continue
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
            if tensor is not None:
                add(tensor)
        for value in vars(module).values():  # other tensor attributes
            if isinstance(value, Tensor):
                add(value)
        if LinearPackedParams and isinstance(module, LinearPackedParams):  # torch.ao: packed int8 weight
            weight, bias = module._weight_bias()
            add(weight)
            if bias is not None:
                add(bias)
        total += int(getattr(module, "kernel_bytes", 0) or 0)  # quantdiff: the prepacked kernel copy
    return total


def _get_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
