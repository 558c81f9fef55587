"""Train a bundled digits model from a seed and write it as a pipeline folder with its prompt sets.

python scripts/train_digits.py --model sd  [--out src/quantdiff/data/models/digits-sd]  [--seed 0] [--denoiser-steps N]
python scripts/train_digits.py --model sd3 [--out src/quantdiff/data/models/digits-sd3] [--vae-from DIGITS_SD_DIR]

Every field of DigitsSDConfig / DigitsSD3Config is an option. ``sd3`` trains its own autoencoder with the
digits-sd recipe unless ``--vae-from`` names a digits-sd folder to reuse.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from quantdiff.evaluation.prompt_sets import digits_prompt_sets, write_prompt_sets
from quantdiff.training.digits_sd import DigitsSDConfig, train_digits_sd
from quantdiff.training.digits_sd3 import DigitsSD3Config, train_digits_sd3

MODELS = Path(__file__).resolve().parent.parent / "src" / "quantdiff" / "data" / "models"
CONFIGS = {"sd": DigitsSDConfig, "sd3": DigitsSD3Config}


def main() -> None:
    # --model decides which config's fields are options, so it is read first.
    choose = argparse.ArgumentParser(add_help=False)
    choose.add_argument("--model", choices=tuple(CONFIGS), required=True)
    model = choose.parse_known_args()[0].model
    config_type = CONFIGS[model]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[choose])
    parser.add_argument("--out", default=str(MODELS / f"digits-{model}"))
    if model == "sd3":
        parser.add_argument("--vae-from", help="reuse the autoencoder of this digits-sd folder")
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
    config = config_type(**args)
    started = time.time()
    if model == "sd":
        train_digits_sd(out, config)
    else:
        train_digits_sd3(out, config, vae_from=vae_from)
    calibration, evaluation = digits_prompt_sets(seed=config.seed)
    write_prompt_sets(out, calibration, evaluation)
    print(f"trained {config} in {time.time() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
