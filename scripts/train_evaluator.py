"""Trains the digits evaluator CNN and writes it as safetensors (the shipped file by default).

    python scripts/train_evaluator.py --seed 0 --steps 1000

Prints per-head accuracy on held-out renders: eval-split source digits the evaluator never saw, over
all combinations and over the held-out combinations alone. Reproducible from the seed on one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantdiff.demo.digits.data import make_dataset
from quantdiff.demo.digits.evaluator import head_accuracies, load_evaluator, save_evaluator, train_evaluator

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "quantdiff" / "demo" / "digits" / "evaluator.safetensors"

# (name, make_dataset arguments): the first is the test suite's check.
CHECKS = (
    ("eval/all seed 123 n 1000", dict(n=1000, split="eval", combos="all", seed=123)),
    ("eval/all seed 1 n 10000", dict(n=10000, split="eval", combos="all", seed=1)),
    ("eval/heldout seed 2 n 2000", dict(n=2000, split="eval", combos="heldout", seed=2)),
    ("train/all seed 3 n 2000", dict(n=2000, split="train", combos="all", seed=3)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results are reproducible per count)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train_evaluator(
        seed=args.seed, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, log=print, log_every=100
    )
    print(f"trained in {time.perf_counter() - start:.0f} s")

    accuracies = {}
    for name, kwargs in CHECKS:
        n = kwargs.pop("n")
        accuracies[name] = head_accuracies(model, make_dataset(n, **kwargs))
        print(f"{name:28s} " + "  ".join(f"{head} {acc:.4f}" for head, acc in accuracies[name].items()))

    settings = dict(seed=args.seed, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr)
    path = save_evaluator(model, args.out, extra_metadata={"training": settings, "accuracy": accuracies})
    # The file must rebuild the same model.
    reloaded = head_accuracies(load_evaluator(path), make_dataset(1000, split="eval", combos="all", seed=123))
    assert reloaded == accuracies[CHECKS[0][0]], (reloaded, accuracies[CHECKS[0][0]])
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({path.stat().st_size} bytes, {params} parameters)")
    print(json.dumps(accuracies[CHECKS[0][0]]))


if __name__ == "__main__":
    main()
