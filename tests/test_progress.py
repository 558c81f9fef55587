"""Progress display: a live bar on a terminal, one summary line in a log, nothing with --quiet; and what
the command line writes to a log (no bar frames, no library warning blocks)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from quantdiff import progress as progress_module
from quantdiff.progress import Progress, bars_wanted, format_seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """perf_counter advances 1.5 s per call, so durations are exact."""
    now = [100.0]

    def tick() -> float:
        now[0] += 1.5
        return now[0]

    monkeypatch.setattr(progress_module.time, "perf_counter", tick)


def test_in_a_log_each_step_writes_one_summary_line(clock):
    log = io.StringIO()
    assert list(Progress(["a", "b", "c"], desc="calibrate (trajectory)", unit="prompt", stream=log)) == ["a", "b", "c"]
    with Progress(total=4, desc="fp", unit="img", stream=log) as bar:
        bar.update(3)
        bar.set_postfix_str("batch 2")
        bar.update(1)
    for _ in Progress(range(1), desc="quantize weights", unit="layer", leave=False, stream=log):
        pass
    assert log.getvalue() == (
        "calibrate (trajectory): 3 prompts in 1.5 s\nfp: 4 img in 1.5 s\nquantize weights: 1 layer in 1.5 s\n"
    )


def test_a_failing_step_writes_no_summary_and_quiet_writes_nothing(clock):
    log = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(total=4, desc="fp", unit="img", stream=log) as bar:
            bar.update(1)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        for _ in Progress(range(5), desc="replay", unit="call", stream=log):
            raise RuntimeError("boom")
    assert list(Progress(range(3), desc="replay", unit="call", enabled=False, stream=log)) == [0, 1, 2]
    assert log.getvalue() == ""
    stopped = Progress(total=4, desc="fp", unit="img", stream=log)
    stopped.update(2)
    stopped.close()
    stopped.close()
    assert log.getvalue() == "fp: 2/4 img in 1.5 s\n"


def test_on_a_terminal_it_is_a_tqdm_bar():
    terminal = _Terminal()
    shown = Progress(range(3), desc="calibrate (trajectory)", unit="prompt", stream=terminal)
    assert shown.mode == "bar" and list(shown) == [0, 1, 2]
    text = terminal.getvalue()
    assert "\r" in text and "calibrate (trajectory): 100%" in text and "3/3" in text
    assert "in 1.5 s" not in text and "prompts in" not in text
    assert Progress(range(3), stream=io.StringIO()).mode == "summary"
    assert Progress(range(3), stream=terminal, enabled=False).mode == "off"
    assert bars_wanted(True, terminal) and not bars_wanted(False, terminal) and not bars_wanted(True, io.StringIO())


def test_format_seconds():
    assert [format_seconds(s) for s in (0.04, 9.96, 83.4, 599.4, 725.0)] == [
        "0.0 s",
        "10.0 s",
        "83 s",
        "599 s",
        "12 min 5 s",
    ]


def test_generate_into_a_log_writes_no_bar_frames_and_no_warning_blocks(tiny_folders, tmp_path):
    # A real process with stderr to a pipe, as in `quantdiff generate ... > log 2>&1`: library loggers hold the
    # process's own stderr, which pytest's capture fixtures do not see.
    out = tmp_path / "image.png"
    argv = ["generate", tiny_folders["sd15"], "--prompt", "a cat", "--steps", "3", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "quantdiff.cli", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"64x64 image, seed 0, floating point -> {out}\n"
    # No per-step bar, no component-loading bar, no accelerate block, no torchvision notes.
    assert done.stderr == ""
