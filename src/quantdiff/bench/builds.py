"""What the runner and the methods' builders share: the context a builder gets (:class:`_Context`), the model
it returns (:class:`_Built`), and small helpers (calling a denoiser, weight-sharing copies, one-line errors).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from quantdiff.calibration.dataset import denoiser_output


class MethodUnavailable(Exception):
    """Raised by a builder when its method cannot run on this machine (the row reads ``skipped``)."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300].rstrip(": ")


def _share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer with ``model`` (no weight memory).

    Methods that convert a model in place start from this, so the fp32 reference stays intact and no
    second fp32 copy is ever made (an SDXL UNet is 10 GB).
    """
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _call(module: Callable, inputs: Mapping[str, Any]) -> Tensor:
    return denoiser_output(module(**inputs))


@dataclass
class _Built:
    """A method's model, ready to call on the evaluation input (mutable: the runner fills in measurements)."""

    call: Callable[[], Tensor] | None  # eager call; None: only the compiled row exists (PT2E)
    module: nn.Module | None = None  # what torch.compile wraps
    path: str = ""
    path_detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    stored_bytes: int | None = None
    kernel_bytes: int | None = None
    weight_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    inductor_changes: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    start_rss: int = 0  # settled RSS before the build
    setup_peak: int = 0  # highest RSS while building and in its first calls
    held: int = 0  # RSS the build (and its eager first calls) added


class _Context:
    """What builds need from a case: the fp32 reference, the inputs, the calibration set, threads."""

    def __init__(self, spec, reference, inputs, calibration, threads, ort_model: Path | None):
        self.spec = spec
        self.reference = reference
        self.inputs = inputs
        self.calibration = calibration
        self.threads = threads
        self.ort_model = ort_model
