#!/usr/bin/env bash
# Install, then run the whole test suite (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser test drives Debian's Chromium (Playwright cannot download its own browser here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed (apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
export HF_HUB_OFFLINE=1
.venv/bin/ruff check --quiet src tests
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
