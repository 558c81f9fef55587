"""Train the bundled digits-sd model from a seed and write it as a pipeline folder.

python scripts/train_digits.py --out src/quantdiff/data/models/digits-sd [--seed 0] [--denoiser-steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from quantdiff.training.digits_sd import DigitsSDConfig, train_digits_sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    defaults = DigitsSDConfig()
    for field in dataclasses.fields(DigitsSDConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    args = vars(parser.parse_args())
    out = args.pop("out")
    config = DigitsSDConfig(**args)
    started = time.time()
    train_digits_sd(out, config)
    print(f"trained {config} in {time.time() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
