"""Trainers of the bundled digits models ``digits-sd`` (``sd.py``) and ``digits-sd3`` (``sd3.py``), and what
they share (``common.py``); run by ``scripts/train_digits.py``."""
