"""Training the project's own benchmark models (run by scripts/train_digits.py)."""
