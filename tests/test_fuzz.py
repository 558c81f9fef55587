"""Fuzzing every loader of user files: a bounded run in the suite, every saved crash replayed.

The targets and the mutator live in ``tests/fuzz/targets.py``; ``tests/fuzz/harness.py`` runs one target
for as long as asked (atheris, coverage-guided). Here each target gets ``QUANTDIFF_FUZZ_ITERATIONS``
mutated inputs (default: a few seconds' worth) from a fixed seed, and every input that once crashed a
loader (``tests/fuzz/crashes/``) must now end in a ``QuantDiffError`` or load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

from harness import run_random  # noqa: E402
from targets import CRASHES, TARGETS, Workspace  # noqa: E402

from quantdiff.generate import parse_a1111_parameters  # noqa: E402

# Inputs per target in the suite: loaders that build the model skeleton (~0.1 s each) get fewer.
ITERATIONS = {name: 300 for name in TARGETS} | {"safetensors": 40, "quantdiff_json": 40}
SCALE = float(os.environ.get("QUANTDIFF_FUZZ_ITERATIONS_SCALE", "1"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("fuzz"))


def _saved_crashes() -> list[Path]:
    return sorted(path for path in CRASHES.glob("*/crash-*") if path.is_file())


def test_the_saved_crashes_cover_the_loaders():
    assert {path.parent.name for path in _saved_crashes()} == {
        "calibration_index",
        "quantdiff_json",
        "recipe_json",
        "recipe_yaml",
    }
    assert len(_saved_crashes()) == 16


@pytest.mark.parametrize("path", _saved_crashes(), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_a_saved_crash_now_ends_in_our_error(workspace, path):
    try:
        workspace.target(path.parent.name)(path.read_bytes())  # raises on anything but a one-line QuantDiffError
    finally:
        workspace.restore()


@pytest.mark.parametrize("name", TARGETS)
def test_bounded_fuzz_run_finds_nothing(workspace, name, capsys):
    runs = max(1, int(ITERATIONS[name] * SCALE))
    started = time.perf_counter()
    iterations, crashes = run_random(workspace, name, runs, seconds=float("inf"), seed=19)
    seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nfuzz {name}: {iterations} inputs in {seconds:.1f} s, {len(crashes)} crashes")
    assert iterations == runs
    assert crashes == [], f"new crashes saved under {CRASHES / name}: make each end in a QuantDiffError"


def test_png_parameters_parser_is_linear():
    """The old fields regex backtracked quadratically: 8 k characters took 0.5 s, so a 1 MB chunk took hours."""
    text = "prompt\n" + "A" * 1_000_000 + ", Steps: 2"
    started = time.perf_counter()
    parsed = parse_a1111_parameters(text)
    assert time.perf_counter() - started < 1.0
    assert parsed["prompt"] == "prompt" and parsed["Steps"] == "2"


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True).returncode != 0,
    reason="atheris is not installed (pip install -e .[dev])",
)
def test_atheris_harness_runs_coverage_guided(workspace):
    harness = Path(__file__).parent / "fuzz" / "harness.py"
    env = {**os.environ, "QUANTDIFF_FUZZ_WORKSPACE": str(workspace.root), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(harness), "recipe_json", "--runs", "300"],
        capture_output=True,
        text=True,
        env=env,
        cwd=workspace.root,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 300 runs" in result.stderr
