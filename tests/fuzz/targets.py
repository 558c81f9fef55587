"""Fuzz targets: every loader of a user file, fed mutated bytes.

Each target writes the bytes where the loader expects a file (or passes them directly) and calls the
loader. A :class:`~quantdiff.errors.QuantDiffError` is the expected answer to bad bytes; any other
exception, a hang, or a crash of the interpreter is a finding. ``Workspace`` builds, once, the real folders
the targets start from: a tiny SD1.5 pipeline, a W8A16 quantized folder of it, and a calibration set.

Used by ``tests/test_fuzz.py`` (a bounded number of iterations in the suite, replay of every saved crash)
and by ``tests/fuzz/harness.py`` (atheris, coverage-guided, for as long as asked).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from quantdiff.errors import QuantDiffError

HERE = Path(__file__).parent
CRASHES = HERE / "crashes"
"""One folder per target; each file in it is an input that once crashed a loader (a regression test)."""

TARGETS = (
    "safetensors",
    "quantdiff_json",
    "recipe_json",
    "recipe_yaml",
    "calibration_index",
    "calibration_shard",
    "png",
)


class Workspace:
    """The real files the targets mutate, built once in ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.pipeline = self.root / "sd15"
        self.quantized = self.root / "q"
        self.calibration = self.root / "calib"
        self.work = self.root / "work"  # each iteration writes its files here
        if not (self.quantized / "quantdiff.json").is_file():
            self._build()
        self.seeds = self._seeds()
        self._dirty: tuple[Path, Path] | None = None

    def _build(self) -> None:
        import torch

        from quantdiff.calibration import CalibrationRecord, CalibrationSet
        from quantdiff.pipelines.loading import config_hash, denoiser_of, load_pipeline
        from quantdiff.quantize import quantize_denoiser
        from quantdiff.serialization import save_quantized
        from quantdiff.testing.tiny import save_tiny_pipeline

        save_tiny_pipeline("sd15", self.pipeline, seed=0)
        pipe = load_pipeline(self.pipeline)
        _, unet = denoiser_of(pipe)
        # A calibration set of the genuine argument layout, at a tiny size: the loader checks structure only.
        generator = torch.Generator().manual_seed(0)
        records = [
            CalibrationRecord(
                {
                    "sample": torch.randn(2, 4, 8, 8, generator=generator),
                    "timestep": torch.tensor(999 - 300 * i),
                    "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
                    "return_dict": False,
                    "added_cond_kwargs": {},
                },
                prompt_index=i,
                step_index=i,
                timestep=999.0 - 300 * i,
            )
            for i in range(2)
        ]
        info = {"model": str(self.pipeline), "denoiser_class": "UNet2DConditionModel"}
        CalibrationSet(records, {**info, "denoiser_config_hash": config_hash(unet.config)}).save(self.calibration)
        quantize_denoiser(unet, "w8a16", progress=False)
        save_quantized(pipe, self.quantized, base_path=self.pipeline)

    def _seeds(self) -> dict[str, list[bytes]]:
        from quantdiff.generate import png_bytes
        from quantdiff.recipe import PRESETS

        recipes = [recipe.to_dict() for recipe in PRESETS.values()]
        recipes.append(
            {
                "name": "mixed",
                "weights": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64},
                "activations": None,
                "ignore": ["conv_in"],
                "overrides": [{"pattern": "*.attn2.*", "weights": {"bits": 8, "granularity": "channel"}}],
                "layers": {"conv_out": {"skip": True}},
            }
        )
        from PIL import Image

        parameters = {
            "prompt": "a cat, wearing: a hat",
            "negative_prompt": "blurry",
            "steps": 20,
            "scheduler": "DDIMScheduler",
            "guidance": 7.5,
            "seed": 3,
            "width": 8,
            "height": 8,
            "model": "/m/tiny",
            "quantization": "W8A8 (w8a8)",
        }
        return {
            "safetensors": [(self.quantized / "unet" / "quantized.safetensors").read_bytes()],
            "quantdiff_json": [(self.quantized / "quantdiff.json").read_bytes()],
            "recipe_json": [json.dumps(r).encode() for r in recipes],
            "recipe_yaml": [yaml.safe_dump(r).encode() for r in recipes],
            "calibration_index": [(self.calibration / "index.json").read_bytes()],
            "calibration_shard": [(self.calibration / "records-00000.safetensors").read_bytes()],
            "png": [png_bytes(Image.new("RGB", (8, 8), "red"), parameters)],
        }

    def fresh(self, source: Path) -> Path:
        """A copy of ``source`` under ``work`` (replacing the last one), to damage."""
        target = self.work / source.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return target

    def target(self, name: str) -> Callable[[bytes], None]:
        return getattr(self, f"_{name}")

    # ------------------------------------------------------------------ targets

    def _safetensors(self, data: bytes) -> None:
        from quantdiff.serialization import load_quantized_denoiser

        folder = self._overwrite(self.quantized, "unet/quantized.safetensors", data)
        _expect_our_error(load_quantized_denoiser, folder)

    def _quantdiff_json(self, data: bytes) -> None:
        from quantdiff.serialization import load_quantized_denoiser

        folder = self._overwrite(self.quantized, "quantdiff.json", data)
        _expect_our_error(load_quantized_denoiser, folder)

    def _recipe_json(self, data: bytes) -> None:
        self._recipe(data, "recipe.json")

    def _recipe_yaml(self, data: bytes) -> None:
        self._recipe(data, "recipe.yaml")

    def _recipe(self, data: bytes, name: str) -> None:
        from quantdiff.recipe import load_recipe

        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / name
        path.write_bytes(data)
        _expect_our_error(load_recipe, path)

    def _calibration_index(self, data: bytes) -> None:
        from quantdiff.calibration import CalibrationSet

        folder = self._overwrite(self.calibration, "index.json", data)
        _expect_our_error(CalibrationSet.load, folder)

    def _calibration_shard(self, data: bytes) -> None:
        from quantdiff.calibration import CalibrationSet

        folder = self._overwrite(self.calibration, "records-00000.safetensors", data)
        _expect_our_error(CalibrationSet.load, folder)

    def _png(self, data: bytes) -> None:
        from quantdiff.generate import parse_a1111_parameters, read_png_parameters

        _expect_our_error(read_png_parameters, data)
        # The text parser on its own, on the same bytes as text: it must accept anything.
        parsed = parse_a1111_parameters(data.decode("utf-8", "replace"))
        assert isinstance(parsed.get("prompt"), str)

    def restore(self) -> None:
        """Put back the pristine file the last target overwrote in its copy."""
        if self._dirty is not None:
            copy, source = self._dirty
            copy.write_bytes(source.read_bytes())
            self._dirty = None

    def _overwrite(self, source: Path, relative: str, data: bytes) -> Path:
        """Write ``data`` as ``relative`` in the work copy of ``source``; returns that copy's folder."""
        folder = self.work / source.name
        if not folder.is_dir():
            self.fresh(source)
        self._dirty = (folder / relative, source / relative)
        (folder / relative).write_bytes(data)
        return folder


def _expect_our_error(loader: Callable[..., Any], *args: Any) -> None:
    """Run ``loader``; success and :class:`QuantDiffError` (one line) are the only allowed outcomes."""
    try:
        loader(*args)
    except QuantDiffError as error:
        message = str(error)
        assert message and "\n" not in message, f"{type(error).__name__} is not one line: {message!r}"


# ---------------------------------------------------------------------------------------------- mutation

INTERESTING = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63),
    2**64 + 1,
    10**30,
    1e308,
    -1e308,
    0.5,
    "",
    "x",
    "..",
    "../../../etc/passwd",
    "/etc/passwd",
    "\x00",
    "é" * 3,
    "F8_E4M3",
    "BOOL",
    "I64",
    "F64",
    "C64",
    "U8",
    "I8",
    "unet",
    "transformer",
    "*",
    "[",
    [],
    {},
    [0],
    [2**62, 2**62],
    [0, 2**63],
    [1, 0],
    [-1],
    {"a": 1},
]
RAW_TEXT = [b"1" * 5000, b"[" * 50000, b"{" * 3000, b'{"a":' * 3000, b"1e999999", b"NaN", b"-Infinity", b"\xff\xfe"]


def mutate(data: bytes, rng: random.Random, max_size: int = 1 << 22) -> bytes:
    """One random mutation: structural (JSON, safetensors header, YAML) when ``data`` parses, bytes otherwise."""
    choice = rng.random()
    if choice < 0.45:
        try:
            structured = _mutate_safetensors(data, rng) if _is_safetensors(data) else _mutate_json(data, rng)
        except Exception:  # a document the tree mutator cannot handle (YAML's odd keys): mutate bytes instead
            structured = None
        if structured is not None:
            return structured[:max_size]
    if choice < 0.55:
        return _splice_raw(data, rng)[:max_size]
    return _mutate_bytes(data, rng)[:max_size]


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data or b"\x00")
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        if not buffer:
            buffer.append(0)
        position = rng.randrange(len(buffer))
        action = rng.randrange(6)
        if action == 0:
            buffer[position] ^= 1 << rng.randrange(8)
        elif action == 1:
            buffer[position] = rng.choice((0, 0xFF, 0x7F, 0x80, ord("["), ord('"'), ord("9")))
        elif action == 2:
            del buffer[position : position + rng.randrange(1, 64)]
        elif action == 3:
            chunk = buffer[position : position + rng.randrange(1, 64)]
            buffer[position:position] = chunk * rng.randrange(1, 4)
        elif action == 4:
            del buffer[rng.randrange(len(buffer)) :]  # truncation: an interrupted copy
        else:
            buffer[position : position + 8] = struct.pack("<Q", rng.choice((0, 1, 2**63, 2**64 - 1, 100_000_001)))
    return bytes(buffer)


def _splice_raw(data: bytes, rng: random.Random) -> bytes:
    position = rng.randrange(len(data) + 1)
    return data[:position] + rng.choice(RAW_TEXT) + data[position:]


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 8:
        return False
    size = struct.unpack("<Q", data[:8])[0]
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _mutate_safetensors(data: bytes, rng: random.Random) -> bytes | None:
    size = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):
        return None
    body = data[8 + size :]
    _mutate_tree(header, rng)
    try:
        text = json.dumps(header).encode()
    except (ValueError, RecursionError):
        return None
    if rng.random() < 0.2:
        body = body[: rng.randrange(len(body) + 1)]  # offsets now point past the end
    declared = len(text) if rng.random() < 0.9 else rng.choice((0, len(text) - 1, len(text) + 7, 2**40))
    return struct.pack("<Q", declared) + text + body


def _mutate_json(data: bytes, rng: random.Random) -> bytes | None:
    try:
        tree = json.loads(data)
        dump = json.dumps
    except (ValueError, RecursionError):
        if data[:1] in (b"{", b"["):  # broken JSON: do not spend time on it as YAML (slow on deep flow nesting)
            return None
        try:
            tree = yaml.safe_load(data)
            dump = yaml.safe_dump
        except (yaml.YAMLError, ValueError, RecursionError):
            return None
        if not isinstance(tree, (dict, list)):
            return None
    if not isinstance(tree, (dict, list)):
        return None
    for _ in range(rng.choice((1, 1, 2, 3))):
        _mutate_tree(tree, rng)
    try:
        text = dump(tree)
    except (TypeError, ValueError, RecursionError):
        return None
    return text.encode() if isinstance(text, str) else text


def _mutate_tree(tree: Any, rng: random.Random) -> None:
    """Change one node of a parsed JSON document in place."""
    parent, key = _random_slot(tree, rng)
    if parent is None:
        return
    action = rng.randrange(6)
    if action == 0 and isinstance(parent, dict):
        del parent[key]
    elif action == 1 and isinstance(parent, dict):
        parent[rng.choice(["", "_type", "extra", "..", f"{key}x", "name"])] = parent.pop(key)
    elif action == 2:
        value = parent[key]
        parent[key] = [value] if rng.random() < 0.5 else {"k": value}
    elif action == 3:
        nested: Any = rng.choice(INTERESTING)
        for _ in range(rng.choice((10, 100, 900))):
            nested = [nested]
        parent[key] = nested
    else:
        parent[key] = rng.choice(INTERESTING)


def _random_slot(tree: Any, rng: random.Random) -> tuple[Any, Any]:
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any, depth: int) -> None:
        if depth > 12 or len(slots) > 5000:
            return
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            walk(value, depth + 1)

    walk(tree, 0)
    return rng.choice(slots) if slots else (None, None)
