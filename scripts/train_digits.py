"""Train a bundled digits model from a seed and write it as a pipeline folder with its prompt sets.

python scripts/train_digits.py --model sd  [--out src/quantdiff/demo/digits/models/digits-sd]  [--seed 0] [--denoiser-steps N]
python scripts/train_digits.py --model sd3 [--out src/quantdiff/demo/digits/models/digits-sd3] [--vae-from DIGITS_SD_DIR]
python scripts/train_digits.py --model sd|sd3 --init-from MODEL_DIR --stage 1 --denoiser-steps N   # continue a run
python scripts/train_digits.py --model turbo [--out src/quantdiff/demo/digits/models/digits-sd-turbo] [--teacher-from DIGITS_SD_DIR]
python scripts/train_digits.py --model turbo --init-from TURBO_DIR --stage 1 --lcd-steps N   # continue distilling

Every field of DigitsSDConfig / DigitsSD3Config / DigitsTurboConfig is an option. Each model trains its own autoencoder unless
``--vae-from`` names a digits folder to reuse it from. Every ``--probe-every`` steps the current weights
generate the model's evaluation prompts and the digits evaluator scores them, so a run shows whether it
is learning long before it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from quantdiff.demo.digits.evaluator import adherence, load_evaluator, predict
from quantdiff.demo.digits.prompts import digits_prompt_sets
from quantdiff.demo.digits.training.sd import DigitsSDConfig, train_digits_sd
from quantdiff.demo.digits.training.sd3 import DigitsSD3Config, train_digits_sd3
from quantdiff.demo.digits.training.turbo import DigitsTurboConfig, train_digits_turbo
from quantdiff.evaluate import generate_set
from quantdiff.evaluation.prompt_sets import EvaluationSet, write_prompt_sets

MODELS = Path(__file__).resolve().parent.parent / "src" / "quantdiff" / "demo" / "digits" / "models"
CONFIGS = {"sd": DigitsSDConfig, "sd3": DigitsSD3Config, "turbo": DigitsTurboConfig}
# The few-step model: its evaluation settings (steps chosen by measured alignment at 1, 2 and 4 steps; the
# guidance scale is baked in through the UNet's guidance embedding, w = guidance - 1, trained on w in 2..8).
# Guidance 7, not the teacher's 5: the shipped model at 2 steps, 300 images, scores 84.7% / 87.0% at 5 / 7
# (seeds 0..299) and 85.7% / 87.3% (seeds 5000..5299); digits gain, colours stay 98-100%.
TURBO_STEPS = 2
TURBO_GUIDANCE = 7.0
TURBO_PROBE_STEPS = (1, 2, 4)
PROBE_SEED = 1000  # as `quantdiff eval --seed 1000`: not the seeds the main job evaluates on


def turbo_probe(evaluation: EvaluationSet):
    """Alignment of the few-step model at each of ``TURBO_PROBE_STEPS``."""
    probes = [(steps, alignment_probe(dataclasses.replace(evaluation, steps=steps))) for steps in TURBO_PROBE_STEPS]

    def probe(step: int, pipe) -> None:
        for steps, one in probes:
            print(f"  {steps} sampling step(s):", end=" ", flush=True)
            one(step, pipe)

    return probe


def alignment_probe(evaluation: EvaluationSet):
    """A training probe: alignment of the current weights on the evaluation prompts, printed per head."""
    evaluator = load_evaluator()
    prompts = [p.text for p in evaluation.prompts]
    specs = [p.spec for p in evaluation.prompts]
    heldout = np.array([p.heldout for p in evaluation.prompts])

    def probe(step: int, pipe) -> None:
        with torch.no_grad():
            generated = generate_set(
                pipe,
                prompts,
                [PROBE_SEED + i for i in range(len(prompts))],
                steps=evaluation.steps,
                guidance=evaluation.guidance,
                batch_size=len(prompts),
                desc="probe",
                progress=False,
            )
        predictions = predict(evaluator, generated.images)
        scores = adherence(predictions, specs)
        held = adherence(predictions.select(heldout), [s for s, h in zip(specs, heldout, strict=True) if h])
        print(
            f"probe step {step}: alignment {scores['all']:.0%} (held-out {held['all']:.0%}), digit"
            f" {scores['digit']:.0%}, foreground {scores['foreground']:.0%}, background {scores['background']:.0%}"
            f" ({generated.seconds:.0f} s)",
            flush=True,
        )

    return probe


def main() -> None:
    # --model decides which config's fields are options, so it is read first.
    choose = argparse.ArgumentParser(add_help=False)
    choose.add_argument("--model", choices=tuple(CONFIGS), required=True)
    model = choose.parse_known_args()[0].model
    config_type = CONFIGS[model]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[choose])
    parser.add_argument("--out", default=str(MODELS / f"digits-{model}"))
    if model == "turbo":
        parser.set_defaults(out=str(MODELS / "digits-sd-turbo"))
        parser.add_argument("--teacher-from", default=str(MODELS / "digits-sd"), help="the digits-sd folder to distil")
    else:
        parser.add_argument("--vae-from", help="reuse the autoencoder of this digits pipeline folder")
    parser.add_argument("--init-from", help=f"continue training this digits-{model} folder (with --stage 1, 2, ...)")
    defaults = config_type()
    for field in dataclasses.fields(config_type):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    args = vars(parser.parse_args())
    args.pop("model")
    out = args.pop("out")
    vae_from = args.pop("vae_from", None)
    init_from = args.pop("init_from")
    args_teacher = args.pop("teacher_from", None)
    config = config_type(**args)
    started = time.time()
    if model == "turbo":
        calibration, evaluation = digits_prompt_sets(seed=config.seed, steps=TURBO_STEPS, guidance=TURBO_GUIDANCE)
        write_prompt_sets(out, calibration, evaluation)  # first, so every checkpoint in --out can be evaluated
        probe = turbo_probe(evaluation) if config.probe_every > 0 else None
        train_digits_turbo(out, config, teacher_from=args_teacher, init_from=init_from, probe=probe)
        write_prompt_sets(out, calibration, evaluation)
        print(f"trained {config} in {time.time() - started:.0f} s -> {out}")
        return
    calibration, evaluation = digits_prompt_sets(seed=config.seed)
    probe = alignment_probe(evaluation) if config.probe_every > 0 else None
    train = train_digits_sd if model == "sd" else train_digits_sd3
    train(out, config, vae_from=vae_from, init_from=init_from, probe=probe)
    write_prompt_sets(out, calibration, evaluation)
    print(f"trained {config} in {time.time() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
