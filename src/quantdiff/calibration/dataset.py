"""Recorded denoiser inputs (a calibration set): storage and replay.

A :class:`CalibrationSet` is a list of denoiser calls, each the exact keyword arguments the pipeline
passed (``sample``, ``timestep``, ``encoder_hidden_states``, ``added_cond_kwargs``, ...), plus the
settings they were recorded with. Replaying it runs the denoiser alone, without text encoders, scheduler
or VAE, which is what calibration and layer-wise evaluation need.

On disk::

    calib/
      index.json                  # format, settings, denoiser config hash, one entry per record
      records-00000.safetensors   # tensors, keyed "<record>/<argument path>"
      records-00001.safetensors   # further shards once one passes ~1 GB

Non-tensor arguments (``return_dict=False``, ``None``s, flags) are kept in the index as JSON; nested
dicts such as SDXL's ``added_cond_kwargs`` are flattened to dotted paths.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quantdiff.atomic import atomic_directory
from quantdiff.errors import CalibrationError
from quantdiff.jsonfile import check_inside, one_line, read_json_object
from quantdiff.pipelines.loading import config_hash
from quantdiff.progress import Progress

INDEX_NAME = "index.json"
FORMAT_NAME = "quantdiff-calibration"
FORMAT_VERSION = 1
_SHARD_BYTES = 1 << 30


@dataclass
class CalibrationRecord:
    """One recorded denoiser call.

    Attributes:
        inputs: the call's keyword arguments (tensors on CPU, nested dicts, plain values).
        prompt_index: which calibration prompt produced it.
        step_index: denoising step, 0 being the first (noisiest) one.
        timestep: the scheduler timestep of the call.
    """

    inputs: dict[str, Any]
    prompt_index: int
    step_index: int
    timestep: float


@dataclass
class CalibrationSet:
    """Recorded denoiser calls plus the settings they were recorded with.

    Attributes:
        records: the calls, in recording order.
        info: settings and provenance: ``model``, ``denoiser_class``, ``denoiser_config_hash``, ``mode``,
            ``num_inference_steps``, ``step_indices``, ``guidance_scale``, ``height``, ``width``,
            ``seed``, ``prompts``.
    """

    records: list[CalibrationRecord]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[CalibrationRecord]:
        return iter(self.records)

    def check_matches(self, denoiser: nn.Module) -> None:
        """Raise :class:`CalibrationError` if this data was recorded on a different denoiser."""
        recorded = self.info.get("denoiser_config_hash")
        actual = config_hash(denoiser.config)
        if recorded != actual:
            raise CalibrationError(
                f"calibration data was recorded on another model ({self.info.get('denoiser_class')} from "
                f"'{self.info.get('model')}', config hash {str(recorded)[:12]}) than this "
                f"{type(denoiser).__name__} (config hash {actual[:12]}): run `quantdiff calibrate` on this model"
            )
        if not self.records:
            return
        # Same config, yet the tensors may not fit (edited, or recorded at shapes this model cannot take):
        # one call with the first record says so here rather than as a traceback mid-quantization. Every
        # record has the first one's shapes (checked by load), so every record fits when it does.
        parameter = next(denoiser.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        try:
            with torch.no_grad():
                denoiser(**_to(self.records[0].inputs, device, dtype))
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as error:
            shapes = ", ".join(
                f"{path} {tuple(tensor.shape)}" for path, tensor in _flatten(self.records[0].inputs)[0].items()
            )
            raise CalibrationError(
                f"calibration data from '{self.info.get('model')}' does not fit this {type(denoiser).__name__} "
                f"({one_line(error, 160)}; recorded {shapes}): run `quantdiff calibrate` on this model"
            ) from None

    def split(self, holdout_prompts: int) -> tuple[CalibrationSet, CalibrationSet]:
        """Split by prompt: records of the last ``holdout_prompts`` prompts form the second set."""
        prompts = sorted({record.prompt_index for record in self.records})
        if not 0 < holdout_prompts < len(prompts):
            raise ValueError(f"cannot hold out {holdout_prompts} of {len(prompts)} prompts")
        held = set(prompts[-holdout_prompts:])
        return (
            CalibrationSet([r for r in self.records if r.prompt_index not in held], dict(self.info)),
            CalibrationSet([r for r in self.records if r.prompt_index in held], dict(self.info)),
        )

    def subset_by_index(self, indices: Sequence[int]) -> CalibrationSet:
        """The records at ``indices``, in that order."""
        return CalibrationSet([self.records[i] for i in indices], dict(self.info))

    def subset(self, max_records: int, seed: int = 0) -> CalibrationSet:
        """At most ``max_records`` records, drawn evenly at random (deterministic for a seed)."""
        if len(self.records) <= max_records:
            return self
        chosen = sorted(random.Random(seed).sample(range(len(self.records)), max_records))
        return CalibrationSet([self.records[i] for i in chosen], dict(self.info))

    def replay(self, denoiser: nn.Module, *, progress: bool = True, desc: str = "replay") -> Iterator[Tensor]:
        """Run the denoiser on every record and yield its output (the predicted noise or velocity)."""
        parameter = next(denoiser.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        for record in Progress(self.records, desc=desc, unit="call", enabled=progress, leave=False):
            # no_grad around the call only: a `yield` inside it would leave autograd disabled in the
            # caller for as long as this generator is suspended.
            with torch.no_grad():
                output = denoiser(**_to(record.inputs, device, dtype))
            yield denoiser_output(output)

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the set as safetensors shards plus ``index.json``, atomically."""
        with atomic_directory(folder, overwrite=overwrite) as staging:
            entries: list[dict[str, Any]] = []
            shard: dict[str, Tensor] = {}
            shard_bytes = 0
            shard_names: list[str] = []

            def flush() -> None:
                nonlocal shard, shard_bytes
                if shard:
                    name = f"records-{len(shard_names):05d}.safetensors"
                    save_file(shard, staging / name, metadata={"format": FORMAT_NAME})
                    shard_names.append(name)
                    shard, shard_bytes = {}, 0

            for number, record in enumerate(self.records):
                tensors, values = _flatten(record.inputs)
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                if shard and shard_bytes + size > _SHARD_BYTES:
                    flush()
                keys = {}
                for path, tensor in tensors.items():
                    key = f"{number:06d}/{path}"
                    shard[key] = tensor.detach().cpu().contiguous()
                    keys[path] = key
                shard_bytes += size
                entries.append(
                    {
                        "prompt_index": record.prompt_index,
                        "step_index": record.step_index,
                        "timestep": record.timestep,
                        "shard": f"records-{len(shard_names):05d}.safetensors",
                        "tensors": keys,
                        "values": values,
                    }
                )
            flush()
            index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "info": self.info, "records": entries}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=1))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CalibrationSet:
        """Read a set written by :meth:`save`; corrupt or foreign folders raise :class:`CalibrationError`."""
        folder = Path(folder)
        index_path = folder / INDEX_NAME
        if not folder.is_dir():
            raise CalibrationError(f"calibration folder '{folder}' does not exist: run `quantdiff calibrate` first")
        if not index_path.is_file():
            raise CalibrationError(f"'{folder}' is not a calibration folder: it has no {INDEX_NAME}")
        check_inside(folder, index_path, CalibrationError)
        index = read_json_object(index_path, CalibrationError, "re-run calibrate")
        if index.get("format") != FORMAT_NAME:
            raise CalibrationError(f"{index_path} is not a quantdiff calibration index")
        version = index.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CalibrationError(
                f"calibration data in '{folder}' has format version {version}, newer than this quantdiff "
                f"reads ({FORMAT_VERSION}): upgrade quantdiff or re-run calibrate"
            )
        shards: dict[str, dict[str, Tensor]] = {}
        records = []
        try:
            entries = index["records"]
            if not isinstance(entries, list):
                raise TypeError("'records' must be a list")
            for number, entry in enumerate(entries):
                name = entry["shard"]
                if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
                    raise ValueError(f"record {number} names shard {name!r}, not a records-NNNNN.safetensors file")
                if name not in shards:
                    shards[name] = _load_shard(folder, name)
                tensors = {}
                for path, key in entry["tensors"].items():
                    if key not in shards[name]:
                        raise ValueError(f"record {number}: tensor {key!r} is not in {name}")
                    tensors[_argument_path(path)] = shards[name][key]
                values = entry["values"]
                if not isinstance(values, dict) or not all(_plain(v) for v in values.values()):
                    raise TypeError(f"record {number}: 'values' must map argument paths to plain JSON values")
                records.append(
                    CalibrationRecord(
                        inputs=_unflatten(tensors, {_argument_path(path): v for path, v in values.items()}),
                        prompt_index=_integer(entry["prompt_index"], "prompt_index"),
                        step_index=_integer(entry["step_index"], "step_index"),
                        timestep=_number(entry["timestep"], "timestep"),
                    )
                )
            info = index.get("info", {})
            if not isinstance(info, dict):
                raise TypeError("'info' must be a JSON object")
        except KeyError as error:
            raise CalibrationError(
                f"calibration index {index_path} is inconsistent (missing {error}): re-run calibrate"
            ) from None
        except (TypeError, ValueError, AttributeError) as error:
            raise CalibrationError(f"calibration index {index_path} is malformed ({error}): re-run calibrate") from None
        _check_consistent(records, folder)
        return cls(records, dict(info))


_SHARD_NAME = re.compile(r"records-\d{5}\.safetensors")
_ARGUMENT_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _argument_path(path: Any) -> str:
    """A recorded argument's dotted path (``sample``, ``added_cond_kwargs.text_embeds``): identifiers only."""
    if not isinstance(path, str) or not all(_ARGUMENT_PART.fullmatch(part) for part in path.split(".")):
        raise ValueError(f"argument path {path!r} is not a dotted Python name")
    return path


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or value == {}


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _signature(record: CalibrationRecord) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    tensors, _ = _flatten(record.inputs)
    return {path: (tuple(tensor.shape), tensor.dtype) for path, tensor in tensors.items()}


def _check_consistent(records: list[CalibrationRecord], folder: Path) -> None:
    """Every record carries the same arguments with the same shapes and dtypes (one recording's do)."""
    if not records:
        return
    first = _signature(records[0])
    for number, record in enumerate(records[1:], start=1):
        signature = _signature(record)
        if signature != first:
            differ = sorted(p for p in set(first) | set(signature) if first.get(p) != signature.get(p))[0]
            raise CalibrationError(
                f"calibration data in '{folder}' is inconsistent: record {number} has {differ!r} as "
                f"{_describe(signature.get(differ))}, record 0 as {_describe(first.get(differ))}; re-run calibrate"
            )


def _describe(entry: tuple[tuple[int, ...], torch.dtype] | None) -> str:
    return "absent" if entry is None else f"{entry[0]} {str(entry[1]).removeprefix('torch.')}"


def denoiser_output(output: Any) -> Tensor:
    """The prediction tensor of a denoiser call, whether it returned a tuple or an output dataclass."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def _load_shard(folder: Path, name: str) -> dict[str, Tensor]:
    path = folder / name
    if not path.is_file():
        raise CalibrationError(f"calibration shard '{path}' is missing: re-run calibrate")
    check_inside(folder, path, CalibrationError)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise CalibrationError(
            f"calibration shard '{path}' is corrupt or truncated ({error}): re-run calibrate"
        ) from None


def _flatten(inputs: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    values: dict[str, Any] = {}
    for name, value in inputs.items():
        path = f"{prefix}{name}"
        if isinstance(value, Tensor):
            tensors[path] = value
        elif isinstance(value, Mapping):
            sub_tensors, sub_values = _flatten(value, f"{path}.")
            tensors.update(sub_tensors)
            values.update(sub_values)
            if not value:
                values[path] = {}
        elif value is None or isinstance(value, (bool, int, float, str)):
            values[path] = value
        else:
            raise CalibrationError(
                f"cannot record denoiser argument {path!r} of type {type(value).__name__}: "
                "only tensors, dicts and plain values can be stored"
            )
    return tensors, values


def _unflatten(tensors: Mapping[str, Tensor], values: Mapping[str, Any]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for path, value in list(values.items()) + list(tensors.items()):
        *parents, leaf = path.split(".")
        node = inputs
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"argument path {path!r} runs through {parent!r}, which is not a dict")
        if leaf in node and isinstance(node[leaf], dict) and node[leaf] and not isinstance(value, dict):
            raise ValueError(f"argument path {path!r} is both a value and a dict")
        node[leaf] = value
    return inputs


def _to(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device=device, dtype=dtype) if inputs.is_floating_point() else inputs.to(device)
    if isinstance(inputs, Mapping):
        return {name: _to(value, device, dtype) for name, value in inputs.items()}
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return type(inputs)(_to(value, device, dtype) for value in inputs)
    return inputs
