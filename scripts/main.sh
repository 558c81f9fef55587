#!/usr/bin/env bash
# The main job: install, then on a bundled trained model (default digits-sd): calibrate, quantize with
# naive min-max W8A8, quantdiff's W8A8 and W4A8, evaluate all against floating point on the same seeds,
# and print the table.
#   bash scripts/main.sh [--model digits-sd|digits-sd3|PIPELINE_DIR] [--num-images N]
# Outputs in runs/main-MODEL/ (calibration data, quantized folders, eval/report.{json,md}, eval/grid.png).
set -euo pipefail
cd "$(dirname "$0")/.."
model="digits-sd"
num_images=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --num-images) num_images="$2"; shift 2 ;;
    *) echo "usage: bash scripts/main.sh [--model NAME_OR_DIR] [--num-images N]" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
out="runs/main-$(basename "$model")"
rm -rf "$out"
mkdir -p "$out"
started=$SECONDS

set -x
quantdiff calibrate "$model" --out "$out/calib"
quantdiff quantize "$model" --calib "$out/calib" --recipe w8a8-minmax --out "$out/w8a8-minmax"
quantdiff quantize "$model" --calib "$out/calib" --recipe w8a8 --out "$out/w8a8"
quantdiff quantize "$model" --calib "$out/calib" --recipe w4a8 --out "$out/w4a8"
quantdiff eval "$model" "$out/w8a8-minmax" "$out/w8a8" "$out/w4a8" --num-images "$num_images" --out "$out/eval"
{ set +x; } 2>/dev/null
echo "main job on $model: $((SECONDS - started)) s after install; report in $out/eval/report.md"
