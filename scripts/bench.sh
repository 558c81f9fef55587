#!/usr/bin/env bash
# Install quantdiff with the benchmark's peers, then run the full benchmark -> benchmarks/RESULTS.md
# (+ benchmarks/results.json). Hours on a 2-core CPU; extra arguments go to `quantdiff bench`
# (e.g. --quick, or --resume to continue a stopped run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]" 2> >(grep -v "is ignored" >&2)
export HF_HUB_OFFLINE=1
exec .venv/bin/quantdiff bench --json benchmarks/results.json "$@"
