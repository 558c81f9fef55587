"""Calibration taps: what algorithms see of layers and blocks while the calibration set is replayed.

Everything here is hooks, owned by the object or function that adds them and removed on exit, on the
denoiser as diffusers built it (no forked code):

* :class:`Taps`: stream a layer's input (at the point where it is quantized: after an input pre-scale), a
  layer's output, or a block's call (arguments and output) to a callback, for any replay;
* :func:`accumulate_second_moments`: ``X^T X`` of chosen layers' inputs (convolutions as im2col rows), the
  statistic GPTQ-style methods need, in float64 with bounded memory (K x K per layer);
* :func:`sample_layer_inputs`: a uniform sample of input rows (tokens / pixels) per layer, at most
  ``max_rows`` each, for methods that need the inputs themselves;
* :func:`record_block_io`: the inputs and outputs of one block over the replay, as many calls as fit in a
  memory budget (an even spread of the records when not all fit), for block reconstruction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from quantdiff.calibration.dataset import CalibrationSet, denoiser_output


class Taps:
    """Callbacks on layers' inputs / outputs and blocks' calls; every hook is removed by :meth:`remove`
    (or on leaving the ``with`` block)."""

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser
        self._handles: list[Any] = []

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_layer_input(self, name: str, callback: Callable[[Tensor], None]) -> None:
        """``callback(x)`` with each input of layer ``name``: for a quantized layer the tensor it quantizes
        (after its input pre-scale), for a float layer its first argument."""
        from quantdiff.nn.quantized import QuantizedLayer

        module = self.denoiser.get_submodule(name)
        if isinstance(module, QuantizedLayer):
            self._handles.append(module.register_input_tap(callback))
        else:
            self._handles.append(module.register_forward_pre_hook(lambda _module, args: callback(args[0])))

    def on_layer_output(self, name: str, callback: Callable[[Tensor], None]) -> None:
        """``callback(y)`` with each output of layer (or block) ``name``."""
        module = self.denoiser.get_submodule(name)
        self._handles.append(module.register_forward_hook(lambda _module, _args, output: callback(output)))

    def on_block(self, name: str, callback: Callable[[BlockCall], None]) -> None:
        """``callback(call)`` with each call of module ``name``: its arguments, keyword arguments and output."""
        module = self.denoiser.get_submodule(name)

        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            callback(BlockCall(args, kwargs, output))

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))


@dataclass
class BlockCall:
    """One call of a block: positional and keyword arguments, and what it returned."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as the rows its weight multiplies: ``(N, K)`` with ``K`` the reduction size.

    Linear: every token ``(..., C_in) -> (N, C_in)``. Conv2d: im2col, one row per output pixel
    ``(N, C_in * kh * kw)``, in the order of ``weight.reshape(C_out, -1)`` (one group only).
    """
    if not hasattr(module, "groups"):  # Linear / QuantizedLinear
        return x.reshape(-1, x.shape[-1])
    if module.groups != 1:
        raise ValueError("input rows of a grouped convolution are not one matrix: quantize it per group")
    kernel_size = tuple(module.weight_shape[2:]) if hasattr(module, "weight_shape") else module.kernel_size
    padding = module.padding
    if isinstance(padding, str):
        from quantdiff.nn.kernels import ConvGeometry

        padding = ConvGeometry.of(module).explicit_padding(kernel_size)
        if padding is None:
            raise ValueError("input rows of a convolution with asymmetric 'same' padding are not supported")
    x4 = x if x.dim() == 4 else x.unsqueeze(0)  # (N, C_in, H, W)
    columns = F.unfold(x4, kernel_size, _pair(module.dilation), _pair(padding), _pair(module.stride))
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])  # (N * L, C_in * kh * kw)


@dataclass
class SecondMoment:
    """``sum X^T X`` over the input rows of one layer, accumulated in float64.

    Attributes:
        total: ``(K, K)`` float64 sum of outer products.
        rows: rows accumulated.
    """

    total: Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, features: int) -> SecondMoment:
        return cls(torch.zeros(features, features, dtype=torch.float64))

    def update(self, rows: Tensor) -> None:
        """Add ``rows`` ``(N, K)``."""
        rows64 = rows.detach().to(torch.float64)
        self.total.addmm_(rows64.t(), rows64)  # (K, N) @ (N, K)
        self.rows += rows.shape[0]

    @property
    def mean(self) -> Tensor:
        """``X^T X / N``: the layer's input second moment (GPTQ's Hessian up to a factor 2)."""
        return self.total / max(self.rows, 1)


def accumulate_second_moments(
    denoiser: nn.Module,
    names: Iterable[str],
    calibration: CalibrationSet,
    *,
    progress: bool = True,
    desc: str = "input statistics",
) -> dict[str, SecondMoment]:
    """Replay ``calibration`` and accumulate ``X^T X`` of each named layer's input rows (see :func:`input_rows`)."""
    moments: dict[str, SecondMoment] = {}
    with Taps(denoiser) as taps:
        for name in names:
            module = denoiser.get_submodule(name)

            def accumulate(x: Tensor, name: str = name, module: nn.Module = module) -> None:
                rows = input_rows(module, x.detach())
                if name not in moments:
                    moments[name] = SecondMoment.zeros(rows.shape[1])
                moments[name].update(rows)

            taps.on_layer_input(name, accumulate)
        for _ in calibration.replay(denoiser, progress=progress, desc=desc):
            pass
    return moments


def sample_layer_inputs(
    denoiser: nn.Module,
    names: Iterable[str],
    calibration: CalibrationSet,
    *,
    max_rows: int = 4096,
    seed: int = 0,
    progress: bool = True,
    desc: str = "sample layer inputs",
) -> dict[str, Tensor]:
    """Up to ``max_rows`` input rows per named layer, drawn uniformly from every replayed call.

    Each call contributes ``ceil(max_rows / calls)`` rows chosen at random (deterministic for ``seed``), so
    memory stays bounded by ``max_rows`` rows per layer whatever the calibration set's size.
    """
    per_call = math.ceil(max_rows / max(len(calibration), 1))
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[Tensor]] = {}
    with Taps(denoiser) as taps:
        for name in names:
            module = denoiser.get_submodule(name)

            def keep(x: Tensor, name: str = name, module: nn.Module = module) -> None:
                rows = input_rows(module, x.detach())  # (N, K)
                if rows.shape[0] > per_call:
                    rows = rows[torch.randperm(rows.shape[0], generator=generator)[:per_call]]
                samples.setdefault(name, []).append(rows.float().cpu())

            taps.on_layer_input(name, keep)
        for _ in calibration.replay(denoiser, progress=progress, desc=desc):
            pass
    return {name: torch.cat(parts)[:max_rows] for name, parts in samples.items()}


@dataclass
class RecordedBlock:
    """A block's calls during a replay: detached CPU copies of their arguments and outputs.

    Attributes:
        name: the block's qualified name.
        calls: the recorded calls, in replay order.
        records: indices of the calibration records they came from.
        skipped_records: records not replayed because the memory budget was reached.
    """

    name: str
    calls: list[BlockCall] = field(default_factory=list)
    records: list[int] = field(default_factory=list)
    skipped_records: int = 0

    @property
    def nbytes(self) -> int:
        return sum(
            _tensor_bytes(call.args) + _tensor_bytes(call.kwargs) + _tensor_bytes(call.output) for call in self.calls
        )


def record_block_io(
    denoiser: nn.Module,
    name: str,
    calibration: CalibrationSet,
    *,
    max_bytes: int = 2 << 30,
    progress: bool = True,
) -> RecordedBlock:
    """Replay ``calibration`` and keep every call of block ``name`` (arguments and outputs), within ``max_bytes``.

    The first record is replayed alone to measure what one record costs; if the whole set would not fit,
    an even spread of the records that fit is replayed instead, and a warning says how many were left out.
    """
    recorded = RecordedBlock(name)
    record_bytes = 0

    def keep(call: BlockCall) -> None:
        recorded.calls.append(
            BlockCall(detached_copy(call.args), detached_copy(call.kwargs), detached_copy(call.output))
        )

    with Taps(denoiser) as taps:
        taps.on_block(name, keep)
        for _ in calibration.subset_by_index([0]).replay(denoiser, progress=False):
            pass
        record_bytes = max(recorded.nbytes, 1)
        recorded.records.append(0)
        fit = max(1, min(len(calibration), max_bytes // record_bytes))
        chosen = even_spread(len(calibration), fit)
        rest = [index for index in chosen if index != 0]
        for _ in calibration.subset_by_index(rest).replay(denoiser, progress=progress, desc=f"record {name}"):
            pass
        recorded.records.extend(rest)
    recorded.skipped_records = len(calibration) - len(recorded.records)
    if recorded.skipped_records:
        warnings.warn(
            f"block {name!r}: {recorded.skipped_records} of {len(calibration)} calibration records left out to stay "
            f"within {max_bytes / 2**30:.1f} GiB ({record_bytes / 2**20:.1f} MiB per record)",
            stacklevel=2,
        )
    return recorded


def even_spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (first and last included), or all of them."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def detached_copy(value: Any) -> Any:
    """``value`` (tensors, nested in dicts / tuples / lists / diffusers outputs) as detached CPU copies."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(detached_copy(item) for item in value)
    if hasattr(value, "sample") and isinstance(value.sample, Tensor):  # diffusers output dataclasses
        return detached_copy(denoiser_output(value))
    return value


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    return 0
