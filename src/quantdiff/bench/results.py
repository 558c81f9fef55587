"""What ``quantdiff bench`` hands back, on the CPU and on CUDA alike: rows, the machine description, the whole
result and its JSON file (the schema is documented in the ``quantdiff.bench`` package docstring).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil
import torch

from quantdiff.bench.settings import BenchSettings
from quantdiff.errors import QuantDiffError

FORMAT_NAME = "quantdiff-bench"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BenchRow:
    """One measurement; the JSON schema is in the ``quantdiff.bench`` package docstring."""

    model: str
    latent: int
    latent_shape: tuple[int, ...]
    batch: int
    method: str
    label: str
    kind: str
    compiled: bool
    status: str
    reason: str = ""
    median_s: float | None = None
    min_s: float | None = None
    times_s: tuple[float, ...] = ()
    group: int | None = None
    fp32_median_s: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_vs_best_fp32: float | None = None
    best_fp32: str | None = None
    bf16_median_s: float | None = None
    speedup_vs_bf16: float | None = None
    speedup_vs_best_bf16: float | None = None
    best_bf16: str | None = None
    weight_bytes: int | None = None
    weight_ratio_vs_fp32: float | None = None
    stored_bytes: int | None = None
    kernel_bytes: int | None = None
    compile_added_bytes: int | None = None
    held_bytes: int | None = None
    peak_rss_bytes: int | None = None
    setup_peak_rss_bytes: int | None = None
    step_peak_extra_bytes: int | None = None
    device_peak_bytes: int | None = None
    sqnr_db: float | None = None
    identical_to_fp32: bool = False
    setup_s: float | None = None
    first_call_s: float | None = None
    one_time_s: float | None = None
    path: str | None = None
    path_detail: str = ""
    integer_layers: int | None = None
    reference_layers: int | None = None
    widened_layers: int | None = None
    quantized_layers: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; JSON has no inf / nan: they become None (``sqnr_db``: see ``identical_to_fp32``)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchRow:
        """Inverse of :meth:`to_dict` (lists back to tuples; unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class MachineInfo:
    """Where the numbers come from: CPU, its int8-relevant flags, memory, software, threads, load."""

    cpu: str
    logical_cpus: int
    physical_cores: int | None
    usable_cpus: int
    flags: Mapping[str, bool]
    memory_bytes: int
    torch: str
    cpu_capability: str
    threads: int
    quantized_engine: str
    python: str
    system: str
    packages: Mapping[str, str | None]
    int8_kernels: str
    load_average: tuple[float, float, float]
    gpu: str | None = None  # on CUDA: the device's name, memory and the CUDA version torch was built with
    gpu_memory_bytes: int | None = None
    cuda: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return _plain(self)

    def describe(self) -> list[str]:
        """Markdown bullet lines."""
        flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in self.flags.items())
        packages = ", ".join(f"{name} {version or 'not installed'}" for name, version in self.packages.items())
        cores = f"{self.physical_cores} physical cores, " if self.physical_cores else ""
        return [
            f"- CPU: {self.cpu} ({self.logical_cpus} logical CPUs, {cores}{self.usable_cpus} usable by this process)",
            f"- flags: {flags}",
            f"- memory: {self.memory_bytes / 2**30:.1f} GiB; load average at start {self.load_average[0]:.2f}",
            f"- torch {self.torch} (ATen CPU capability {self.cpu_capability}), {self.threads} threads, "
            f"quantized engine {self.quantized_engine}; python {self.python}; {self.system}",
            f"- int8 kernels: {self.int8_kernels}",
            f"- packages: {packages}",
        ] + ([f"- GPU: {self.gpu} ({self.gpu_memory_bytes / 2**30:.0f} GiB), CUDA {self.cuda}"] if self.gpu else [])


@dataclass(frozen=True)
class BenchResult:
    """Everything one :func:`run_benchmark` measured."""

    settings: BenchSettings
    machine: MachineInfo
    rows: tuple[BenchRow, ...]
    cases: tuple[Mapping[str, Any], ...]
    started: str
    duration_s: float
    load_average_end: float
    command: str = ""
    complete: bool = True  # False in the snapshots run_benchmark hands to on_case

    def to_dict(self) -> dict[str, Any]:
        """The JSON file's content."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "started": self.started,
            "duration_s": self.duration_s,
            "command": self.command,
            "complete": self.complete,
            "load_average_end": self.load_average_end,
            "machine": self.machine.to_dict(),
            "settings": self.settings.to_dict(),
            "cases": [_plain(case) for case in self.cases],
            "rows": [row.to_dict() for row in self.rows],
        }


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses and mappings to dicts, tuples to lists, non-finite floats to None."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
_PEERS = ("torchao", "optimum-quanto", "onnxruntime", "onnx", "onnxscript", "openvino", "nncf", "sdnq")
_PACKAGES = ("diffusers", *_PEERS, "accelerate")


def machine_info(device: str = "cpu") -> MachineInfo:
    """Describe this machine and process (CPU model and flags from /proc/cpuinfo where it exists), and the GPU
    when ``device`` is a CUDA device."""
    from importlib import metadata

    from quantdiff.nn import kernel_support

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu in ("", platform.processor(), platform.machine()):
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    support = kernel_support()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = {}
    if torch.device(device).type == "cuda":
        properties = torch.cuda.get_device_properties(torch.device(device))
        gpu = {"gpu": properties.name, "gpu_memory_bytes": properties.total_memory, "cuda": torch.version.cuda}
    return MachineInfo(
        cpu=cpu,
        logical_cpus=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        usable_cpus=usable,
        flags=MappingProxyType({flag: flag in flags for flag in _FLAGS}),
        memory_bytes=psutil.virtual_memory().total,
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        quantized_engine=torch.backends.quantized.engine,
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
        packages=MappingProxyType(packages),
        int8_kernels=f"{support.describe()} ({support.probe})",
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0),
        **gpu,
    )


def read_json(path: str | os.PathLike) -> BenchResult:
    """A result written by :func:`write_json` (e.g. to resume a run: ``run_benchmark(..., previous=...)``).

    Non-finite numbers were written as ``null`` and stay ``None`` (``identical_to_fp32`` keeps the meaning
    of an infinite SQNR). Raises :class:`QuantDiffError` for a file that is not a quantdiff-bench result.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise QuantDiffError(f"cannot read the benchmark result '{path}': {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise QuantDiffError(f"'{path}' is not a {FORMAT_NAME} result")
    if data.get("version") != FORMAT_VERSION:
        raise QuantDiffError(
            f"'{path}' is {FORMAT_NAME} version {data.get('version')}; this quantdiff reads version {FORMAT_VERSION}"
        )
    try:
        machine = dict(data["machine"])
        machine["flags"] = MappingProxyType(machine["flags"])
        machine["packages"] = MappingProxyType(machine["packages"])
        machine["load_average"] = tuple(machine["load_average"])
        rows = tuple(BenchRow.from_dict(row) for row in data["rows"])
        return BenchResult(
            settings=BenchSettings.from_dict(data["settings"]),
            machine=MachineInfo(**machine),
            rows=rows,
            cases=tuple(MappingProxyType(case) for case in data["cases"]),
            started=data["started"],
            duration_s=float(data["duration_s"]),
            load_average_end=float(data["load_average_end"]),
            command=data.get("command", ""),
            complete=bool(data.get("complete", True)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise QuantDiffError(f"'{path}' is a damaged {FORMAT_NAME} result ({error!r})") from None


def write_json(result: BenchResult, path: str | os.PathLike) -> Path:
    """Write the result as JSON (schema in the module docstring); infinities become ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    return path
