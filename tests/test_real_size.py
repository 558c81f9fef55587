"""Storage of a real-size SD1.5 UNet (published config, random weights), measured with `inspect`.

Targets (issue 2): W8 <= 0.27x of the fp32 size, W4 <= 0.15x.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
from diffusers import UNet2DConditionModel

from quantdiff.cli import main
from quantdiff.pipelines.reference_configs import SD15_UNET
from quantdiff.quantize import quantize_denoiser
from quantdiff.recipe import PRESETS, Recipe
from quantdiff.serialization import save_quantized


@pytest.mark.slow
def test_sd15_unet_stored_size(tiny_folders, tmp_path, capsys):
    # A pipeline folder whose unet/ holds the SD1.5 config; the fp32 weights are never written.
    base = shutil.copytree(tiny_folders["sd15"], tmp_path / "sd15-base")
    shutil.rmtree(base / "unet")
    (base / "unet").mkdir()
    (base / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD15_UNET}))
    unet = UNet2DConditionModel.from_config(dict(SD15_UNET))
    assert 850e6 < sum(p.numel() for p in unet.parameters()) < 870e6
    # Sizes depend on shapes only; min-max ranges keep the 4-bit case fast on a CPU.
    w4 = PRESETS["w4a16"]
    w4_minmax = Recipe("w4a16-minmax", dataclasses.replace(w4.weights, observer="minmax"), None)
    ratios = {}
    for name, recipe in (("w8a16", PRESETS["w8a16"]), ("w4a16", w4_minmax)):
        quantized = copy.deepcopy(unet) if name == "w8a16" else unet
        quantize_denoiser(quantized, recipe, progress=False)
        save_quantized(quantized, tmp_path / name, base_path=base)
        del quantized
        assert main(["inspect", str(tmp_path / name), "--json"]) == 0
        totals = json.loads(capsys.readouterr().out)["totals"]
        ratios[name] = totals["ratio_vs_fp32"]
        with capsys.disabled():
            print(
                f"\nSD1.5 UNet {name}: fp32 {totals['fp32_bytes'] / 2**20:.1f} MiB -> stored "
                f"{totals['stored_bytes'] / 2**20:.1f} MiB = {totals['ratio_vs_fp32']:.4f}x"
            )
    assert ratios["w8a16"] <= 0.27
    assert ratios["w4a16"] <= 0.15
