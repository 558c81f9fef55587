"""Metric-decoupled layer sensitivity (MixDQ, section 1.3 of the methods notes).

One layer at a time, at one candidate bit width for its weights (inputs in float) or for its inputs
(weights in float), the rest of the model in floating point, the damage is measured where that layer acts:

* **quality** layers (ResNet convs, self-attention, projections: everything the architecture does not list
  in :attr:`~quantdiff.pipelines.architectures.Architecture.content_layers`) by the SQNR of the denoiser's
  output over a replay of calibration records, against the float outputs;
* **content** layers (cross-attention and feed-forward in UNets and DiTs) by the SSIM of images generated on
  fixed seeds against the float model's images, and, where the prompts carry a spec (the digits models),
  the evaluator's alignment of those images.

The quantizers are the library's own: weights through :func:`quantdiff.nn.weights.quantize_weight` and its
inverse, inputs through :func:`quantdiff.primitives.fake_quantize` with scales from the recipe's observer
over a replay of the calibration data on the float model (as ``quantize`` observes them). With BOS-aware
quantization on, the text key / value projections keep the first token in float and observe the others only.

Results are cached per entry in JSON files in a folder: a run skips every entry already there (resume), and
``shard=(i, n)`` measures only every n-th layer from the i-th, in its own file, so n processes can share the
work; :func:`load_results` merges the files, and the merged result is the one a single process would measure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantdiff.calibration.dataset import CalibrationSet
from quantdiff.calibration.taps import Taps
from quantdiff.errors import QuantDiffError
from quantdiff.jsonfile import one_line
from quantdiff.nn.weights import dequantize_weight, quantize_weight
from quantdiff.observers import make_observer
from quantdiff.pipelines.architectures import Architecture, architecture_of, layers_matching
from quantdiff.pipelines.loading import config_hash, denoiser_of
from quantdiff.plan import resolve_plan
from quantdiff.primitives import fake_quantize
from quantdiff.progress import Progress
from quantdiff.recipe import Recipe, TensorSpec

CONTENT, QUALITY = "content", "quality"
WEIGHT, INPUT = "weight", "input"
SQNR, SSIM = "sqnr", "ssim"
FLOAT_BITS = 16  # the option "keep this input in floating point": exact, so never measured
CACHE_VERSION = 1

MIXDQ_WEIGHTS = TensorSpec(8, True, "channel", observer="minmax")  # MixDQ: symmetric per output channel, min-max
MIXDQ_ACTIVATIONS = TensorSpec(8, False, "tensor", observer="minmax")  # MixDQ: asymmetric per tensor, min-max


@dataclass(frozen=True)
class SensitivitySettings:
    """What is measured and how.

    Attributes:
        weights: the weight spec; each candidate replaces its ``bits``.
        activations: the input spec; each candidate replaces its ``bits``.
        weight_bits: weight candidates, measured for every layer (MixDQ: 2, 4, 8).
        input_bits: input candidates (MixDQ: 4, 8); :data:`FLOAT_BITS` may be listed and is not measured.
        records: calibration records replayed for a quality layer's SQNR (spread evenly over the set).
        images: images generated for a content layer's SSIM, prompt ``i mod P`` of the model's evaluation
            set with seed ``seed + i``.
        seed: first seed; the default keeps the search's images apart from ``quantdiff eval``'s (0, 1, ...).
        steps, guidance: sampler steps and guidance scale of those images (None: the evaluation set's, else
            the pipeline's defaults).
        batch_size: images per pipeline call.
        bos_aware: text key / value projections keep the first token in float (see ``algorithms/bos_aware``).
        decoupled: content layers by SSIM (MixDQ); ``False`` scores every layer by SQNR (its ablation).
        layers: globs of the layers to search (default: every layer the base recipe quantizes); the others
            keep the base specs at 8 bits. An entry does not depend on which other layers are searched.
    """

    weights: TensorSpec = MIXDQ_WEIGHTS
    activations: TensorSpec = MIXDQ_ACTIVATIONS
    weight_bits: tuple[int, ...] = (2, 4, 8)
    input_bits: tuple[int, ...] = (4, 8)
    records: int = 64
    images: int = 32
    seed: int = 10_000
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 32
    bos_aware: bool = False
    decoupled: bool = True
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("records", "images", "batch_size"):
            if getattr(self, name) < 1:
                raise QuantDiffError(f"sensitivity {name} must be at least 1, got {getattr(self, name)}")
        for bits in self.weight_bits:
            if not 2 <= bits <= 8:
                raise QuantDiffError(f"weight candidates are 2 to 8 bits, got {bits}")
        for bits in self.input_bits:
            if not (2 <= bits <= 8 or bits == FLOAT_BITS):
                raise QuantDiffError(f"input candidates are 2 to 8 bits or {FLOAT_BITS} (float), got {bits}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON (the specs in their recipe form)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["weights"], data["activations"] = self.weights.to_dict(), self.activations.to_dict()
        return data

    def measured_input_bits(self) -> tuple[int, ...]:
        return tuple(bits for bits in self.input_bits if bits != FLOAT_BITS)

    def fingerprint(self) -> dict[str, Any]:
        """What every cached entry depends on (not which candidates are asked for, nor ``decoupled``:
        entries carry their metric, so runs with more candidates or the ablation share what they can)."""
        return {
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict(),
            "records": self.records,
            "images": self.images,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "bos_aware": self.bos_aware,
        }


@dataclass(frozen=True)
class LayerInfo:
    """A searched layer: its group, its size for the weight budget, and its input size for the activation one.

    Attributes:
        name: qualified name in the denoiser.
        group: ``"content"`` or ``"quality"``.
        params: weight elements.
        input_size: input elements per denoiser call (on the first calibration record).
        protected: kept at 8 bits by the search (architecture data), not measured.
        text_kv: a text key / value projection (BOS-aware applies when on).
    """

    name: str
    group: str
    params: int
    input_size: int
    protected: bool = False
    text_kv: bool = False


@dataclass(frozen=True)
class Entry:
    """One measurement: layer ``layer`` with its ``kind`` (weight / input) at ``bits``, scored by ``metric``."""

    layer: str
    kind: str
    bits: int
    metric: str
    value: float
    alignment: float | None = None

    @property
    def key(self) -> str:
        return entry_key(self.layer, self.kind, self.bits, self.metric)


def entry_key(layer: str, kind: str, bits: int, metric: str) -> str:
    return f"{layer}|{kind}{bits}|{metric}"


@dataclass
class SensitivityResults:
    """Merged measurements: the layers, every entry by key, and seconds per entry (not part of equality)."""

    layers: list[LayerInfo]
    entries: dict[str, Entry]
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    def value(self, layer: str, kind: str, bits: int, metric: str) -> Entry | None:
        return self.entries.get(entry_key(layer, kind, bits, metric))


def metric_of(layer: LayerInfo, decoupled: bool) -> str:
    """What a layer's sensitivity is measured by: SSIM for content layers when decoupled (MixDQ), else SQNR."""
    return SSIM if decoupled and layer.group == CONTENT else SQNR


# ----------------------------------------------------------------------------------------- layers


def searched_layers(
    denoiser: nn.Module, settings: SensitivitySettings, architecture: Architecture | None = None
) -> list[tuple[str, str, bool, bool]]:
    """``(name, group, protected, text_kv)`` of every layer the base recipe quantizes, in module order."""
    architecture = architecture or architecture_of(denoiser)
    plan = resolve_plan(denoiser, base_recipe(settings), architecture)
    names = [layer.name for layer in plan.quantized]
    if settings.layers:
        names = layers_matching(names, settings.layers)
        if not names:
            raise QuantDiffError(
                f"no quantized layer matches {list(settings.layers)}: check the names with `quantdiff inspect`"
            )
    content = set(layers_matching(names, architecture.content_layers))
    protected = set(layers_matching(names, tuple(rule.pattern for rule in architecture.search_protected)))
    text_kv = set(layers_matching(names, architecture.text_kv)) if settings.bos_aware else set()
    return [(name, CONTENT if name in content else QUALITY, name in protected, name in text_kv) for name in names]


def base_recipe(settings: SensitivitySettings, name: str = "search-base") -> Recipe:
    """The uniform recipe whose layers the search distributes bits over (its default ignore list applies)."""
    return Recipe(name, settings.weights, settings.activations)


def shard_layers(names: Sequence[str], shard: tuple[int, int]) -> list[str]:
    """The layers shard ``i`` of ``n`` measures: every n-th one from the i-th (all candidates of a layer in one)."""
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise QuantDiffError(f"shard {index}/{count} is invalid: use i/n with 0 <= i < n")
    return [name for position, name in enumerate(names) if position % count == index]


# ----------------------------------------------------------------------------------------- the cache


def _fingerprint_id(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def shard_file(folder: Path, shard: tuple[int, int]) -> Path:
    return folder / f"sensitivity-{shard[0]}-of-{shard[1]}.json"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise QuantDiffError(f"sensitivity cache '{path}' is unreadable ({one_line(error)}): delete it") from None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        raise QuantDiffError(f"sensitivity cache '{path}' is not version {CACHE_VERSION}: delete it")
    return data


def load_results(folder: str | os.PathLike, fingerprint: Mapping[str, Any]) -> SensitivityResults | None:
    """Merge every shard file in ``folder`` measured with ``fingerprint``; None when there is none.

    Files made with other settings (or another model or calibration set) are an error: mixing them would
    compare numbers measured differently.
    """
    folder = Path(folder)
    wanted = _fingerprint_id(fingerprint)
    layers: dict[str, LayerInfo] = {}
    entries: dict[str, Entry] = {}
    seconds: dict[str, float] = {}
    found = False
    for path in sorted(folder.glob("sensitivity-*-of-*.json")):
        data = _read_file(path)
        if data.get("fingerprint_id") != wanted:
            raise QuantDiffError(
                f"sensitivity cache '{path}' was measured with other settings, another model or another calibration "
                f"set ({data.get('fingerprint')}); use another cache folder or delete it"
            )
        found = True
        for item in data["layers"]:
            layers.setdefault(item["name"], LayerInfo(**item))
        for key, item in data["entries"].items():
            entries.setdefault(key, Entry(**item))
        seconds.update(data.get("seconds", {}))
    if not found:
        return None
    return SensitivityResults(list(layers.values()), entries, seconds)


def _write_file(path: Path, fingerprint: Mapping[str, Any], layers, entries, seconds) -> None:
    data = {
        "version": CACHE_VERSION,
        "fingerprint_id": _fingerprint_id(fingerprint),
        "fingerprint": dict(fingerprint),
        "layers": [asdict(layer) for layer in layers],
        "entries": {key: asdict(entry) for key, entry in sorted(entries.items())},
        "seconds": dict(sorted(seconds.items())),
    }
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)  # a killed process leaves the previous complete file, never half of one


# ----------------------------------------------------------------------------------------- measuring


class _OneLayerQuantized(nn.Module):
    """Stands in for one float ``nn.Linear`` / ``nn.Conv2d`` while it is measured: weights and / or input
    fake-quantized with the library's quantizers; with ``keep_first_token`` (BOS-aware) the first token runs
    through the float layer, as the precomputed key / value would."""

    def __init__(self, original: nn.Module, weight: Tensor | None, input_quant: tuple | None, keep_first_token: bool):
        super().__init__()
        self.original = original
        self.quantized_weight = weight  # (C_out, C_in[, kh, kw]) dequantized, or None: the float weight
        self.input_quant = input_quant  # (scale, zero_point, bits, symmetric), or None: float inputs
        self.keep_first_token = keep_first_token

    def _quantized(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            scale, zero_point, bits, symmetric = self.input_quant
            x = fake_quantize(x, scale, zero_point, bits, symmetric)
        weight = self.original.weight if self.quantized_weight is None else self.quantized_weight.to(x.dtype)
        if isinstance(self.original, nn.Linear):
            return F.linear(x, weight, self.original.bias)
        conv = self.original
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.keep_first_token and x.dim() == 3 and x.shape[1] > 1:  # (B, T, C): the text's tokens
            return torch.cat([self.original(x[:, :1]), self._quantized(x[:, 1:])], dim=1)
        return self._quantized(x)


class SensitivityHarness:
    """The float pipeline with what measuring needs: float references, observed input ranges, and swapping
    layers for quantized stand-ins (always restored). Also evaluates whole allocations (the search's final
    choice among candidates)."""

    def __init__(
        self,
        pipe,
        calibration: CalibrationSet,
        settings: SensitivitySettings,
        *,
        model: str | os.PathLike | None = None,
        progress: bool = True,
    ):
        self.pipe = pipe
        self.model = str(model or getattr(pipe, "name_or_path", "") or calibration.info.get("model") or "")
        _, self.denoiser = denoiser_of(pipe)
        self.calibration = calibration
        self.settings = settings
        self.progress = progress
        self.architecture = architecture_of(self.denoiser)
        self.layer_rows = searched_layers(self.denoiser, settings, self.architecture)
        self.text_kv = {name for name, _, _, kv in self.layer_rows if kv}
        self._records = calibration.subset(settings.records)
        self._fp_outputs: list[Tensor] | None = None
        self._fp_images: np.ndarray | None = None
        self._input_qparams: dict[tuple[str, int], tuple[Tensor, Tensor]] | None = None
        self._prompts = None
        self._evaluator = None  # the digits evaluator, loaded on first use

    # ------------------------------------------------------------------------------- layers and sizes
    def layer_infos(self) -> list[LayerInfo]:
        """Every searched layer with its sizes (input sizes from one denoiser call on the first record)."""
        sizes: dict[str, int] = {}

        def size(x: Tensor, name: str) -> None:  # a tap returns nothing (a pre-hook's value replaces the input)
            sizes.setdefault(name, int(x.numel()))

        with Taps(self.denoiser) as taps:
            for name, *_ in self.layer_rows:
                taps.on_layer_input(name, lambda x, name=name: size(x, name))
            for _ in self.calibration.subset_by_index([0]).replay(self.denoiser, progress=False):
                pass
        infos = []
        for name, group, protected, text_kv in self.layer_rows:
            module = self.denoiser.get_submodule(name)
            infos.append(LayerInfo(name, group, int(module.weight.numel()), sizes.get(name, 0), protected, text_kv))
        return infos

    # ------------------------------------------------------------------------------- float references
    def fp_outputs(self) -> list[Tensor]:
        if self._fp_outputs is None:
            self._fp_outputs = [y.detach().clone() for y in self._replay("sensitivity: float outputs")]
        return self._fp_outputs

    def _replay(self, desc: str) -> Iterator[Tensor]:
        return self._records.replay(self.denoiser, progress=False, desc=desc)

    def prompts(self):
        if self._prompts is None:
            from quantdiff.evaluate import evaluation_set_for

            evaluation = evaluation_set_for(self.model)
            chosen = [evaluation.prompts[i % len(evaluation.prompts)] for i in range(self.settings.images)]
            steps = self.settings.steps if self.settings.steps is not None else evaluation.steps
            guidance = self.settings.guidance if self.settings.guidance is not None else evaluation.guidance
            self._prompts = (chosen, steps, guidance)
        return self._prompts

    def fp_images(self) -> np.ndarray:
        if self._fp_images is None:
            self._fp_images = self.generate()
        return self._fp_images

    def generate(self) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 images of the pipeline as it is now, on the search's prompts and seeds."""
        from quantdiff.evaluate import generate_set

        chosen, steps, guidance = self.prompts()
        seeds = [self.settings.seed + i for i in range(len(chosen))]
        generated = generate_set(
            self.pipe,
            [p.text for p in chosen],
            seeds,
            steps=steps,
            guidance=guidance,
            batch_size=self.settings.batch_size,
            desc="images",
            progress=False,
        )
        return generated.images

    # ------------------------------------------------------------------------------- input ranges
    def input_qparams(self) -> dict[tuple[str, int], tuple[Tensor, Tensor]]:
        """``{(layer, bits): (scale, zero_point)}`` of every searched layer's input at every measured input
        width, observed over a replay of the whole calibration set on the float model."""
        if self._input_qparams is None:
            spec = self.settings.activations
            widths = self.settings.measured_input_bits()
            observers = {
                (name, bits): make_observer(spec.observer, bits, spec.symmetric, **dict(spec.observer_options))
                for name, *_ in self.layer_rows
                for bits in widths
            }

            def feed(x: Tensor, name: str) -> None:
                if name in self.text_kv and x.dim() == 3 and x.shape[1] > 1:
                    x = x[:, 1:]  # BOS-aware: the first token is never quantized
                rows = x.detach().float().reshape(1, -1)  # (1, numel): one per-tensor range
                for bits in widths:
                    observers[(name, bits)].update(rows)

            with Taps(self.denoiser) as taps:
                for name, *_ in self.layer_rows:
                    taps.on_layer_input(name, lambda x, name=name: feed(x, name))
                replay = self.calibration.replay(self.denoiser, progress=self.progress, desc="sensitivity: observe")
                for _ in replay:
                    pass
            self._input_qparams = {key: observer.qparams() for key, observer in observers.items()}
        return self._input_qparams

    # ------------------------------------------------------------------------------- stand-ins
    def stand_in(self, name: str, weight_bits: int | None, input_bits: int | None) -> nn.Module:
        """The quantized stand-in of layer ``name`` (``None`` or :data:`FLOAT_BITS`: that part stays float)."""
        original = self.denoiser.get_submodule(name)
        if isinstance(original, _OneLayerQuantized):
            original = original.original
        weight = None
        if weight_bits is not None and weight_bits != FLOAT_BITS:
            spec = dataclasses.replace(self.settings.weights, bits=weight_bits)
            stored = quantize_weight(original.weight.detach(), spec)
            weight = dequantize_weight(*stored, spec, original.weight.shape)
        input_quant = None
        if input_bits is not None and input_bits != FLOAT_BITS:
            scale, zero_point = self.input_qparams()[(name, input_bits)]
            input_quant = (scale, zero_point, input_bits, self.settings.activations.symmetric)
        return _OneLayerQuantized(original, weight, input_quant, name in self.text_kv)

    @contextmanager
    def swapped(self, stand_ins: Mapping[str, nn.Module]) -> Iterator[None]:
        """The denoiser with ``stand_ins`` in place of those layers; the originals are back on exit."""
        originals = {name: self.denoiser.get_submodule(name) for name in stand_ins}
        try:
            for name, module in stand_ins.items():
                self.denoiser.set_submodule(name, module)
            yield
        finally:
            for name, module in originals.items():
                self.denoiser.set_submodule(name, module)

    def references(self, metric: str) -> None:
        """Compute the float references ``metric`` compares against, if not done yet (before any swap)."""
        if any(isinstance(m, _OneLayerQuantized) for m in self.denoiser.modules()):
            raise RuntimeError("float references must be computed on the float model: a layer is swapped")
        if metric == SQNR:
            self.fp_outputs()
        else:
            self.fp_images()

    # ------------------------------------------------------------------------------- metrics
    def output_sqnr(self) -> float:
        """SQNR (dB) of the denoiser's outputs now against the float ones, over the replayed records."""
        signal = noise = 0.0
        for reference, output in zip(self.fp_outputs(), self._replay("sensitivity: sqnr"), strict=True):
            ref = reference.double()
            signal += float(ref.square().sum())
            noise += float((output.double() - ref).square().sum())
        if noise == 0.0:
            return math.inf
        return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf

    def image_scores(self, images: np.ndarray | None = None) -> tuple[float, float | None]:
        """Mean SSIM of the images (generated now unless given) against the float ones, and the digits
        evaluator's alignment where the prompts carry a spec."""
        from quantdiff.evaluation.metrics import ssim

        images = self.generate() if images is None else images
        mean_ssim = float(np.mean([ssim(a, b) for a, b in zip(images, self.fp_images(), strict=True)]))
        return mean_ssim, self.alignment(images)

    def alignment(self, images: np.ndarray) -> float | None:
        chosen, _, _ = self.prompts()
        specs = [p.spec for p in chosen]
        if any(spec is None for spec in specs):
            return None
        from quantdiff.demo.digits.evaluator import adherence, load_evaluator, predict

        if self._evaluator is None:
            self._evaluator = load_evaluator()
        return float(adherence(predict(self._evaluator, images), specs)["all"])

    def measure(self, layer: str, kind: str, bits: int, metric: str) -> Entry:
        """One entry: ``layer`` quantized alone (weights or inputs at ``bits``), scored by ``metric``."""
        self.references(metric)  # computed on the float model, before anything is swapped
        stand_in = self.stand_in(layer, bits if kind == WEIGHT else None, bits if kind == INPUT else None)
        with self.swapped({layer: stand_in}):
            if metric == SQNR:
                return Entry(layer, kind, bits, metric, self.output_sqnr())
            value, alignment = self.image_scores()
            return Entry(layer, kind, bits, metric, value, alignment)


def wanted_entries(layers: Sequence[LayerInfo], settings: SensitivitySettings) -> list[tuple[str, str, int, str]]:
    """``(layer, kind, bits, metric)`` of every measurement the settings ask for, in layer order."""
    wanted = []
    for layer in layers:
        if layer.protected:
            continue
        metric = metric_of(layer, settings.decoupled)
        wanted += [(layer.name, WEIGHT, bits, metric) for bits in settings.weight_bits]
        wanted += [(layer.name, INPUT, bits, metric) for bits in settings.measured_input_bits()]
    return wanted


def measure_sensitivity(
    pipe,
    calibration: CalibrationSet,
    settings: SensitivitySettings,
    cache: str | os.PathLike,
    *,
    shard: tuple[int, int] = (0, 1),
    model: str | os.PathLike | None = None,
    progress: bool = True,
    harness: SensitivityHarness | None = None,
) -> SensitivityResults:
    """Measure what ``settings`` asks for and ``cache`` does not hold yet, for this ``shard``'s layers.

    Each entry is written to this shard's file as soon as it is measured, so an interrupted run resumes
    where it stopped. Returns the results merged from every shard file in ``cache`` (which may still lack
    other shards' entries: see :func:`missing_entries`).
    """
    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    harness = harness or SensitivityHarness(pipe, calibration, settings, model=model, progress=progress)
    fingerprint = cache_fingerprint(harness.denoiser, calibration, settings)
    merged = load_results(folder, fingerprint)
    layers = harness.layer_infos()
    own_path = shard_file(folder, shard)
    own = load_results_file(own_path) if own_path.is_file() else ({}, {})
    entries, seconds = own
    done = set(merged.entries) if merged is not None else set()
    mine = set(shard_layers([layer.name for layer in layers if not layer.protected], shard))
    todo = [item for item in wanted_entries(layers, settings) if item[0] in mine and entry_key(*item) not in done]
    _write_file(own_path, fingerprint, layers, entries, seconds)
    with Progress(
        total=len(todo), desc=f"sensitivity (shard {shard[0]}/{shard[1]})", unit="measurement", enabled=progress
    ) as bar:
        for layer, kind, bits, metric in todo:
            started = time.perf_counter()
            entry = harness.measure(layer, kind, bits, metric)
            entries[entry.key] = entry
            seconds[entry.key] = round(time.perf_counter() - started, 3)
            _write_file(own_path, fingerprint, layers, entries, seconds)
            bar.update()
            bar.set_postfix_str(f"{layer} {kind}{bits}: {entry.value:.3g}")
    merged = load_results(folder, fingerprint)
    return SensitivityResults(layers, merged.entries, merged.seconds)


def load_results_file(path: Path) -> tuple[dict[str, Entry], dict[str, float]]:
    data = _read_file(path)
    return {key: Entry(**item) for key, item in data["entries"].items()}, dict(data.get("seconds", {}))


def missing_entries(results: SensitivityResults | None, settings: SensitivitySettings) -> list[str]:
    """Keys the settings ask for that the results lack (other shards not finished yet)."""
    if results is None:
        return ["(nothing measured yet)"]
    return [
        entry_key(*item) for item in wanted_entries(results.layers, settings) if entry_key(*item) not in results.entries
    ]


def cache_fingerprint(
    denoiser: nn.Module, calibration: CalibrationSet, settings: SensitivitySettings
) -> dict[str, Any]:
    """The settings, the denoiser's config and the calibration set's identity (its settings and records)."""
    calib = json.dumps(calibration.info, sort_keys=True, default=str) + f"|{len(calibration)}"
    return {
        "settings": settings.fingerprint(),
        "denoiser_config_hash": config_hash(denoiser.config),
        "calibration": hashlib.sha256(calib.encode()).hexdigest()[:16],
    }
