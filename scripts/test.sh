#!/usr/bin/env bash
# Install, then run the whole test suite (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check --quiet src tests
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
