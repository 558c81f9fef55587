"""Mixed-precision search (MixDQ): which bits each layer gets, under a memory budget, written as a recipe.

The data flow of ``quantdiff search MODEL --calib DIR --weight-bits B --out mixed.yaml``::

    pipeline + calibration set
      -> sensitivity.py: each layer alone at each candidate width; quality layers by the denoiser output's
         SQNR on recorded calls, content layers by the SSIM (and alignment) of generated images
         (cached per entry, resumable, shardable across processes)
      -> allocation.py: one integer program per content / quality split (scipy's HiGHS), pure
      -> mixed.py: candidates scored end to end, the best kept, the recipe with exact per-layer bits
      -> report.py: <stem>.search.json / .search.md and the plots, beside the recipe

``quantdiff quantize MODEL --recipe mixed.yaml`` then quantizes with it like any other recipe. BOS-aware
text keys / values (:mod:`quantdiff.algorithms.bos_aware`) are on where the calibration data shows a
constant first text token (``--bos-aware auto``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from quantdiff.algorithms.bos_aware import first_token_check
from quantdiff.calibration.dataset import CalibrationSet
from quantdiff.errors import CalibrationError, QuantDiffError, RecipeError
from quantdiff.nn.attention import BOS_MATCH_TOLERANCE
from quantdiff.pipelines.architectures import architecture_of
from quantdiff.pipelines.loading import denoiser_of
from quantdiff.search.mixed import SearchResult, SearchSettings, search_bits
from quantdiff.search.report import write_search_report
from quantdiff.search.sensitivity import (
    SensitivityHarness,
    SensitivitySettings,
    cache_fingerprint,
    load_results,
    measure_sensitivity,
    missing_entries,
)

BOS_MODES = ("auto", "on", "off")


def resolve_bos(mode: str, denoiser, calibration: CalibrationSet) -> tuple[bool, str]:
    """Whether the search uses BOS-aware text keys / values, and why, measured on the calibration data.

    ``"on"`` refuses (with the reason) where it does not apply; ``"auto"`` then searches without it.
    """
    if mode not in BOS_MODES:
        raise QuantDiffError(f"--bos-aware {mode!r} is unknown: use one of {', '.join(BOS_MODES)}")
    if mode == "off":
        return False, "off (asked for)"
    architecture = architecture_of(denoiser)
    if not architecture.text_kv:
        if mode == "on":
            raise RecipeError(
                f"BOS-aware quantization does not apply to the {architecture.title}: {architecture.text_kv_note}"
            )
        return False, f"does not apply: {architecture.text_kv_note}"
    states = (r.inputs["encoder_hidden_states"] for r in calibration.records if "encoder_hidden_states" in r.inputs)
    check = first_token_check(states)
    problem = check.problem(BOS_MATCH_TOLERANCE, "the text encoder's output in the calibration data")
    if problem:
        if mode == "on":
            raise CalibrationError(problem)
        return False, f"off: {problem}"
    return True, (
        f"on: the first text token is the same in all {check.sequences - check.zero_sequences} nonzero sequences "
        f"(max |x| {check.bos_absmax:.3g}, other tokens up to {check.others_absmax:.3g})"
    )


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`run_search` did: the result (None when this process measured one shard only)."""

    result: SearchResult | None
    recipe_path: Path | None
    report_paths: dict[str, Path]
    missing: list[str]
    seconds: dict[str, float]
    bos: str


def run_search(
    pipe,
    calibration: CalibrationSet,
    sensitivity: SensitivitySettings,
    settings: SearchSettings,
    out: str | os.PathLike,
    *,
    cache: str | os.PathLike,
    model: str,
    shard: tuple[int, int] | None = None,
    bos_reason: str = "",
    progress: bool = True,
    overwrite: bool = False,
) -> SearchOutcome:
    """Measure (this shard's share of) the sensitivity; with every entry measured, allocate and write the
    recipe ``out`` and its report. With ``shard=(i, n)`` only that share is measured and nothing is written
    but the cache."""
    import yaml

    out = Path(out)
    if out.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise QuantDiffError(f"--out {out} must be a .yaml / .yml / .json recipe file")
    if out.exists() and not overwrite and shard is None:
        raise QuantDiffError(f"'{out}' already exists: choose another --out or pass --overwrite")
    _, denoiser = denoiser_of(pipe)
    calibration.check_matches(denoiser)
    started = time.perf_counter()
    harness = SensitivityHarness(pipe, calibration, sensitivity, model=model, progress=progress)
    results = measure_sensitivity(
        pipe, calibration, sensitivity, cache, shard=shard or (0, 1), model=model, progress=progress, harness=harness
    )
    measured = time.perf_counter() - started
    missing = missing_entries(results, sensitivity)
    if shard is not None and shard[1] > 1 or missing:
        return SearchOutcome(None, None, {}, missing, {"sensitivity": round(measured, 1)}, bos_reason)
    result = search_bits(results, settings, harness, base=sensitivity)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = result.recipe.to_dict()
    text = yaml.safe_dump(data, sort_keys=False) if out.suffix.lower() != ".json" else _json(data)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    os.replace(partial, out)
    seconds = {"sensitivity (this run)": round(measured, 1), "total": round(time.perf_counter() - started, 1)}
    paths = write_search_report(
        result, results, settings, sensitivity, out, model=model, seconds=seconds, extra={"bos_aware": bos_reason}
    )
    return SearchOutcome(result, out, paths, [], seconds, bos_reason)


def _json(data) -> str:
    import json

    return json.dumps(data, indent=1) + "\n"


__all__ = [
    "BOS_MODES",
    "SearchOutcome",
    "SearchResult",
    "SearchSettings",
    "SensitivitySettings",
    "cache_fingerprint",
    "load_results",
    "resolve_bos",
    "run_search",
]
