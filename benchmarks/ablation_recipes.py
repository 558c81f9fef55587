"""Write the recipe files of the README's ablation table ("What each buys") into a folder.

Each row is the naive recipe of a format (min-max ranges, one static scale per tensor) with one change, or a
combination; the presets `wXaY` / `wXaY-minmax` are the best row and the naive row themselves.

    python benchmarks/ablation_recipes.py runs/recipes
    quantdiff calibrate digits-sd --out runs/calib-sd
    quantdiff eval digits-sd --calib runs/calib-sd --num-images 300 --out runs/abl-single \
        --recipes "$(ls runs/recipes/*-{minmax,mse,tg4,token,sq,split}.yaml | paste -sd,)"
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from quantdiff.algorithms.gptq import GPTQ
from quantdiff.algorithms.shortcut_split import ShortcutSplit
from quantdiff.algorithms.smoothquant import SmoothQuant
from quantdiff.algorithms.timestep_groups import TimestepGroups
from quantdiff.recipe import Recipe, TensorSpec

FORMATS = [(8, 8), (8, 6), (8, 4), (4, 8), (4, 6), (4, 4)]


def weights(bits: int, observer: str) -> TensorSpec:
    if bits == 8:
        return TensorSpec(8, True, "channel", observer="minmax")
    return TensorSpec(4, True, "group", group_size=128, observer=observer)


def static(bits: int, observer: str) -> TensorSpec:
    return TensorSpec(bits, False, "tensor", observer=observer)


def per_token(bits: int) -> TensorSpec:
    return TensorSpec(bits, False, "token", dynamic=True)


ROWS = {
    "minmax": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), ()),
    "mse": lambda w, a: (weights(w, "mse"), static(a, "mse"), ()),
    "tg4": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (TimestepGroups(4),)),
    "token": lambda w, a: (weights(w, "minmax"), per_token(a), ()),
    "sq": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (SmoothQuant(),)),
    "split": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (ShortcutSplit(),)),
    "token-sq": lambda w, a: (weights(w, "mse"), per_token(a), (SmoothQuant(),)),
    "token-sq-gptq": lambda w, a: (weights(w, "mse"), per_token(a), (SmoothQuant(), GPTQ())),
    "mse-tg4-sq-split": lambda w, a: (
        weights(w, "mse"),
        static(a, "mse"),
        (TimestepGroups(4), SmoothQuant(), ShortcutSplit()),
    ),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for row, make in ROWS.items():
        for w, a in FORMATS:
            spec_w, spec_a, algorithms = make(w, a)
            recipe = Recipe(f"w{w}a{a}-{row}", spec_w, spec_a, algorithms=algorithms)
            (out / f"{recipe.name}.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    print(f"{len(ROWS) * len(FORMATS)} recipes -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/recipes"))
