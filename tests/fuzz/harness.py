"""Fuzz one loader of user files for as long as asked.

    .venv/bin/python tests/fuzz/harness.py TARGET [--seconds S] [--runs N] [--engine atheris|random]

TARGET is one of ``tests/fuzz/targets.py``'s :data:`TARGETS`. The default engine is atheris
(coverage-guided libFuzzer over the Python code, ``pip install -e .[dev]``), with the structure-aware
mutator of ``targets.mutate`` (JSON trees, safetensors headers) mixed with libFuzzer's byte mutations; the
``random`` engine is the same mutator alone, seeded, with the standard library only. An input that raises
anything but a ``QuantDiffError`` is saved under ``tests/fuzz/crashes/TARGET/`` (atheris: ``crash-*`` in
the working folder, move it there) and the harness exits non-zero; ``tests/test_fuzz.py`` replays every
saved crash as a regression test. ``QUANTDIFF_FUZZ_WORKSPACE`` keeps the built folders between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __name__ == "__main__" and "--engine=random" not in sys.argv and "random" not in sys.argv:
    # Coverage needs quantdiff's modules instrumented as they are first imported, before anything else is.
    try:
        import atheris

        with atheris.instrument_imports(include=["quantdiff"]):
            import quantdiff.calibration.dataset  # noqa: F401
            import quantdiff.generate  # noqa: F401
            import quantdiff.jsonfile  # noqa: F401
            import quantdiff.plan  # noqa: F401
            import quantdiff.recipe  # noqa: F401
            import quantdiff.serialization  # noqa: F401
    except ImportError:
        pass

from targets import CRASHES, TARGETS, Workspace, mutate  # noqa: E402


def run_random(workspace: Workspace, name: str, runs: int, seconds: float, seed: int) -> tuple[int, list[Path]]:
    """Mutate the seeds ``runs`` times (or for ``seconds``); returns the iterations and the crashes saved."""
    target = workspace.target(name)
    rng = random.Random(seed)
    corpus = list(workspace.seeds[name])
    crashes: list[Path] = []
    deadline = time.monotonic() + seconds
    iterations = 0
    while iterations < runs and time.monotonic() < deadline:
        data = mutate(rng.choice(corpus), rng)
        iterations += 1
        try:
            target(data)
        except Exception:  # a finding: keep the input
            crashes.append(save_crash(name, data))
            traceback.print_exc()
        finally:
            workspace.restore()
        if rng.random() < 0.05 and len(corpus) < 64:
            corpus.append(data)  # keep some mutants as parents: deeper, multi-step mutations
    return iterations, crashes


def save_crash(name: str, data: bytes) -> Path:
    folder = CRASHES / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def run_atheris(workspace: Workspace, name: str, runs: int, seconds: float) -> None:
    import atheris

    target = workspace.target(name)
    corpus = Path(workspace.root) / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(workspace.seeds[name]):
        (corpus / f"seed-{index}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        try:
            target(data)
        finally:
            workspace.restore()

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate(data, rng, max_size)

    largest = max(len(seed) for seed in workspace.seeds[name])
    argv = [sys.argv[0], str(corpus), f"-max_len={largest * 2}", "-timeout=20", "-rss_limit_mb=4096"]
    argv += [f"-runs={runs}"] if runs else []
    argv += [f"-max_total_time={int(seconds)}"] if seconds != float("inf") else []
    atheris.Setup(argv, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--seconds", type=float, default=float("inf"), help="stop after this long")
    parser.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: no limit)")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument("--seed", type=int, default=0, help="random engine: the mutation seed")
    args = parser.parse_args()
    if args.seconds == float("inf") and not args.runs:
        parser.error("give --seconds or --runs")
    root = os.environ.get("QUANTDIFF_FUZZ_WORKSPACE") or tempfile.mkdtemp(prefix="quantdiff-fuzz-")
    workspace = Workspace(root)
    if args.engine == "atheris":
        run_atheris(workspace, args.target, args.runs, args.seconds)
        return 0
    iterations, crashes = run_random(workspace, args.target, args.runs or sys.maxsize, args.seconds, args.seed)
    print(f"{args.target}: {iterations} inputs, {len(crashes)} crashes" + "".join(f"\n  {c}" for c in crashes))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
