"""The prompt sets the digits models carry: what ``quantdiff calibrate`` and ``quantdiff eval`` use on them.

Written into a model folder by ``scripts/train_digits.py`` with
``quantdiff.evaluation.prompt_sets.write_prompt_sets``.
"""

from __future__ import annotations

import numpy as np

from quantdiff.demo.digits.data import caption, combinations, evaluation_prompts, heldout_combinations
from quantdiff.evaluation.prompt_sets import EvalPrompt, EvaluationSet


def digits_prompt_sets(
    seed: int = 0, *, num_calibration: int = 64, num_evaluation: int = 100, steps: int = 25, guidance: float = 5.0
) -> tuple[list[str], EvaluationSet]:
    """The prompt sets of the digits models.

    Calibration prompts come from the training combinations only (calibration must not see the held-out
    ones); evaluation prompts hold 30% held-out combinations, dealt evenly (``evaluation_prompts``).
    """
    rng = np.random.default_rng([seed, 11])
    pool = combinations("train")
    calibration = [caption(pool[i], rng) for i in rng.permutation(len(pool))[:num_calibration]]
    held = heldout_combinations()
    prompts = tuple(
        EvalPrompt(text, spec, spec in held) for text, spec in evaluation_prompts(num_evaluation, seed=seed)
    )
    return calibration, EvaluationSet(prompts, steps=steps, guidance=guidance)
