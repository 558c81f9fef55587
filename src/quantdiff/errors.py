"""User-facing errors.

Every error that a user can cause (a wrong path, a bad recipe, a corrupt file) is a ``QuantDiffError``
whose message says what was wrong and what to do; the CLI prints it on one line and exits non-zero.
Anything else that escapes is a bug in quantdiff.
"""


class QuantDiffError(Exception):
    """Base class of the errors a user can cause and fix."""


class PipelineError(QuantDiffError):
    """The model folder is missing, is not a diffusers pipeline, or has no supported denoiser."""


class RecipeError(QuantDiffError):
    """A recipe is unknown, has unknown keys, or asks for impossible values."""


class CalibrationError(QuantDiffError):
    """Calibration data is missing, corrupt, or was recorded on another model."""


class FormatError(QuantDiffError):
    """A quantized folder is missing, corrupt, truncated, or from a newer format version."""
