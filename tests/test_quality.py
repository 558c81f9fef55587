"""Denoiser-output SQNR against floating point on held-out calibration inputs, for every architecture.

Per-architecture floors a few dB under the values measured on these seeded tiny pipelines (README,
"Measured"), so a regression of a few dB in any recipe on any architecture fails; the targets of issue 2
(W8A8 >= 25 dB, W8A16 >= 30 dB on the UNets) are below them. The Lp range search (``w8a8``) must beat
min-max (``w8a8-minmax``) on every architecture, as the README's table shows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser

RECIPES = ("w8a8", "w8a8-minmax", "w8a16", "w4a16", "w4a8")
# measured (dB):   sd15 27.5 26.5 41.8 18.3 18.0 | sdxl 27.4 26.1 43.5 18.9 18.4
#                  sd3 63.5 63.3 69.6 45.5 45.4  | pixart 59.4 58.7 68.7 44.3 44.2
FLOORS = {
    "sd15": dict(zip(RECIPES, (25.5, 24.5, 39.5, 16.0, 16.0), strict=True)),
    "sdxl": dict(zip(RECIPES, (25.5, 24.0, 41.0, 16.5, 16.0), strict=True)),
    "sd3": dict(zip(RECIPES, (61.0, 61.0, 67.0, 43.0, 43.0), strict=True)),
    "pixart": dict(zip(RECIPES, (57.0, 56.0, 66.0, 42.0, 42.0), strict=True)),
}


@pytest.fixture(scope="module")
def sqnr_by_recipe(tiny_folders, calibration_sets):
    """arch -> recipe -> SQNR (dB) of the denoiser output over the held-out prompt's records."""
    results = {}
    for arch, folder in tiny_folders.items():
        calibration, held_out = calibration_sets[arch]
        _, fp = denoiser_of(load_pipeline(folder))
        reference = torch.cat(list(held_out.replay(fp, progress=False)))
        results[arch] = {}
        for recipe in RECIPES:
            quantized = copy.deepcopy(fp)
            quantize_denoiser(quantized, recipe, calibration, progress=False)
            output = torch.cat(list(held_out.replay(quantized, progress=False)))
            results[arch][recipe] = sqnr_db(reference, output)
    return results


def test_sqnr_floors_per_architecture(sqnr_by_recipe, arch):
    measured = sqnr_by_recipe[arch]
    below = {recipe: round(measured[recipe], 2) for recipe, floor in FLOORS[arch].items() if measured[recipe] < floor}
    assert not below, (arch, below, FLOORS[arch])
    if arch in ("sd15", "sdxl"):  # issue 2's targets
        assert measured["w8a8"] >= 25 and measured["w8a16"] >= 30, measured


def test_lp_range_search_beats_min_max(sqnr_by_recipe, arch):
    assert sqnr_by_recipe[arch]["w8a8"] > sqnr_by_recipe[arch]["w8a8-minmax"], sqnr_by_recipe[arch]


def test_quality_falls_with_bits(sqnr_by_recipe, arch):
    sqnr = sqnr_by_recipe[arch]
    assert sqnr["w4a16"] < sqnr["w8a16"], sqnr
    assert sqnr["w4a8"] < sqnr["w8a8"], sqnr
    assert sqnr["w8a8"] < sqnr["w8a16"], sqnr  # quantizing activations too costs something


def test_report_sqnr_table(sqnr_by_recipe, capsys):
    """Prints the table, and checks it is the README's (to 1.5 dB) so the published numbers stay true."""
    with capsys.disabled():
        print("\nSQNR (dB) of the denoiser output on held-out inputs")
        print("arch    " + "".join(f"{r:>13}" for r in RECIPES))
        for arch, row in sqnr_by_recipe.items():
            print(f"{arch:8}" + "".join(f"{row[r]:13.1f}" for r in RECIPES))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    titles = {"sd15": "SD1.5 UNet", "sdxl": "SDXL UNet", "sd3": "SD3 MMDiT", "pixart": "PixArt DiT"}
    for arch, title in titles.items():
        (line,) = [line for line in readme.splitlines() if line.strip().startswith(f"| {title} |")]
        published = [float(cell.strip().removesuffix(" dB")) for cell in line.strip().strip("|").split("|")[1:]]
        measured = [sqnr_by_recipe[arch][recipe] for recipe in RECIPES]
        assert all(abs(m - p) <= 1.5 for m, p in zip(measured, published, strict=True)), (arch, measured, published)
