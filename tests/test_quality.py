"""Denoiser-output SQNR against floating point on held-out calibration inputs, for every architecture.

Targets (issue 2): W8A8 >= 25 dB, W8A16 >= 30 dB, and W4A16 below W8A16.
"""

from __future__ import annotations

import copy

import pytest
import torch

from quantdiff.pipelines.loading import denoiser_of, load_pipeline
from quantdiff.primitives import sqnr_db
from quantdiff.quantize import quantize_denoiser


@pytest.fixture(scope="module")
def sqnr_by_recipe(tiny_folders, calibration_sets):
    """arch -> recipe -> SQNR (dB) of the denoiser output over the held-out prompt's records."""
    results = {}
    for arch, folder in tiny_folders.items():
        calibration, held_out = calibration_sets[arch]
        _, fp = denoiser_of(load_pipeline(folder))
        reference = torch.cat(list(held_out.replay(fp, progress=False)))
        results[arch] = {}
        for recipe in ("w8a8", "w8a8-minmax", "w8a16", "w4a16", "w4a8"):
            quantized = copy.deepcopy(fp)
            quantize_denoiser(quantized, recipe, calibration, progress=False)
            output = torch.cat(list(held_out.replay(quantized, progress=False)))
            results[arch][recipe] = sqnr_db(reference, output)
    return results


def test_w8a8_reaches_25_db(sqnr_by_recipe, arch):
    assert sqnr_by_recipe[arch]["w8a8"] >= 25, sqnr_by_recipe[arch]


def test_w8a16_reaches_30_db(sqnr_by_recipe, arch):
    assert sqnr_by_recipe[arch]["w8a16"] >= 30, sqnr_by_recipe[arch]


def test_quality_falls_with_bits(sqnr_by_recipe, arch):
    sqnr = sqnr_by_recipe[arch]
    assert sqnr["w4a16"] < sqnr["w8a16"], sqnr
    assert sqnr["w4a8"] < sqnr["w8a8"], sqnr
    assert sqnr["w8a8"] < sqnr["w8a16"], sqnr  # quantizing activations too costs something


def test_report_sqnr_table(sqnr_by_recipe, capsys):
    with capsys.disabled():
        print("\nSQNR (dB) of the denoiser output on held-out inputs")
        recipes = list(next(iter(sqnr_by_recipe.values())))
        print("arch    " + "".join(f"{r:>13}" for r in recipes))
        for arch, row in sqnr_by_recipe.items():
            print(f"{arch:8}" + "".join(f"{row[r]:13.1f}" for r in recipes))
