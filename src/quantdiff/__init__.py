"""quantdiff: post-training quantization of diffusers text-to-image pipelines.

The flow, as the CLI runs it::

    import quantdiff as qd

    pipe = qd.load_pipeline("models/sd15")                                  # local folder, no network
    calib = qd.capture_calibration(pipe, qd.default_prompts()[:16])          # record denoiser inputs
    qd.quantize_denoiser(pipe.unet, "w8a8", calib)                           # plan -> algorithms -> observe -> convert
    qd.save_quantized(pipe, "sd15-w8a8", base_path="models/sd15")
    pipe = qd.load_any_pipeline("sd15-w8a8")                                 # FP or quantized folder
    image, parameters = qd.generate(pipe, "a cat wearing a hat", seed=0)
"""

from quantdiff.library_messages import drop_known_messages

drop_known_messages()  # before diffusers is imported: it logs some of them on import

from quantdiff.algorithms import AlgorithmConfig, QuantizationContext, Stage, register_algorithm
from quantdiff.calibration import CalibrationRecord, CalibrationSet, capture_calibration, default_prompts, read_prompts
from quantdiff.errors import CalibrationError, FormatError, PipelineError, QuantDiffError, RecipeError
from quantdiff.generate import generate, load_any_pipeline, save_png
from quantdiff.nn import ExecutionSummary, use_integer_kernels, use_reference
from quantdiff.pipelines.architectures import ARCHITECTURES, Architecture, architecture_of
from quantdiff.pipelines.loading import denoiser_of, load_pipeline, read_pipeline_folder
from quantdiff.plan import LayerPlan, QuantPlan, resolve_plan
from quantdiff.quantize import (
    QuantizationInfo,
    convert,
    observe_inputs,
    prepare,
    quantization_info,
    quantize_denoiser,
    run_algorithms,
)
from quantdiff.recipe import PRESETS, LayerOverride, Recipe, TensorSpec, load_recipe
from quantdiff.report import format_report, report_pipeline_folder, report_quantized_folder
from quantdiff.serialization import load_quantized_denoiser, load_quantized_pipeline, save_quantized
from quantdiff.version import __version__

__all__ = [
    "ARCHITECTURES",
    "AlgorithmConfig",
    "PRESETS",
    "Architecture",
    "CalibrationError",
    "CalibrationRecord",
    "CalibrationSet",
    "ExecutionSummary",
    "FormatError",
    "LayerOverride",
    "LayerPlan",
    "PipelineError",
    "QuantDiffError",
    "QuantPlan",
    "QuantizationContext",
    "QuantizationInfo",
    "Recipe",
    "RecipeError",
    "Stage",
    "TensorSpec",
    "__version__",
    "architecture_of",
    "capture_calibration",
    "convert",
    "default_prompts",
    "denoiser_of",
    "format_report",
    "generate",
    "load_any_pipeline",
    "load_pipeline",
    "load_quantized_denoiser",
    "load_quantized_pipeline",
    "load_recipe",
    "observe_inputs",
    "prepare",
    "quantization_info",
    "quantize_denoiser",
    "read_pipeline_folder",
    "read_prompts",
    "register_algorithm",
    "report_pipeline_folder",
    "report_quantized_folder",
    "resolve_plan",
    "run_algorithms",
    "save_png",
    "save_quantized",
    "use_integer_kernels",
    "use_reference",
]
