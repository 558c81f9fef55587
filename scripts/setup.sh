#!/usr/bin/env bash
# Create .venv and install quantdiff with its test dependencies (idempotent; offline-safe).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first, pinned: this exact version is the local CPU wheel; anything else pulls GBs of CUDA.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2> >(grep -v "is ignored" >&2)
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2> >(grep -v "is ignored" >&2)
# Build the packed kernels' C++ extension now (cached by torch), so that the first run does not pay for it;
# one line says what this machine's kernels can do. It is optional: a failed build only means its fallbacks.
.venv/bin/python -c "from quantdiff.nn.kernels import packed_support; print('quantdiff:', packed_support().describe())" \
  || echo "note: the packed kernels' extension did not build; 4-bit layers take their fallback paths" >&2
