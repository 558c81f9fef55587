"""Where activations break: per-layer statistics of a floating-point denoiser over a calibration replay, the
numbers to read before choosing a recipe (``quantdiff analyze``).

``statistics`` measures (input ranges per timestep group, outlier channels and tokens, weight kurtosis,
per-tensor 8/4-bit SQNR); ``report`` writes ``report.json`` (schema in its docstring), ``report.md`` and
the PNG plots::

    from quantdiff.analysis import analyze_denoiser, format_worst_layers, write_analysis

    report = analyze_denoiser(pipe.unet, calibration, timestep_groups=4)
    print(format_worst_layers(report))
    write_analysis(report, "runs/analyze")
"""

from quantdiff.analysis.report import REPORT_VERSION, format_markdown, format_worst_layers, write_analysis
from quantdiff.analysis.statistics import (
    AnalysisError,
    AnalysisReport,
    ChannelStats,
    LayerAnalysis,
    RangeStats,
    TimestepGrouping,
    TokenStats,
    WeightStats,
    analyze_denoiser,
    analyzed_layers,
    check_settings,
)

__all__ = [
    "REPORT_VERSION",
    "AnalysisError",
    "AnalysisReport",
    "ChannelStats",
    "LayerAnalysis",
    "RangeStats",
    "TimestepGrouping",
    "TokenStats",
    "WeightStats",
    "analyze_denoiser",
    "analyzed_layers",
    "check_settings",
    "format_markdown",
    "format_worst_layers",
    "write_analysis",
]
