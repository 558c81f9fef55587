#!/usr/bin/env bash
# The main job: install, then run the whole flow on a tiny pipeline that quantdiff builds itself:
# build -> calibrate -> quantize (W8A8, W4A16) -> generate (FP and quantized, same seed) -> inspect.
#   bash scripts/main.sh [sd15|sdxl|sd3|pixart]      (default sd15; outputs in runs/main-ARCH/)
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-sd15}"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
out="runs/main-$arch"
rm -rf "$out"
mkdir -p "$out"

set -x
quantdiff tiny "$arch" --out "$out/model"
quantdiff calibrate "$out/model" --num-prompts 16 --steps 20 --num-timesteps 5 --out "$out/calib"
quantdiff quantize "$out/model" --calib "$out/calib" --recipe w8a8 --out "$out/model-w8a8"
quantdiff quantize "$out/model" --recipe w4a16 --out "$out/model-w4a16"
for model in model model-w8a8 model-w4a16; do
  quantdiff --quiet generate "$out/$model" --prompt "a cat wearing a hat" --seed 0 --steps 20 --out "$out/$model.png"
done
quantdiff inspect "$out/model-w8a8" --max-layers 12
{ set +x; } 2>/dev/null
python - "$out" <<'PY'
import sys
import numpy as np
from PIL import Image

out = sys.argv[1]
fp = np.asarray(Image.open(f"{out}/model.png"), dtype=np.float64)
for name in ("model-w8a8", "model-w4a16"):
    q = np.asarray(Image.open(f"{out}/{name}.png"), dtype=np.float64)
    mse = ((fp - q) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    print(f"{name}: PSNR vs floating point, same seed = {psnr:.1f} dB")
print(f"images and models in {out}/")
PY
