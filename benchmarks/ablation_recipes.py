"""Write the recipe files of the README's ablation tables into a folder.

Activations ("What each buys", the default): each row is the naive recipe of a format (min-max ranges, one
static scale per tensor) with one change, or a combination; the presets `wXaY` / `wXaY-minmax` are the best
row and the naive row themselves.

    python benchmarks/ablation_recipes.py runs/recipes
    quantdiff calibrate digits-sd --out runs/calib-sd
    quantdiff eval digits-sd --calib runs/calib-sd --num-images 300 --out runs/abl-single \
        --recipes "$(ls runs/recipes/*-{minmax,mse,tg4,token,sq,split}.yaml | paste -sd,)"

Weights (`--weights`, issue 16: "where weights break"): columns W4A8 with per-channel weights, W3A8 (per
channel), W2A8 with groups of 64, W4A4 (groups of 128, dynamic per-token 4-bit inputs: the activation format
of the `w4a4` preset, so that the rows compare weight methods on inputs that work); rows naive (nearest
rounding, MSE ranges), GPTQ, AdaRound/BRECQ, low-rank after smoothing (SVDQuant), and the best combination.

    python benchmarks/ablation_recipes.py runs/recipes-weights --weights
    quantdiff eval digits-sd --calib runs/calib-sd --num-images 300 --out runs/adaround-ablation \
        --recipes "$(ls runs/recipes-weights/*.yaml | paste -sd,)"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from quantdiff.algorithms.adaround import AdaRound
from quantdiff.algorithms.gptq import GPTQ
from quantdiff.algorithms.lowrank import LowRank
from quantdiff.algorithms.rotation import Rotation
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


# digits-sd's layers have 32-128 input channels: groups of 16 give 2-8 ranges per token, as groups of 64-128 do
# on SD1.5's 320-1280 (Q-DiT uses 128, SVDQuant 64). The scale and zero point cost more per value here.
ACTIVATION_GROUP = 16


def per_token_group(bits: int) -> TensorSpec:
    return TensorSpec(bits, False, "group", group_size=ACTIVATION_GROUP, dynamic=True)


ROWS = {
    "minmax": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), ()),
    "mse": lambda w, a: (weights(w, "mse"), static(a, "mse"), ()),
    "tg4": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (TimestepGroups(4),)),
    "token": lambda w, a: (weights(w, "minmax"), per_token(a), ()),
    "sq": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (SmoothQuant(),)),
    "split": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (ShortcutSplit(),)),
    "token-sq": lambda w, a: (weights(w, "mse"), per_token(a), (SmoothQuant(),)),
    "token-sq-gptq": lambda w, a: (weights(w, "mse"), per_token(a), (SmoothQuant(), GPTQ())),
    "group": lambda w, a: (weights(w, "minmax"), per_token_group(a), ()),
    "rot": lambda w, a: (weights(w, "minmax"), static(a, "minmax"), (Rotation(),)),
    "group-sq": lambda w, a: (weights(w, "mse"), per_token_group(a), (SmoothQuant(),)),
    "group-sq-gptq": lambda w, a: (weights(w, "mse"), per_token_group(a), (SmoothQuant(), GPTQ())),
    "mse-tg4-sq-split": lambda w, a: (
        weights(w, "mse"),
        static(a, "mse"),
        (TimestepGroups(4), SmoothQuant(), ShortcutSplit()),
    ),
}

# The weight ablation: format name -> (weight spec, activation spec). 8-bit inputs take min-max ranges: as good as
# the Lp search at 8 bits on digits-sd (92.0 vs 91.3%, the activation table) and minutes faster to observe.
WEIGHT_FORMATS = {
    "w4a8ch": (TensorSpec(4, True, "channel", observer="mse"), static(8, "minmax")),
    "w3a8": (TensorSpec(3, True, "channel", observer="mse"), static(8, "minmax")),
    "w2a8g64": (TensorSpec(2, True, "group", group_size=64, observer="mse"), static(8, "minmax")),
    "w4a4": (TensorSpec(4, True, "group", group_size=128, observer="mse"), per_token(4)),
}
WEIGHT_ROWS = {
    "naive": (),
    "gptq": (GPTQ(),),
    "adaround": (AdaRound(),),
    "lowrank": (SmoothQuant(), LowRank()),
    "best": (SmoothQuant(), GPTQ(), AdaRound()),
}


def write(recipe: Recipe, out: Path) -> None:
    (out / f"{recipe.name}.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def main(out: Path, weight_table: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if weight_table:
        for fmt, (spec_w, spec_a) in WEIGHT_FORMATS.items():
            for row, algorithms in WEIGHT_ROWS.items():
                write(Recipe(f"{fmt}-{row}", spec_w, spec_a, algorithms=algorithms), out)
        print(f"{len(WEIGHT_ROWS) * len(WEIGHT_FORMATS)} recipes -> {out}")
        return
    for row, make in ROWS.items():
        for w, a in FORMATS:
            spec_w, spec_a, algorithms = make(w, a)
            write(Recipe(f"w{w}a{a}-{row}", spec_w, spec_a, algorithms=algorithms), out)
    print(f"{len(ROWS) * len(FORMATS)} recipes -> {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/recipes", help="folder for the recipe files")
    parser.add_argument("--weights", action="store_true", help="the weight ablation (issue 16) instead")
    arguments = parser.parse_args()
    main(Path(arguments.out), arguments.weights)
