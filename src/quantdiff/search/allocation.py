"""Bit allocation as an integer program (MixDQ, section 1.4 of the methods notes), solved by HiGHS through
``scipy.optimize.milp``.

Each layer ``i`` has options ``o`` (a weight bit width and an input bit width); one binary ``x[i, o]`` per
(layer, option), exactly one option per layer, and linear budgets::

    maximize    sum_i sum_o x[i, o] * score[i][o]
    subject to  sum_o x[i, o] = 1                                   for every layer i
                lower_b <= sum_i sum_o x[i, o] * cost_b[i][o] <= limit_b     for every budget b

:func:`allocate` is that program, pure (lists of numbers in, one choice per layer out), and is checked
against exhaustive search in the tests. :func:`group_budgets` is MixDQ's split of one average bit budget
between the *content* and *quality* groups, whose scores (SSIM of images and SQNR of the denoiser output)
are not on one scale and so are never traded against each other: each group gets its own budget, and the
split between them is a parameter ``k`` that the search sweeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantdiff.errors import QuantDiffError


class AllocationError(QuantDiffError):
    """No allocation satisfies the budgets (or the problem is malformed)."""


@dataclass(frozen=True)
class Budget:
    """A linear budget over the chosen options: ``lower <= sum_i cost[i][chosen_i] <= limit``.

    Attributes:
        name: what it limits, for messages (``"weight bits (quality)"``).
        costs: per layer, per option (the same ragged shape as the scores); 0 where a layer is not counted.
        limit: the upper bound.
        lower: an optional lower bound (MixDQ keeps each group's average within 0.02 bit of its target).
    """

    name: str
    costs: Sequence[Sequence[float]]
    limit: float
    lower: float | None = None


@dataclass(frozen=True)
class Allocation:
    """The chosen option per layer, the objective, and each budget's use."""

    choice: tuple[int, ...]
    objective: float
    used: dict[str, float]


# A solution is accepted within this much of a budget (HiGHS's feasibility tolerance is 1e-7 relative).
_SLACK = 1e-6


def allocate(scores: Sequence[Sequence[float]], budgets: Sequence[Budget], *, time_limit: float = 60.0) -> Allocation:
    """The options that maximize the summed score within the budgets (see the module docstring).

    Args:
        scores: ``scores[i][o]``: how good option ``o`` is for layer ``i`` (higher is better); a layer may
            have any number of options (at least one). A layer with a single option is fixed.
        budgets: linear budgets, each with a cost per layer and option.
        time_limit: seconds HiGHS may spend (the problems here solve in milliseconds).

    Raises:
        AllocationError: the budgets leave no feasible choice (the message names the budget and its
            cheapest possible use), or the inputs are malformed.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(row) for row in scores]
    if not sizes or min(sizes) < 1:
        raise AllocationError("every layer needs at least one option")
    offsets = np.concatenate([[0], np.cumsum(sizes)])  # layer i's options are variables offsets[i]:offsets[i+1]
    n = int(offsets[-1])
    objective = -np.array([float(s) for row in scores for s in row])  # milp minimizes
    if not np.isfinite(objective).all():
        raise AllocationError("scores must be finite numbers (map an exact option to a finite best score)")
    one_per_layer = np.zeros((len(sizes), n))
    for i in range(len(sizes)):
        one_per_layer[i, offsets[i] : offsets[i + 1]] = 1.0
    constraints = [LinearConstraint(one_per_layer, 1.0, 1.0)]
    for budget in budgets:
        row = _cost_row(budget, sizes)
        cheapest = sum(min(costs) for costs in budget.costs)
        if cheapest > budget.limit * (1 + _SLACK) + _SLACK:
            raise AllocationError(
                f"budget {budget.name!r} of {budget.limit:.6g} cannot be met: its cheapest choice takes "
                f"{cheapest:.6g}; raise the budget or allow fewer bits"
            )
        lower = -np.inf if budget.lower is None else budget.lower
        constraints.append(LinearConstraint(row[None, :], lower, budget.limit))
    result = milp(
        objective,
        constraints=constraints,
        integrality=np.ones(n),
        bounds=Bounds(0.0, 1.0),
        options={"time_limit": time_limit, "disp": False},
    )
    if result.status != 0 or result.x is None:
        names = ", ".join(b.name for b in budgets)
        raise AllocationError(f"no allocation satisfies the budgets ({names}): {result.message}")
    chosen = tuple(int(np.argmax(result.x[offsets[i] : offsets[i + 1]])) for i in range(len(sizes)))
    return evaluate_choice(scores, budgets, chosen)


def _cost_row(budget: Budget, sizes: list[int]) -> np.ndarray:
    if [len(row) for row in budget.costs] != sizes:
        raise AllocationError(f"budget {budget.name!r} must give a cost for every layer and option")
    row = np.array([float(c) for costs in budget.costs for c in costs])
    if not np.isfinite(row).all():
        raise AllocationError(f"budget {budget.name!r} has a cost that is not a finite number")
    return row


def evaluate_choice(scores: Sequence[Sequence[float]], budgets: Sequence[Budget], choice: Sequence[int]) -> Allocation:
    """The objective and budget use of ``choice`` (one option index per layer)."""
    objective = float(sum(scores[i][o] for i, o in enumerate(choice)))
    used = {budget.name: float(sum(budget.costs[i][o] for i, o in enumerate(choice))) for budget in budgets}
    return Allocation(tuple(int(o) for o in choice), objective, used)


def feasible(allocation: Allocation, budgets: Sequence[Budget]) -> bool:
    """Whether ``allocation`` respects every budget (within a relative 1e-6)."""
    for budget in budgets:
        use = allocation.used[budget.name]
        if use > budget.limit + _SLACK * max(1.0, abs(budget.limit)):
            return False
        if budget.lower is not None and use < budget.lower - _SLACK * max(1.0, abs(budget.lower)):
            return False
    return True


def group_budgets(target: float, content_size: float, quality_size: float, k: float) -> tuple[float, float]:
    """MixDQ's split of an average-bit ``target`` between the content and quality groups.

    With ``r = content_size / quality_size``, ``B_quality = target (1 + r) / (k r + 1)`` and
    ``B_content = k B_quality``, so that the size-weighted average of the two is exactly ``target``;
    ``k < 1`` gives the content group fewer bits than the quality group. Returns ``(B_content, B_quality)``.
    """
    if content_size < 0 or quality_size <= 0 or not k > 0:
        raise ValueError(f"need content_size >= 0, quality_size > 0 and k > 0, got {content_size}, {quality_size}, {k}")
    r = content_size / quality_size
    quality = target * (1 + r) / (k * r + 1)
    return k * quality, quality


def noise_score(sqnr_db: float) -> float:
    """A quality layer's score: minus its output noise-to-signal ratio ``10^(-SQNR/10)``.

    Why not the SQNR in dB itself (MixDQ sums those): independent errors of several layers add as noise
    *powers*, so the sum of noise ratios estimates the whole model's, while a sum of dB values rewards a
    layer going from 60 to 80 dB as much as one going from 5 to 25 dB. ``inf`` (exact) scores 0.
    """
    return 0.0 if math.isinf(sqnr_db) and sqnr_db > 0 else -(10.0 ** (-sqnr_db / 10.0))


def damage_score(ssim: float) -> float:
    """A content layer's score: minus its structural damage ``1 - SSIM`` (0 for identical images)."""
    return -(1.0 - ssim)
