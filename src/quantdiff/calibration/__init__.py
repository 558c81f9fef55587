"""Calibration data: record denoiser inputs from the real pipeline (capture), store and replay them (dataset),
and let algorithms look inside a replay (taps: layer / block inputs and outputs, X^T X; timestep: the
current denoising step)."""

from quantdiff.calibration.capture import capture_calibration
from quantdiff.calibration.dataset import CalibrationRecord, CalibrationSet
from quantdiff.calibration.prompts import default_prompts, read_prompts

__all__ = ["CalibrationRecord", "CalibrationSet", "capture_calibration", "default_prompts", "read_prompts"]
