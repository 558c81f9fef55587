"""BOS-aware quantization of the text keys and values (MixDQ, ECCV 2024, section 1.2 of the methods notes).

Why: a causal text encoder (CLIP) sees nothing before its first token, so that token's features - the
begin-of-sentence (BOS) token's - are the same for every prompt, and in Stable Diffusion they are an outlier
that a per-tensor input scale of the cross-attention key / value projections has to cover. MixDQ computes
that token's key and value once in floating point, and calibrates and quantizes ``to_k`` / ``to_v`` on the
other tokens only; at run time ``cat([bos_kv, qlinear(x[:, 1:])])``.

How here, for the projections the architecture lists as text keys / values
(:attr:`~quantdiff.pipelines.architectures.Architecture.text_kv`):

1. **checked, not assumed**: the first token of the text encoder's output must be the same for every prompt
   of the calibration data (every record, both guidance branches), and so must each projection's input
   token 0 on a replay of records spread over prompts and timesteps (:func:`first_token_check`); at least
   two different prompts must be seen. Sequences that are all zeros (SDXL encodes an empty negative prompt as
   zeros) are not BOS sequences and are counted apart. Otherwise the algorithm refuses, with the numbers;
2. each projection gets the layer extra ``bos_kv``: ``bos_input`` (the first token's input, ``(C_in,)``) and
   ``bos_output`` (the float projection's output row for it, ``(C_out,)``, taken from a full-sequence call of
   the float layer, so it is bit-identical to what the float model computes on such a call);
3. the attention modules get :class:`~quantdiff.nn.attention.BOSAwareAttentionProcessor`, so from here on
   (observation of activation ranges, later algorithms' taps, the converted model, the integer kernels) the
   projections see tokens ``1:`` only. Loading a saved folder installs the wrapper again.

A sequence whose first token is not the stored BOS at run time (zeros, or another encoder) takes the
quantized projection for that token instead; nonzero mismatches warn once per layer.

Run it first among the float-model algorithms, so that the statistics of later ones (SmoothQuant's channel
maxima) exclude the BOS token too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from quantdiff.algorithms.base import AlgorithmConfig, QuantizationContext, Stage, check_number, register_algorithm
from quantdiff.calibration.taps import Taps
from quantdiff.errors import CalibrationError, RecipeError
from quantdiff.nn.attention import BOS_EXTRA, BOS_MATCH_TOLERANCE, use_bos_aware_attention
from quantdiff.pipelines.architectures import Architecture, layers_matching
from quantdiff.plan import QuantPlan


@dataclass(frozen=True)
class FirstTokenCheck:
    """How constant the first token of a set of text sequences is (see :class:`FirstTokenMeter`).

    Attributes:
        sequences: sequences examined.
        zero_sequences: all-zero sequences (an empty prompt encoded as zeros): not BOS sequences, left out.
        differing: nonzero sequences that differ anywhere from the first nonzero one (0: one prompt seen).
        spread: largest ``max |x0 - bos|`` over the sequences, relative to ``max |bos|``, where ``bos`` is the
            first token of the first nonzero sequence.
        worst: index of the sequence with that spread.
        bos: ``(C,)`` the first token of the first nonzero sequence (None when there is none).
        bos_absmax, others_absmax: ``max |bos|`` and the largest magnitude of the other tokens (an outlier?).
    """

    sequences: int
    zero_sequences: int
    differing: int
    spread: float
    worst: int
    bos: Tensor | None
    bos_absmax: float
    others_absmax: float

    def problem(self, tolerance: float, where: str) -> str | None:
        """Why the first token cannot be precomputed (None when it can), in words for the user."""
        if self.bos is None:
            return f"{where}: no nonzero text sequence was seen, so there is no first token to measure"
        if self.differing == 0:
            return (
                f"{where}: the calibration data holds one text sequence only, so whether the first token is the same "
                "for every prompt cannot be measured; calibrate with several prompts"
            )
        if not self.spread <= tolerance:  # NaN fails too
            return (
                f"{where}: the first text token varies across prompts: max |difference| {self.spread:.3g} of its "
                f"magnitude (tolerance {tolerance:g}), at sequence {self.worst} of {self.sequences}; the text encoder "
                "is not causal or does not start every prompt with one fixed token, so its key / value cannot be "
                "precomputed"
            )
        return None


class FirstTokenMeter:
    """Accumulates :class:`FirstTokenCheck` over batches of text sequences ``(B, T, C)``, in bounded memory
    (the first nonzero sequence is kept; every other one is compared with it and dropped)."""

    def __init__(self) -> None:
        self.first: Tensor | None = None  # (T, C): the first nonzero sequence
        self.sequences = self.zero_sequences = self.differing = 0
        self.spread, self.worst, self.others_absmax = 0.0, -1, 0.0

    def update(self, batch: Tensor) -> None:
        batch = batch.detach().float()
        if batch.dim() != 3:
            raise ValueError(f"text sequences must be (B, T, C), got {tuple(batch.shape)}")
        for sequence in batch:  # (T, C)
            index = self.sequences
            self.sequences += 1
            if not bool(sequence.any()):
                self.zero_sequences += 1
                continue
            if self.first is None:
                self.first = sequence.clone()
            elif not torch.equal(sequence, self.first):
                self.differing += 1
            if sequence.shape[0] > 1:
                self.others_absmax = max(self.others_absmax, float(sequence[1:].abs().max()))
            bos = self.first[0]
            difference = float((sequence[0] - bos).abs().max()) / max(float(bos.abs().max()), 1e-30)
            if difference > self.spread or math.isnan(difference):
                self.spread, self.worst = difference, index

    def check(self) -> FirstTokenCheck:
        bos = None if self.first is None else self.first[0].clone()
        bos_absmax = 0.0 if bos is None else float(bos.abs().max())
        return FirstTokenCheck(
            self.sequences,
            self.zero_sequences,
            self.differing,
            self.spread,
            self.worst,
            bos,
            bos_absmax,
            self.others_absmax,
        )


def first_token_check(sequences: Iterable[Tensor]) -> FirstTokenCheck:
    """:class:`FirstTokenCheck` of text sequences given as batches ``(B, T, C)``."""
    meter = FirstTokenMeter()
    for batch in sequences:
        meter.update(batch)
    return meter.check()


def text_kv_layers(plan: QuantPlan, architecture: Architecture) -> list[str]:
    """The quantized layers of ``plan`` that the architecture lists as text keys / values; refuses (with the
    architecture's note) where it lists none."""
    if not architecture.text_kv:
        raise RecipeError(
            f"bos_aware: the {architecture.title} has no text key / value projections it applies to: "
            f"{architecture.text_kv_note}; remove bos_aware from the recipe"
        )
    names = layers_matching([layer.name for layer in plan.quantized], architecture.text_kv)
    if not names:
        raise RecipeError(
            "bos_aware: the recipe keeps every text key / value projection "
            f"({', '.join(architecture.text_kv)}) in floating point, so there is nothing to apply it to"
        )
    return names


@register_algorithm
@dataclass(frozen=True)
class BOSAwareKV(AlgorithmConfig):
    """MixDQ's BOS-aware text keys / values (see the module docstring).

    Attributes:
        tolerance: largest spread of the first token across the calibration data, relative to its largest
            magnitude, for it to count as one fixed token (the run-time match uses
            :data:`~quantdiff.nn.attention.BOS_MATCH_TOLERANCE`).
        check_records: calibration records replayed to measure each projection's own input (spread evenly
            over the set; the encoder's output is checked on every record).
    """

    TYPE: ClassVar[str] = "bos_aware"
    STAGE: ClassVar[Stage] = Stage.FLOAT_MODEL

    tolerance: float = BOS_MATCH_TOLERANCE
    check_records: int = 16

    def __post_init__(self) -> None:
        check_number("bos_aware.tolerance", self.tolerance, 0.0, 0.1)
        check_number("bos_aware.check_records", self.check_records, 1, integer=True)

    def apply(self, context: QuantizationContext) -> None:
        calibration = context.calibration_for(self)
        names = text_kv_layers(context.plan, context.architecture)
        encoder = first_token_check(_encoder_states(calibration.records))
        problem = encoder.problem(self.tolerance, "the text encoder's output in the calibration data")
        if problem:
            raise CalibrationError(f"bos_aware: {problem}. BOS-aware quantization does not apply: remove it")
        meters, rows = measure_projection_inputs(context, names, self.check_records)
        for name in names:
            problem = meters[name].check().problem(self.tolerance, f"the input of {name}")
            if problem:
                raise CalibrationError(f"bos_aware: {problem}. BOS-aware quantization does not apply: remove it")
        for name in names:
            bos_input, bos_output = rows[name]
            context.add_extra(name, BOS_EXTRA, {"bos_input": bos_input, "bos_output": bos_output})
        use_bos_aware_attention(context.denoiser)


def _encoder_states(records: Sequence) -> Iterable[Tensor]:
    for record in records:
        states = record.inputs.get("encoder_hidden_states")
        if isinstance(states, Tensor):
            yield states


def measure_projection_inputs(
    context: QuantizationContext, names: list[str], max_records: int
) -> tuple[dict[str, FirstTokenMeter], dict[str, tuple[Tensor, Tensor]]]:
    """Replay up to ``max_records`` records (spread over the set) with taps on the projections ``names``.

    Returns each projection's :class:`FirstTokenMeter` over its inputs, and its ``(bos_input (C_in,),
    bos_output (C_out,))``: the first token of the first nonzero sequence of its first call, and the row the
    float layer computed for it in that same full-sequence call.
    """
    subset = context.calibration.subset(max_records)
    meters = {name: FirstTokenMeter() for name in names}
    rows: dict[str, tuple[Tensor, Tensor]] = {}

    def keep(call, name: str) -> None:
        x = call.args[0] if call.args else call.kwargs["input"]  # (B, T, C_in)
        meters[name].update(x)
        if name not in rows:
            nonzero = [b for b in range(x.shape[0]) if bool(x[b].any())]
            if nonzero:
                b = nonzero[0]
                rows[name] = (x[b, 0].detach().float().clone(), call.output[b, 0].detach().float().clone())

    with Taps(context.denoiser) as taps:
        for name in names:
            taps.on_block(name, lambda call, name=name: keep(call, name))
        for _ in subset.replay(context.denoiser, progress=context.progress, desc="bos_aware: measure first token"):
            pass
    missing = [name for name in names if name not in rows]
    if missing:
        raise CalibrationError(
            f"bos_aware: layer {missing[0]!r} never saw a nonzero text sequence during the replay: "
            "calibrate with prompts (not empty ones)"
        )
    return meters, rows
