"""``quantdiff inspect``: the per-layer plan and the denoiser's size in fp32, fp16 and quantized bytes.

Sizes are measured, never estimated from bit counts: for a quantized folder they are the byte sizes of
the tensors actually stored in its safetensors file (read from the header, no weights loaded); for a
plain pipeline folder with ``--recipe`` they are the sizes of the tensors the quantized modules would
hold, taken from a skeleton built on the meta device (again no weights loaded).

JSON schema (``inspect --json``)::

    {
      "path": str,
      "quantized": bool,          # a quantized folder (false: a pipeline folder, possibly with a dry-run recipe)
      "recipe": str | null, "label": "W8A8" | null,
      "architecture": str, "denoiser_class": str,
      "layers": [   # every Linear / Conv2d of the denoiser, in module order
        {"name": str, "type": "Linear" | "Conv2d", "shape": [int, ...],
         "weights": "int8 sym channel minmax" | null,   # null = kept in floating point
         "activations": "int8 asym tensor mse" | null,
         "params": int,           # weight + bias elements
         "fp32_bytes": int,       # the layer's size in fp32
         "stored_bytes": int,     # what it takes quantized (integer weight, scales, bias)
         "reason": str}
      ],
      "totals": {"layers": int, "quantized_layers": int, "params": int,
                 "fp32_bytes": int, "fp16_bytes": int, "stored_bytes": int,
                 "ratio_vs_fp32": float, "ratio_vs_fp16": float},
      "execution": null | {       # quantized folder with --execution only
        "mode": "auto" | "integer",  # auto: the default of generate / serve, settled by one denoising step
        "support": str,           # what this CPU's int8 kernels can do
        "integer_layers": int, "float_layers": int, "reference_layers": int, "widened_layers": int,
        "float_bytes": int,       # auto: fp32 weight copies of the layers on the float path (in held_bytes)
        "attention": "float32" | "bfloat16" | "bfloat16-large" | "int8" | null,  # SDPA dtype (large calls in bf16 on native-bf16 CPUs)
        "held_bytes": int,        # the denoiser in integer mode: packed kernel copies + tensors still held
        "ratio_vs_fp32": float}
    }

``totals`` cover the whole denoiser (norms, embeddings and layers kept in floating point included);
``stored_bytes`` is the size of the quantized denoiser as stored and held in memory in reference mode.
With ``execution``, each quantized layer also has ``"path"`` (``integer`` | ``float`` | ``reference``),
``"widened"`` (4-bit weights widened to int8 for the kernel) and ``"path_reason"``: what the execution mode
does with it on this machine (auto: the timings that chose it). Finding out loads the weights and prepacks
them; auto also runs the pipeline for one denoising step at the model's own settings, so that each layer
chooses at the shapes generation gives it.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

from safetensors import safe_open

from quantdiff.nn.attention import describe_attention
from quantdiff.nn.execution import execution_summary, use_execution
from quantdiff.pipelines.loading import denoiser_of, read_pipeline_folder
from quantdiff.plan import QuantPlan, resolve_plan
from quantdiff.quantize import build_skeleton
from quantdiff.recipe import PRESETS, Recipe, load_recipe
from quantdiff.serialization import all_tensors, load_quantized_denoiser, read_quantized_folder

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def report_quantized_folder(path: str | os.PathLike, *, execution: bool | str = False) -> dict[str, Any]:
    """Report of a folder written by ``save_quantized``; ``execution``: add each layer's path on this CPU in
    ``"auto"`` execution (or True: the default of generate and serve) or ``"integer"`` (kernels forced)."""
    folder = read_quantized_folder(path)
    tensors: dict[str, tuple[tuple[int, ...], int, bool]] = {}
    with safe_open(folder.weights_path, framework="pt") as handle:
        for name in handle.keys():
            view = handle.get_slice(name)
            dtype = view.get_dtype()
            tensors[name] = (tuple(view.get_shape()), _DTYPE_BYTES[dtype], dtype.startswith(("F", "BF")))
    info = folder.info
    report = _report(
        str(folder.path), True, info.plan, info.recipe, info.architecture.name, folder.denoiser_class, tensors
    )
    mode = "auto" if execution is True else execution or None
    report["execution"] = _execution(folder.path, report, mode) if mode else None
    return report


def _execution(path, report: dict[str, Any], mode: str) -> dict[str, Any]:
    """Switch the stored denoiser to ``mode`` and record each layer's path and the bytes it holds."""
    if mode == "auto":
        denoiser = _settled_auto_denoiser(path)
        summary = execution_summary(denoiser)
    else:
        denoiser = load_quantized_denoiser(path)
        summary = use_execution(denoiser, mode)
    by_name = {layer.name: layer for layer in summary.layers}
    for entry in report["layers"]:
        layer = by_name.get(entry["name"])
        if layer is not None:
            entry.update(path=layer.path, widened=layer.widened, path_reason=layer.reason)
    # named_buffers skips the weight_q buffers the kernels released; their packed copies count instead
    held = sum(t.numel() * t.element_size() for t in (*denoiser.parameters(), *denoiser.buffers()))
    held += sum(layer.kernel_bytes + layer.float_bytes for layer in summary.layers)
    return {
        "mode": mode,
        "support": summary.describe_kernels() or "",
        "integer_layers": len(summary.integer),
        "float_layers": len(summary.floating),
        "float_bytes": sum(layer.float_bytes for layer in summary.layers),
        "reference_layers": len(summary.reference),
        "widened_layers": sum(layer.widened for layer in summary.layers),
        "attention": summary.attention,
        "held_bytes": held,
        "ratio_vs_fp32": held / report["totals"]["fp32_bytes"] if report["totals"]["fp32_bytes"] else float("nan"),
    }


def _settled_auto_denoiser(path):
    """The folder's pipeline in auto execution after one denoising step at its own settings (its prompt set's
    guidance, its default size), so that each layer has chosen its path at the shapes generation gives it."""
    import torch

    from quantdiff.evaluation.prompt_sets import read_evaluation_set
    from quantdiff.generate import load_any_pipeline

    pipe = load_any_pipeline(path, execution="auto")
    own = read_evaluation_set(read_quantized_folder(path).base_path)
    guidance = {} if own is None or own.guidance is None else {"guidance_scale": float(own.guidance)}
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(prompt="a photo", num_inference_steps=1, output_type="latent", **guidance)
    return denoiser_of(pipe)[1]


def report_pipeline_folder(path: str | os.PathLike, recipe: Recipe | str | None = None) -> dict[str, Any]:
    """Report of a plain pipeline folder: its denoiser in floating point, or as ``recipe`` would make it."""
    folder = read_pipeline_folder(path)
    denoiser = folder.denoiser_skeleton()
    if recipe is not None:
        recipe = load_recipe(recipe)
        plan = resolve_plan(denoiser, recipe, folder.architecture)
        build_skeleton(denoiser, plan)
    else:  # no recipe: list the candidate layers, all in floating point
        candidates = resolve_plan(denoiser, PRESETS["w8a16"], folder.architecture)
        plan = QuantPlan(
            tuple(replace(layer, weights=None, activations=None, reason="floating point") for layer in candidates)
        )
    tensors = {
        name: (tuple(t.shape), t.element_size(), t.is_floating_point()) for name, t in all_tensors(denoiser).items()
    }
    return _report(str(folder.path), False, plan, recipe, folder.architecture.name, folder.denoiser_class, tensors)


def _report(path, quantized: bool, plan: QuantPlan, recipe, architecture, denoiser_class, tensors) -> dict[str, Any]:
    quantized_names = {layer.name for layer in plan.quantized}
    layers = []
    for layer in plan:
        own = {name: t for name, t in tensors.items() if name.rpartition(".")[0] == layer.name}
        params = layer.num_weights + (layer.out_features if layer.has_bias else 0)
        layers.append(
            {
                "name": layer.name,
                "type": layer.layer_type,
                "shape": list(layer.weight_shape),
                "weights": layer.weights.describe() if layer.weights else None,
                "activations": layer.activations.describe() if layer.activations else None,
                "params": params,
                "fp32_bytes": params * 4,
                "stored_bytes": sum(math.prod(shape) * size for shape, size, _ in own.values()),
                "reason": layer.reason,
                "extras": {extra: dict(params) for extra, params in layer.extras.items()},
            }
        )
    params = sum(entry["params"] for entry in layers if entry["name"] in quantized_names)
    params += sum(
        math.prod(shape)
        for name, (shape, _, floating) in tensors.items()
        if floating and name.rpartition(".")[0] not in quantized_names
    )
    stored = sum(math.prod(shape) * size for shape, size, _ in tensors.values())
    totals = {
        "layers": len(layers),
        "quantized_layers": len(quantized_names),
        "params": params,
        "fp32_bytes": params * 4,
        "fp16_bytes": params * 2,
        "stored_bytes": stored,
        "ratio_vs_fp32": stored / (params * 4) if params else float("nan"),
        "ratio_vs_fp16": stored / (params * 2) if params else float("nan"),
    }
    return {
        "path": path,
        "quantized": quantized,
        "recipe": recipe.name if recipe is not None else None,
        "label": recipe.label if recipe is not None else None,
        "algorithms": [algorithm.describe() for algorithm in recipe.algorithms] if recipe is not None else [],
        "architecture": architecture,
        "denoiser_class": denoiser_class,
        "layers": layers,
        "totals": totals,
        "execution": None,
    }


def format_report(report: dict[str, Any], *, max_layers: int | None = None) -> str:
    """The report as a plain-text table followed by the totals."""
    header = ("layer", "type", "shape", "weights", "inputs", "fp32", "stored")
    rows = [
        (
            entry["name"],
            entry["type"],
            "x".join(map(str, entry["shape"])),
            entry["weights"] or "fp32",
            entry["activations"] or "fp",
            _bytes(entry["fp32_bytes"]),
            _bytes(entry["stored_bytes"]),
        )
        for entry in report["layers"]
    ]
    if report.get("execution") is not None:  # the integer-kernel path of each layer on this CPU
        header = (*header, "cpu path")
        rows = [(*row, _path_cell(entry)) for row, entry in zip(rows, report["layers"], strict=True)]
    hidden = 0
    if max_layers is not None and len(rows) > max_layers:
        hidden = len(rows) - max_layers
        rows = rows[:max_layers]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if hidden:
        lines.append(f"... {hidden} more layers (inspect --json lists all)")
    return "\n".join([*lines, "", format_totals(report)])


def format_totals(report: dict[str, Any]) -> str:
    """The report's totals: layer counts, parameters and the denoiser size in fp32 / fp16 / stored bytes."""
    totals = report["totals"]
    title = f"{report['denoiser_class']} ({report['architecture']})"
    if report["recipe"]:
        title += f", recipe {report['recipe']} ({report['label']})"
    lines = [
        title,
        f"layers: {totals['quantized_layers']} of {totals['layers']} Linear/Conv2d quantized",
        *([f"algorithms: {', '.join(report['algorithms'])}"] if report.get("algorithms") else []),
        f"parameters: {totals['params']:,}",
        f"denoiser size: fp32 {_bytes(totals['fp32_bytes'])}, fp16 {_bytes(totals['fp16_bytes'])}, "
        f"stored {_bytes(totals['stored_bytes'])} "
        f"({totals['ratio_vs_fp32']:.3f}x of fp32, {totals['ratio_vs_fp16']:.3f}x of fp16)",
    ]
    execution = report.get("execution")
    if execution is not None:
        mode = execution.get("mode", "integer")
        floats = execution.get("float_layers", 0)
        lines += [
            f"{mode} mode: {execution['integer_layers']} layers on the int8 kernel "
            f"({execution['widened_layers']} with 4-bit weights widened to int8), "
            + (
                f"{floats} on the float path (faster here; {_bytes(execution['float_bytes'])} fp32 copies), "
                if floats
                else ""
            )
            + f"{execution['reference_layers']} on the reference path; {execution['support']}"
            + (f"; attention in {describe_attention(execution['attention'])}" if execution.get("attention") else ""),
            f"held in {mode} mode: {_bytes(execution['held_bytes'])} ({execution['ratio_vs_fp32']:.3f}x of fp32)",
        ]
    return "\n".join(lines)


def _path_cell(entry: dict[str, Any]) -> str:
    if "path" not in entry:
        return "fp32"
    if entry["path"] == "integer":
        return "int8 kernel (int4 widened)" if entry["widened"] else "int8 kernel"
    if entry["path"] == "float":  # auto: faster than the kernel at this layer's shape
        return "float: " + entry["path_reason"].removeprefix("float: ").split(" at input")[0]
    return entry["path_reason"].split(";")[0].split(" (")[0]


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return str(count)
