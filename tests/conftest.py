"""Shared fixtures: tiny real pipelines of every architecture, saved to disk, and their calibration data.

Everything is built locally from configs (no hub): ``HF_HUB_OFFLINE`` is set before diffusers loads so
any accidental download attempt fails loudly.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from quantdiff.calibration import capture_calibration
from quantdiff.pipelines.loading import load_pipeline
from quantdiff.testing.tiny import TINY_ARCHITECTURES, save_tiny_pipeline

CALIBRATION_PROMPTS = [
    "a red fox in the snow",
    "a watercolor lighthouse on a cliff",
    "a neon sign that says OPEN",
    "portrait of an old fisherman, black and white",
    "a bowl of ramen, overhead photo",
]
# Small but real: 6 sampler steps, 3 of them recorded per prompt, guidance on (both CFG branches).
CAPTURE = dict(num_inference_steps=6, num_timesteps=3, seed=0, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """Fail the test that leaves autograd globally disabled (later tests that train would break)."""
    assert torch.is_grad_enabled(), "an earlier test or fixture left autograd disabled"
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd globally disabled"


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    """arch -> folder of a saved tiny pipeline (built once per test session)."""
    root = tmp_path_factory.mktemp("pipelines")
    return {arch: str(save_tiny_pipeline(arch, root / arch, seed=0)) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def calibration_sets(tiny_folders):
    """arch -> (calibration set of 4 prompts, held-out set of 1 prompt), recorded from the real pipeline."""
    sets = {}
    for arch, folder in tiny_folders.items():
        pipe = load_pipeline(folder)
        recorded = capture_calibration(pipe, CALIBRATION_PROMPTS, model_path=folder, **CAPTURE)
        sets[arch] = recorded.split(holdout_prompts=1)
    return sets


@pytest.fixture(params=TINY_ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``). Why: on a
    machine shared by several processes, two OpenMP threads that wait for each other made tiny-model tests 30-70x
    slower (a tiny calibration: 1.1 s with one thread, 33-80 s with two at load 11 on 2 cores); results do not
    depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
