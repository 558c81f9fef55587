"""`quantdiff bench` as a script: the same options, the same function (``quantdiff.bench.run_benchmark``).

Usage (from the repository root, in the project's venv)::

    python benchmarks/bench.py --quick                       # sd15 at 32x32, main methods: a few minutes
    python benchmarks/bench.py --json benchmarks/results.json  # the full run -> benchmarks/RESULTS.md

``python benchmarks/bench.py --help`` lists the options (plus ``--quiet``: no progress lines); the module
docstring of ``quantdiff.bench`` says what is measured and how, and documents the JSON schema.
"""

from __future__ import annotations

import sys

from quantdiff.cli import main

if __name__ == "__main__":
    options = sys.argv[1:]
    quiet = ["--quiet"] if "--quiet" in options else []  # a top-level option of the quantdiff command
    sys.exit(main([*quiet, "bench", *(option for option in options if option != "--quiet")]))
