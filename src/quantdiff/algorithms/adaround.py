"""AdaRound (Nagel et al., 2020) inside BRECQ block reconstruction (Li et al., 2021), as Q-Diffusion uses it.

Rounding every weight to its nearest grid point minimises each weight's own error, not the error of what
the layer computes. AdaRound learns, per weight, whether to round down or up: with ``b = floor(W / s)``
the weight is ``s * (clamp(b + h(V) + z, qmin, qmax) - z)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1), initialised so that
``h(V0)`` is the fractional part of ``W / s`` (the soft weight starts at the float weight), and trained on

    |B_q(x_q) - B_fp(x_fp)|^2 + lambda * sum(1 - |2 h(V) - 1| ** beta)

where the regulariser, off for the first ``warmup`` of the iterations, then with ``beta`` annealed from 20
to 2, pushes every ``h`` to exactly 0 or 1; the final integer is ``b + 1[V >= 0]``.

BRECQ's part is what the loss covers: a whole *block* (a UNet resnet or transformer block, a DiT block:
architecture data, ``pipelines/architectures.py`` ``reconstruction_blocks``), so that the rounding of one
layer can compensate another's. Blocks are reconstructed in the order the denoiser runs them; a block's
inputs ``x_q`` come from the already-reconstructed, quantized blocks before it, its targets from the
floating-point model (Q-Diffusion's ``asym=True``), over calibration records drawn evenly across timesteps.
Quantized layers outside every block are reconstructed alone (layer reconstruction).

Where a layer's input is quantized with a calibrated scale, the block runs with fake-quantized inputs and
the scale is learned jointly with the rounding (LSQ, Esser et al., 2020: the straight-through gradient of
``s * (clamp(round(x / s) + z) - z)`` with respect to ``s``), starting from the observed one; dynamic
inputs (per tensor or per token) are quantized per call as at inference.

An earlier weight-rounding algorithm in the recipe (GPTQ) gives the starting point instead of the float
weight: AdaRound then chooses, per weight, between GPTQ's integer and its neighbour towards the float
weight, starting at ``h = 0.25`` / ``0.75`` on GPTQ's side, with GPTQ's scales. GPTQ has already spread the
rounding error over the columns with the layer's input Hessian; the block loss then corrects what a
per-layer, second-order view cannot see (the other layers of the block, quantized inputs, non-linearities).

Memory: a block's recorded inputs and targets are cached for its optimisation, at most ``max_cache_mib``.
When the calibration set's records do not all fit, an even spread over the timesteps of as many records as
fit is used and a warning says how many were left out.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.calibration.dataset import CalibrationSet, denoiser_output
from quantdiff.calibration.taps import BlockCall, Taps, detached_copy
from quantdiff.errors import RecipeError
from quantdiff.nn.weights import QuantizedWeight, dequantize_weight, quantize_weight
from quantdiff.pipelines.architectures import reconstruction_blocks_of
from quantdiff.primitives import fake_quantize, integer_range, pack_int4, round_ste, unpack_int4
from quantdiff.progress import Progress
from quantdiff.recipe import TensorSpec

if TYPE_CHECKING:  # nn.quantized imports the kernels, which import recipe.py, which builds presets from here
    from quantdiff.nn.quantized import InputQParams, QuantizedLayer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound, eq. 23)
_START_FROM_ROUNDED = 0.25  # h0 on the earlier rounding's side of a weight (see the module docstring)


# ------------------------------------------------------------------------------------------------ pure math
def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``: exactly 0 or 1 beyond ``|V| ~ 2.4``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_logits(fraction: Tensor) -> Tensor:
    """``V0`` with ``h(V0) = fraction`` for ``fraction`` in ``[0, 1)`` (the inverse of :func:`rectified_sigmoid`)."""
    return -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1)


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2 h(V) - 1| ** beta)``: 0 when every ``h`` is 0 or 1; a large ``beta`` leaves ``h`` free
    except near 0.5, ``beta = 2`` pulls every ``h`` to its nearer end."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def annealed_beta(step: int, iterations: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """``beta`` at ``step``: ``None`` (no regulariser) during the first ``warmup`` fraction of the iterations,
    then linear from ``beta[0]`` to ``beta[1]`` (AdaRound's and Q-Diffusion's schedule)."""
    start = warmup * iterations
    if step < start:
        return None
    progress = (step - start) / max(iterations - start, 1)
    return beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - progress)


def expand_rows(values: Tensor, spec: TensorSpec, c_out: int, k: int) -> Tensor:
    """Stored scales / zero points ``(rows, G)`` laid out over the weight ``(C_out, K)``."""
    if spec.granularity == "group":
        return values.repeat_interleave(spec.group_size, dim=1)[:, :k]  # (C_out, K)
    return values.expand(c_out, k)  # per channel (C_out, 1) or per tensor (1, 1)


@dataclass
class LearnedRounding:
    """One layer's rounding variables: ``V`` ``(C_out, K)`` on the grid of ``scale`` / ``zero_point``.

    Attributes:
        base: ``(C_out, K)`` the integer each weight rounds up from (``floor(W / s)``), as floats.
        v: ``(C_out, K)`` the rounding logits (trained).
        scale: ``(C_out, K)`` each weight's scale; zero_point likewise (0 for symmetric specs).
        spec: the weight spec (range, storage).
        stored_scale: the stored scales ``(rows, G)``; stored_zero_point likewise or ``None``.
    """

    base: Tensor
    v: Tensor
    scale: Tensor
    zero_point: Tensor
    spec: TensorSpec
    stored_scale: Tensor
    stored_zero_point: Tensor | None

    @classmethod
    def start(cls, weight: Tensor, spec: TensorSpec, rounded: QuantizedWeight | None = None) -> LearnedRounding:
        """Rounding variables of ``weight`` ``(C_out, K)``: at its fractional parts on the spec's grid (scales
        from the spec's observer), or on an earlier algorithm's integers ``rounded`` and their grid."""
        if spec.pair_safe:
            raise RecipeError(
                "adaround: pair-safe weights are chosen by their own search; use plain int8 weights with adaround"
            )
        w = weight.detach().float()  # (C_out, K)
        c_out, k = w.shape
        stored = rounded if rounded is not None else quantize_weight(w, spec)
        scale = expand_rows(stored.weight_scale.float(), spec, c_out, k)  # (C_out, K)
        zero_point = (
            torch.zeros(())
            if stored.weight_zero_point is None
            else expand_rows(stored.weight_zero_point, spec, c_out, k)
        ).float()
        exact = w / scale  # (C_out, K) the float weight on the integer grid
        if rounded is None:
            base = torch.floor(exact)
            fraction = exact - base
        else:  # between the earlier integer and its neighbour towards the float weight, on the integer's side
            chosen = _integers(rounded.weight_q, spec, k).float() - zero_point  # (C_out, K)
            up = exact > chosen  # the float weight lies above the chosen integer: the neighbour is chosen + 1
            base = torch.where(up, chosen, chosen - 1)
            fraction = torch.where(
                up, torch.full_like(w, _START_FROM_ROUNDED), torch.full_like(w, 1 - _START_FROM_ROUNDED)
            )
        v = initial_logits(fraction.clamp(0, 1 - 1e-6)).requires_grad_(True)
        return cls(base, v, scale, zero_point, spec, stored.weight_scale, stored.weight_zero_point)

    def soft_weight(self) -> Tensor:
        """The weight with soft rounding ``(C_out, K)``, differentiable in ``V``."""
        low, high = integer_range(self.spec.bits, self.spec.symmetric)
        q = torch.clamp(self.base + rectified_sigmoid(self.v) + self.zero_point, low, high)
        return (q - self.zero_point) * self.scale

    def integers(self) -> Tensor:
        """The hard integers ``clamp(b + 1[V >= 0] + z)`` ``(C_out, K)``, int32."""
        low, high = integer_range(self.spec.bits, self.spec.symmetric)
        q = torch.clamp(self.base + (self.v.detach() >= 0).float() + self.zero_point, low, high)
        return q.to(torch.int32)

    def quantized_weight(self) -> QuantizedWeight:
        """The hard rounding in the stored layout (:mod:`quantdiff.nn.weights`)."""
        q = self.integers().to(torch.int8 if self.spec.symmetric else torch.uint8)
        if self.spec.packed:
            q = pack_int4(q)  # (C_out, ceil(K/2))
        zero_point = None if self.stored_zero_point is None else self.stored_zero_point.to(torch.int32).contiguous()
        return QuantizedWeight(q.contiguous(), self.stored_scale.float().contiguous(), zero_point)


def _integers(weight_q: Tensor, spec: TensorSpec, k: int) -> Tensor:
    """Stored integers ``(C_out, K)`` (unpacked)."""
    return unpack_int4(weight_q, k, signed=spec.symmetric) if spec.packed else weight_q


@dataclass
class LearnedInputScale:
    """A layer's static input scale, learned by LSQ: ``s = s0 * exp(u)`` (``u`` trained from 0, so the step is
    relative whatever the layer's range), the zero point kept as observed.

    Attributes:
        u: the log-ratio to the observed scale, one per part (1, or 2 with a split input).
        initial: the observed scales ``(P,)``.
        zero_point: the observed zero points ``(P,)``.
        spec: the input spec (bits, symmetric).
        split_at: channels of the first part of a split input (``input_split`` extra), or None.
    """

    u: Tensor
    initial: Tensor
    zero_point: Tensor
    spec: TensorSpec
    split_at: int | None = None

    @classmethod
    def start(cls, qparams: InputQParams, spec: TensorSpec, split_at: int | None = None) -> LearnedInputScale:
        initial = qparams.scale.detach().float().reshape(-1)
        return cls(
            torch.zeros_like(initial, requires_grad=True), initial, qparams.zero_point.reshape(-1), spec, split_at
        )

    def scale(self) -> Tensor:
        return self.initial * torch.exp(self.u)

    def fake_quantize(self, x: Tensor, channel_dim: int, learn: bool) -> Tensor:
        """``x`` fake-quantized with the learned scale; differentiable in the scale (LSQ) when ``learn``,
        bit-identical to the stored layer's input quantization when not."""
        scale = self.scale() if learn else self.scale().detach()
        zero_point = self.zero_point.float()
        if self.split_at is not None:  # one pair per part, laid out per channel
            sizes = torch.tensor([self.split_at, x.shape[channel_dim] - self.split_at])
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            scale = scale.repeat_interleave(sizes).reshape(shape)
            zero_point = zero_point.repeat_interleave(sizes).reshape(shape)
        else:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        if not learn:
            return fake_quantize(x, scale, zero_point.to(torch.int32), self.spec.bits, self.spec.symmetric)
        low, high = integer_range(self.spec.bits, self.spec.symmetric)
        return (torch.clamp(round_ste(x / scale) + zero_point, low, high) - zero_point) * scale

    def qparams(self) -> InputQParams:
        from quantdiff.nn.quantized import InputQParams

        return InputQParams(self.scale().detach().float().clone(), self.zero_point.clone())


def reconstruction_loss(outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Squared error summed over the channel dimension, averaged over everything else (BRECQ's ``lp_loss``),
    added over a block's output tensors. Channels: dim 1 of ``(N, C, H, W)``, the last dim of ``(B, T, C)``."""
    total = torch.zeros(())
    for output, target in zip(outputs, targets, strict=True):
        channel = 1 if output.dim() == 4 else -1
        total = total + (output - target).pow(2).sum(dim=channel).mean()
    return total


def optimize_rounding(
    roundings: Sequence[LearnedRounding],
    scales: Sequence[LearnedInputScale],
    batch_loss: Callable[[int], Tensor],
    *,
    iterations: int,
    lr: float,
    scale_lr: float,
    reg_weight: float,
    warmup: float,
    beta: tuple[float, float],
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Train the rounding logits (Adam, ``lr``) and input scales (Adam, ``scale_lr`` with a cosine decay) on
    ``batch_loss(step)`` plus the annealed rounding regulariser (see the module docstring)."""
    groups = [{"params": [r.v for r in roundings], "lr": lr}]
    if scales:
        groups.append({"params": [s.u for s in scales], "lr": scale_lr})
    optimizer = torch.optim.Adam(groups)
    for step in range(iterations):
        if scales:  # cosine decay of the step-size learning rate (Q-Diffusion's activation schedule)
            optimizer.param_groups[1]["lr"] = scale_lr * 0.5 * (1 + math.cos(math.pi * step / iterations))
        loss = batch_loss(step)
        b = annealed_beta(step, iterations, warmup, beta)
        if b is not None and roundings:
            loss = loss + reg_weight * sum(rounding_regularizer(r.v, b) for r in roundings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))


# ------------------------------------------------------------------------------- the model-facing part
class ReconstructionLayer(nn.Module):
    """Stands in for a prepared quantized layer (swapped in by its name) while blocks are reconstructed.

    Modes: ``"float"``: the prepared layer itself (the floating-point model, for targets); ``"soft"``: soft
    rounding and learned input scale (training); ``"hard"``: the final integers and scale, computing what the
    converted layer's reference path computes (for the inputs of later blocks). The layer's own pre-scale,
    op and low-rank branch are used, so every extra computes as in its forward.
    """

    def __init__(self, layer: QuantizedLayer, rounding: LearnedRounding, input_scale: LearnedInputScale | None):
        super().__init__()
        self.layer = layer
        self.rounding: LearnedRounding | None = rounding
        self.input_scale = input_scale
        self.mode = "soft"
        self.quantized_weight: QuantizedWeight | None = None  # the final integers, once hardened
        self._hard_weight: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        # Everything else is the layer's (its plan, extras and their tensors): code that reads them from the
        # module in this place, e.g. the BOS-aware attention processor's precomputed first-token row, keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def harden(self) -> None:
        """Fix the integers (``V >= 0``) and the learned scale; compute with them from now on. The rounding
        variables are released here: ``V``, its gradient, the floors and the expanded scales are 16 bytes per
        weight, which kept for every layer until the end outgrew the model itself (SD1.5's UNet: 16 GB RSS at
        its up blocks); the integers and the float weight they stand for are 5."""
        spec, shape = self.layer.weight_spec, self.layer.weight_shape
        self.quantized_weight = self.rounding.quantized_weight()
        self._hard_weight = dequantize_weight(*self.quantized_weight, spec, shape)
        self.rounding = None
        self.mode = "hard"

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "float":
            return self.layer(x)
        layer = self.layer
        x = layer.balanced_input(x)  # the prepared layer's own steps: see the class docstring
        learn = self.mode == "soft"
        if self.input_scale is not None:
            x_q = self.input_scale.fake_quantize(x, layer._channel_dim(x), learn)
        elif layer.input_spec is not None and layer.input_spec.dynamic:
            x_q = layer.quantize_input(x)
        else:
            x_q = x  # weight-only, or per-timestep scales (see AdaRound.apply)
        weight = self.rounding.soft_weight().reshape(layer.weight_shape) if learn else self._hard_weight
        return layer._with_branch(layer._op(x_q, weight.to(x.dtype), layer.bias), x)


@dataclass
class Unit:
    """What is reconstructed together: a block (or a lone layer) and its quantized layers.

    Attributes:
        name: the module's qualified name.
        layers: its quantized layers, in module order.
        calls_per_record: how often the denoiser calls it per record.
        input_bytes: bytes of its recorded inputs per record; output_bytes likewise for its outputs.
        seconds: time its optimisation took (for cost reports).
    """

    name: str
    layers: list[str]
    calls_per_record: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0

    @property
    def record_bytes(self) -> int:
        return self.input_bytes + self.output_bytes


def find_units(context: QuantizationContext, calibration: CalibrationSet) -> list[Unit]:
    """The blocks (architecture data) holding quantized layers and the quantized layers outside them, in the
    order one replayed record runs them; units that never run are left out (convert rounds them to nearest)."""
    layers = [layer.name for layer in context.plan.quantized]
    blocks = reconstruction_blocks_of(context.denoiser, context.architecture)
    units: dict[str, Unit] = {}
    for name in layers:
        block = next((b for b in blocks if name.startswith(b + ".")), name)
        units.setdefault(block, Unit(block, [])).layers.append(name)
    order: list[str] = []

    with Taps(context.denoiser) as taps:
        for unit in units.values():

            def seen(call: BlockCall, unit: Unit = unit) -> None:
                if unit.calls_per_record == 0:
                    order.append(unit.name)
                unit.calls_per_record += 1
                unit.input_bytes += _nbytes((call.args, call.kwargs))
                unit.output_bytes += _nbytes(call.output)

            taps.on_block(unit.name, seen)
        for _ in calibration.subset_by_index([0]).replay(context.denoiser, progress=False):
            pass
    return [units[name] for name in order]


class _StopReplay(Exception):
    """Raised by a tap once the unit being recorded has run: the rest of the denoiser cannot change it."""


def record_units(
    denoiser: nn.Module,
    units: Sequence[Unit],
    calibration: CalibrationSet,
    records: Sequence[int],
    *,
    keep: str,
    desc: str = "record",
    progress: bool = False,
) -> dict[str, list[BlockCall]]:
    """The units' calls over ``records`` (``keep``: ``"inputs"`` or ``"outputs"``), detached on the CPU.

    Each record's replay stops once the last of ``units`` (in running order) has made its
    ``calls_per_record`` calls: the rest of the denoiser cannot change them, and a unit recorded alone
    saves about half a replay on average.
    """
    calls: dict[str, list[BlockCall]] = {unit.name: [] for unit in units}
    last = units[-1]
    count = 0

    def tap(call: BlockCall, unit: Unit) -> None:
        nonlocal count
        if keep == "inputs":
            calls[unit.name].append(BlockCall(detached_copy(call.args), detached_copy(call.kwargs), None))
        else:
            calls[unit.name].append(BlockCall((), {}, detached_copy(call.output)))
        if unit is last:
            count += 1
            if count == unit.calls_per_record:
                raise _StopReplay

    with Taps(denoiser) as taps:
        for unit in units:
            taps.on_block(unit.name, lambda call, unit=unit: tap(call, unit))
        for index in Progress(records, desc=desc, unit="record", enabled=progress, leave=False):
            count = 0
            try:
                for _ in calibration.subset_by_index([index]).replay(denoiser, progress=False):
                    pass
            except _StopReplay:
                pass
    return calls


@dataclass
class CallBatch:
    """A unit's recorded calls, stacked along the batch dimension so that random rows make a minibatch.

    Attributes:
        structure: the first call's ``(args, kwargs)`` with each tensor replaced by a leaf index.
        leaves: per leaf, the stacked tensor ``(rows, ...)`` (batched) or the one shared value.
        batched: per leaf, whether it is indexed by row.
        targets: the recorded outputs' tensors, stacked ``(rows, ...)``.
        rows: samples in all.
    """

    structure: Any
    leaves: list[Any]
    batched: list[bool]
    targets: list[Tensor]
    rows: int

    @classmethod
    def stack(cls, inputs: list[BlockCall], outputs: list[BlockCall]) -> CallBatch | None:
        """Stack the calls; ``None`` when they cannot be (a non-batch tensor that differs between calls)."""
        flat = [_flatten((call.args, call.kwargs)) for call in inputs]
        structure = flat[0][0]
        first_leaves = flat[0][1]
        batch = next((leaf.shape[0] for leaf in first_leaves if isinstance(leaf, Tensor) and leaf.dim() > 0), None)
        if batch is None:
            return None
        leaves, batched = [], []
        for position, leaf in enumerate(first_leaves):
            column = [leaves_of[position] for _, leaves_of in flat]
            if isinstance(leaf, Tensor) and leaf.dim() > 0 and all(t.shape[0] == batch for t in column):
                if any(t.shape[1:] != leaf.shape[1:] for t in column):
                    return None
                leaves.append(torch.cat(column))
                batched.append(True)
            elif all(_same(item, leaf) for item in column):
                leaves.append(leaf)
                batched.append(False)
            else:
                return None
        targets = [torch.cat(parts) for parts in zip(*(_output_tensors(call.output) for call in outputs), strict=True)]
        if any(t.shape[0] != batch * len(inputs) for t in targets):
            return None
        return cls(structure, leaves, batched, targets, batch * len(inputs))

    def inputs(self, rows: Tensor) -> tuple[tuple, dict]:
        leaves = [leaf[rows] if batched else leaf for leaf, batched in zip(self.leaves, self.batched, strict=True)]
        return _unflatten(self.structure, leaves)

    def target(self, rows: Tensor) -> list[Tensor]:
        return [t[rows] for t in self.targets]


@register_algorithm
@dataclass(frozen=True)
class AdaRound(AlgorithmConfig):
    """Learned rounding by block reconstruction, with LSQ input scales (see the module docstring).

    Attributes:
        iterations: optimisation steps per block (Q-Diffusion: 20000 on a GPU; the default fits a CPU).
        batch_size: samples (rows of the recorded calls) per step.
        lr: Adam learning rate of the rounding logits.
        scale_lr: Adam learning rate of the input scales' log-ratios (cosine decay); 0 keeps the observed
            scales.
        reg_weight: lambda, the weight of the rounding regulariser (Q-Diffusion: 0.01).
        warmup: fraction of the iterations without the regulariser.
        beta: the regulariser's exponent, annealed from the first to the second value.
        max_records: calibration records used per block at most (an even spread over the timesteps).
        max_cache_mib: memory for one block's recorded inputs and targets (see the module docstring).
        seed: seed of the record choice and the minibatches.
    """

    TYPE: ClassVar[str] = "adaround"
    STAGE: ClassVar[Stage] = Stage.WEIGHT_ROUNDING

    iterations: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    scale_lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    max_records: int = 128
    max_cache_mib: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("adaround.iterations", self.iterations, 1, integer=True)
        check_number("adaround.batch_size", self.batch_size, 1, integer=True)
        check_number("adaround.lr", self.lr, 0.0, low_open=True)
        check_number("adaround.scale_lr", self.scale_lr, 0.0)
        check_number("adaround.reg_weight", self.reg_weight, 0.0)
        check_number("adaround.warmup", self.warmup, 0.0, 1.0)
        beta = tuple(self.beta) if isinstance(self.beta, (list, tuple)) else self.beta
        if not isinstance(beta, tuple) or len(beta) != 2:
            raise RecipeError(
                f"adaround.beta={self.beta!r} must be two numbers: the start and end exponent, e.g. [20, 2]"
            )
        for value in beta:
            check_number("adaround.beta[]", value, 0.0, low_open=True)
        object.__setattr__(self, "beta", tuple(float(value) for value in beta))
        check_number("adaround.max_records", self.max_records, 1, integer=True)
        check_number("adaround.max_cache_mib", self.max_cache_mib, 1, integer=True)
        check_number("adaround.seed", self.seed, 0, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        calibration = context.calibration_for(self)
        if any(layer.weights.pair_safe for layer in context.plan.quantized):
            raise RecipeError("adaround: pair-safe weights are chosen by their own search; use plain int8 weights")
        units = find_units(context, calibration)
        if not units:
            return
        records = self._records(calibration, units)
        budget = self.max_cache_mib * 2**20
        # The floating-point targets of every unit in one replay when they fit in half the budget (the other
        # half holds one unit's inputs); otherwise each unit's targets are recorded just before it.
        all_targets = sum(unit.output_bytes for unit in units) * len(records) <= budget // 2
        targets: dict[str, list[BlockCall]] = {}
        if all_targets:
            targets = record_units(
                context.denoiser,
                units,
                calibration,
                records,
                keep="outputs",
                desc="adaround targets",
                progress=context.progress,
            )
        swapped: dict[str, ReconstructionLayer] = {}
        results: dict[str, ReconstructionLayer] = {}
        generator = torch.Generator().manual_seed(self.seed)
        unscaled: list[str] = []
        try:
            with Progress(total=len(units), desc="adaround", unit="block", enabled=context.progress) as bar:
                for unit in units:
                    if not all_targets:
                        for wrapper in swapped.values():
                            wrapper.mode = "float"
                        targets = record_units(context.denoiser, [unit], calibration, records, keep="outputs")
                        for wrapper in swapped.values():
                            wrapper.mode = "hard"
                    inputs = record_units(context.denoiser, [unit], calibration, records, keep="inputs")[unit.name]
                    wrappers = {}
                    for name in unit.layers:
                        wrappers[name] = self._wrap(context, name, unscaled)
                        context.denoiser.set_submodule(name, wrappers[name])
                        swapped[name] = wrappers[name]
                    self._reconstruct(context, unit, wrappers, inputs, targets.pop(unit.name), generator)
                    del inputs
                    for wrapper in wrappers.values():
                        wrapper.harden()
                    results.update(wrappers)
                    bar.update()
        finally:
            for name, wrapper in swapped.items():  # whoever swaps restores
                context.denoiser.set_submodule(name, wrapper.layer)
        if unscaled:
            warnings.warn(
                f"adaround: {len(unscaled)} layer(s) have per-timestep input scales, which the recorded block calls "
                f"cannot select: they are reconstructed on float inputs and keep their observed scales, e.g. "
                f"{unscaled[0]}",
                stacklevel=2,
            )
        for name, wrapper in results.items():
            context.rounded_weights.pop(name, None)  # an earlier rounding (GPTQ) was the starting point
            context.round_weight(name, wrapper.quantized_weight, by=self)
            if wrapper.input_scale is not None:
                context.input_qparams[name] = wrapper.input_scale.qparams()

    def _records(self, calibration: CalibrationSet, units: Sequence[Unit]) -> list[int]:
        """Indices of the records every unit uses: up to ``max_records``, fewer where the largest unit's inputs
        and targets would not fit ``max_cache_mib``, spread evenly over the timesteps."""
        largest = max(units, key=lambda unit: unit.record_bytes)
        fit = max(1, self.max_cache_mib * 2**20 // max(largest.record_bytes, 1))
        count = min(len(calibration), self.max_records, fit)
        if fit < min(len(calibration), self.max_records):
            warnings.warn(
                f"adaround: {count} of {len(calibration)} calibration records are used to stay within "
                f"max_cache_mib={self.max_cache_mib} ({largest.record_bytes / 2**20:.1f} MiB per record for block "
                f"{largest.name!r}); raise max_cache_mib to use more",
                stacklevel=3,
            )
        return spread_over_timesteps([record.timestep for record in calibration.records], count, self.seed)

    def _wrap(self, context: QuantizationContext, name: str, unscaled: list[str]) -> ReconstructionLayer:
        module = context.module(name)
        layer = context.plan[name]
        weight = module.weight.detach().reshape(layer.out_features, -1)  # (C_out, K)
        rounding = LearnedRounding.start(weight, layer.weights, context.rounded_weights.get(name))
        input_scale = None
        if layer.static_input:
            if "timestep_groups" in layer.extras:
                unscaled.append(name)
            else:
                split = layer.extras.get("input_split", {}).get("at")
                input_scale = LearnedInputScale.start(context.input_qparams[name], layer.activations, split)
        return ReconstructionLayer(module, rounding, input_scale)

    def _reconstruct(
        self,
        context: QuantizationContext,
        unit: Unit,
        wrappers: dict[str, ReconstructionLayer],
        inputs: list[BlockCall],
        targets: list[BlockCall],
        generator: torch.Generator,
    ) -> None:
        block = context.denoiser.get_submodule(unit.name)
        stacked = CallBatch.stack(inputs, targets)
        calls = len(inputs)
        roundings = [wrapper.rounding for wrapper in wrappers.values()]
        scales = [w.input_scale for w in wrappers.values() if w.input_scale is not None and self.scale_lr > 0]

        def batch_loss(step: int) -> Tensor:
            if stacked is not None:
                rows = torch.randint(stacked.rows, (min(self.batch_size, stacked.rows),), generator=generator)
                args, kwargs = stacked.inputs(rows)
                target = stacked.target(rows)
            else:  # calls that cannot be stacked: one whole call per step
                index = int(torch.randint(calls, (1,), generator=generator))
                args, kwargs = inputs[index].args, inputs[index].kwargs
                target = _output_tensors(targets[index].output)
            output = _output_tensors(block(*args, **kwargs))
            return reconstruction_loss(output, target)

        frozen = [p for p in block.parameters() if p.requires_grad]
        for parameter in frozen:  # only V and the scales learn; the block's own parameters stay as they are
            parameter.requires_grad_(False)
        desc = f"adaround {unit.name}"
        started = time.perf_counter()
        try:
            with Progress(total=self.iterations, desc=desc, unit="it", enabled=context.progress, leave=False) as bar:
                with torch.enable_grad():
                    optimize_rounding(
                        roundings,
                        scales,
                        batch_loss,
                        iterations=self.iterations,
                        lr=self.lr,
                        scale_lr=self.scale_lr,
                        reg_weight=self.reg_weight,
                        warmup=self.warmup,
                        beta=self.beta,
                        on_step=lambda step, loss: (bar.update(), bar.set_postfix_str(f"loss {loss:.4g}")),
                    )
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        unit.seconds = time.perf_counter() - started


def spread_over_timesteps(timesteps: Sequence[float], count: int, seed: int = 0) -> list[int]:
    """``count`` record indices, sorted, taking turns over the distinct timesteps (random within each), so
    that every timestep is represented equally however the records are ordered."""
    by_timestep: dict[float, list[int]] = {}
    for index, timestep in enumerate(timesteps):
        by_timestep.setdefault(float(timestep), []).append(index)
    shuffler = random.Random(seed)
    queues = []
    for timestep in sorted(by_timestep):
        indices = by_timestep[timestep]
        shuffler.shuffle(indices)
        queues.append(iter(indices))
    chosen: list[int] = []
    while len(chosen) < min(count, len(timesteps)):
        for queue in queues:
            index = next(queue, None)
            if index is not None and len(chosen) < count:
                chosen.append(index)
    return sorted(chosen)


# ----------------------------------------------------------------------------------- call structures
def _nbytes(value: Any) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in _flatten(value)[1] if isinstance(leaf, Tensor))


def _output_tensors(output: Any) -> list[Tensor]:
    """A block's output as its tensors, in order (``None`` parts, e.g. SD3's last context output, dropped)."""
    if hasattr(output, "sample") and isinstance(output.sample, Tensor):
        output = denoiser_output(output)
    return [leaf for leaf in _flatten(output)[1] if isinstance(leaf, Tensor)]


@dataclass(frozen=True)
class _Leaf:
    index: int


def _flatten(value: Any) -> tuple[Any, list[Any]]:
    """``(structure, leaves)``: tensors and plain values as leaves, tuples / lists / dicts as structure."""
    leaves: list[Any] = []

    def walk(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: walk(sub) for key, sub in item.items()}
        if isinstance(item, (tuple, list)):
            return type(item)(walk(sub) for sub in item)
        leaves.append(item)
        return _Leaf(len(leaves) - 1)

    return walk(value), leaves


def _unflatten(structure: Any, leaves: Sequence[Any]) -> Any:
    if isinstance(structure, _Leaf):
        return leaves[structure.index]
    if isinstance(structure, dict):
        return {key: _unflatten(sub, leaves) for key, sub in structure.items()}
    return type(structure)(_unflatten(sub, leaves) for sub in structure)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a is b or a == b
