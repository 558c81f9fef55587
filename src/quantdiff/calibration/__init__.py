"""Calibration data: record denoiser inputs from the real pipeline, store them, replay them."""

from quantdiff.calibration.capture import capture_calibration
from quantdiff.calibration.dataset import CalibrationRecord, CalibrationSet
from quantdiff.calibration.prompts import default_prompts, read_prompts

__all__ = ["CalibrationRecord", "CalibrationSet", "capture_calibration", "default_prompts", "read_prompts"]
