"""``quantdiff bench``: one denoiser step, fp32 vs quantdiff's integer and reference paths vs the int8 tools a
user would pick instead, measured side by side in one process.

Why: research PTQ code quantizes "in simulation" and gets no faster; quantdiff claims integer kernels and
integer weights (issue 4). This module proves or refutes that on the machine it runs on, against the
baseline that matters (the faster of fp32 eager and fp32 ``torch.compile``) and against every peer, with
the memory and the one-time costs a user pays. Real-size denoisers are built from their published configs
with random weights: speed and memory depend only on shapes, so nothing is downloaded.

Rows. One row per (model, latent size, method). Methods (:data:`METHODS`):

* ``fp32`` / ``fp32-compile``: the baselines. ``fp32`` always runs: it is the reference output (SQNR), the
  source every other method is built from, and the anchor of every timing round.
* ``qd-w8a8`` (+ ``-compile``): preset ``w8a8-int`` (pair-safe int8 weights, static int8 activations) in
  integer mode (``quantdiff.nn.use_integer_kernels``): oneDNN int8 conv/linear, exact on AVX2 CPUs.
  ``qd-w8a16``, ``qd-w4a8``, ``qd-w4a16``: the presets' formats; they keep the reference (fake-quant) path,
  because weight-only and per-group layers have no int8 kernel. The 4-bit rows use min-max weight ranges
  (the presets' MSE search took 4 s per million weights on one loaded core here, i.e. tens of minutes per
  SD1.5 UNet; same format, path, speed and memory);
  ``qd-w4a8-mse`` / ``qd-w4a16-mse`` are the presets exactly. ``qd-w4a8-ch``: int4 per-channel weights,
  which the kernel takes after widening them to int8. Each row's ``path`` / ``path_detail`` come from the
  ExecutionSummary and say which layers run which path and why (widened layers included).
* peers, each optional (a missing package or a failure gives a row with its status and a one-line reason,
  and the run goes on): ``ao-dynamic`` (+ ``-compile``: ``torch.ao`` dynamic int8 Linear),
  ``pt2e-compile`` (PT2E static int8, ``X86InductorQuantizer`` default config, calibrated on the same
  inputs as quantdiff, then ``torch.compile``), ``quanto-w8a8`` (+ ``-compile``) / ``quanto-w8``
  (optimum-quanto), ``torchao-w8`` (+ ``-compile``) / ``torchao-w8a8`` (+ ``-compile``), ``ort-qdq``
  (ONNX Runtime static int8 QDQ, u8 activations, s8 per-channel weights).

Inputs. Batch 1 by default (one latent; classifier-free guidance would double it: ``batch=2``). Calibration
(quantdiff and PT2E, the very same inputs): ``calibration_inputs`` Gaussian latents at evenly spread
timesteps with Gaussian text embeddings of the real shapes (SD1.5: 77 x 768; SDXL: 77 x 2048 + pooled
1280 + size ids; SD3: 333 x 4096 (77 CLIP + 256 T5 tokens) + pooled 2048). Timing and SQNR use one further
input at timestep 500, not in the calibration set. Weights: N(0, 1/fan_in) (bell-shaped like trained
weights), norms 1/0, biases N(0, 0.02), from ``seed``.

Timing (one process). Methods are built one after another and kept alive in a *group*; when the next one
would not fit in the memory budget (or ``group_size`` is reached) the group is timed and freed. A group's
timing runs ``warmup`` + ``repeats`` rounds; each round calls every live method once, fp32 eager included,
in a fresh random order, so slow drifts of the machine hit every method alike. ``median_s`` is the median
of the timed rounds; ``speedup_vs_fp32`` is fp32 eager's median in the same group over the method's
median; ``speedup_vs_best_fp32`` divides that by fp32-compile's own speedup when compiling helped (the
faster fp32 baseline). Compiled methods use inductor with ``freezing`` (weights become constants: what
makes fp32 and PT2E fast on CPU) and a cold FX-graph cache, so ``first_call_s`` is a user's first compile.

Memory (one process, Linux). Every reading follows ``gc.collect()`` + ``malloc_trim``; peaks come from
VmHWM, reset through ``/proc/self/clear_refs`` (or a 2 ms RSS sampler where that is refused):

* ``weight_bytes``: weight tensors the method holds, counted tensor by tensor: parameters, buffers,
  tensor attributes, the inner tensors of tensor subclasses (torchao, quanto), torch.ao packed weights,
  and quantdiff's prepacked kernel copies (integer mode releases ``weight_q`` to the packed copy, so a W8
  layer holds 1 byte per weight); fp32 layers a method leaves unquantized count too. ``ort-qdq``: the quantized ONNX
  model's bytes. What ``torch.compile`` adds (frozen / prepacked weight copies plus generated code) cannot
  be split by tensor; it is measured as RSS and reported as ``compile_added_bytes``.
* ``held_bytes``: RSS the method added when it was built (after its first calls, settled), including
  ``compile_added_bytes``; for ``fp32`` the model itself.
* ``peak_rss_bytes``: the peak RSS of a process that holds only this method while it runs one step:
  the process's RSS before its first case (libraries loaded, no model: the cases' ``base_rss_bytes``) +
  ``held_bytes`` + the step's own transient peak (activations, workspaces), each measured here. (Later
  cases start higher, by what earlier compiles leave behind; deltas keep that out of their rows.)
* ``setup_peak_rss_bytes``: peak RSS while building it: base + the fp32 model it is built from (kept) + the
  build's measured peak. ``ort-qdq``: the measured peak of the child process that exports and quantizes.

One-time cost: ``setup_s`` (quantize / calibrate / export / convert / prepack, before the first call) and
``first_call_s`` (compile included); ``one_time_s`` is their sum.

JSON (:func:`write_json`): ``{"format": "quantdiff-bench", "version": 1, "started", "duration_s",
"machine": {...}, "settings": {...}, "cases": [...], "rows": [...]}``; each row has the fields of
:class:`BenchRow`:

* ``model`` (str), ``latent`` (int, side of the square latent), ``latent_shape`` ([B, C, H, W]), ``batch``,
  ``method``, ``label``, ``kind`` (``fp32`` | ``quantdiff`` | ``peer``), ``compiled`` (bool);
* ``status`` (``ok`` | ``failed`` | ``not installed`` | ``skipped``), ``reason`` (one line, "" when ok);
* ``median_s``, ``min_s``, ``times_s`` (list), ``group`` (int), ``fp32_median_s`` (fp32 eager's median in
  that group), ``speedup_vs_fp32``, ``speedup_vs_best_fp32``, ``best_fp32`` (``fp32`` | ``fp32-compile``);
* ``weight_bytes``, ``weight_ratio_vs_fp32``, ``stored_bytes`` / ``kernel_bytes`` (quantdiff: ``weight_q``
  bytes still held, 0 for layers on the integer path, and prepacked bytes), ``compile_added_bytes``, ``held_bytes``, ``peak_rss_bytes``, ``setup_peak_rss_bytes``,
  ``step_peak_extra_bytes``;
* ``sqnr_db`` (dB vs fp32 eager on the evaluation input; ``null`` with ``identical_to_fp32: true`` when
  bit-identical), ``setup_s``, ``first_call_s``, ``one_time_s``;
* ``path`` (``fp32`` | ``inductor`` | ``integer`` | ``reference`` | ``mixed`` | a peer's engine),
  ``path_detail``, ``integer_layers``, ``reference_layers``, ``widened_layers``, ``quantized_layers``,
  ``notes`` (list of strings).

Numbers are ``null`` where they do not apply (e.g. a failed row). The API changes process-wide torch state
while it runs: the thread count (restored), dynamo's caches (reset between groups).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import fnmatch
import gc
import importlib
import itertools
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil
import torch
from torch import Tensor, nn

from quantdiff.calibration.dataset import CalibrationRecord, CalibrationSet, denoiser_output
from quantdiff.errors import QuantDiffError
from quantdiff.pipelines.loading import config_hash
from quantdiff.pipelines.reference_configs import SD3_MEDIUM_TRANSFORMER, SD15_UNET, SDXL_UNET
from quantdiff.primitives import sqnr_db
from quantdiff.recipe import PRESETS, Recipe, TensorSpec

__all__ = [
    "DENOISERS",
    "METHODS",
    "BenchResult",
    "BenchRow",
    "BenchSettings",
    "DenoiserSpec",
    "MachineInfo",
    "MethodSpec",
    "build_denoiser",
    "denoiser_inputs",
    "format_table",
    "machine_info",
    "make_settings",
    "render_markdown",
    "run_benchmark",
    "write_json",
    "write_markdown",
]

FORMAT_NAME = "quantdiff-bench"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ denoisers
@dataclass(frozen=True)
class DenoiserSpec:
    """A denoiser to benchmark: its diffusers class, config and text-conditioning shape.

    Attributes:
        name: id used on the command line (``sd15``, ``sdxl``, ``sd3``, ``tiny-sd15``, ...).
        title: human name for reports.
        class_name: ``UNet2DConditionModel`` or ``SD3Transformer2DModel``.
        config: constructor config (published ``config.json`` values for the real models).
        text_tokens: tokens of ``encoder_hidden_states`` the pipeline passes (SD3: 77 CLIP + 256 T5).
        source: where the config comes from.
    """

    name: str
    title: str
    class_name: str
    config: Mapping[str, Any]
    text_tokens: int
    source: str

    @property
    def is_unet(self) -> bool:
        return self.class_name == "UNet2DConditionModel"

    def check_latent(self, side: int) -> None:
        """Raise :class:`QuantDiffError` unless the denoiser accepts a ``side`` x ``side`` latent."""
        if self.is_unet:
            multiple = 2 ** (len(self.config["block_out_channels"]) - 1)  # one halving per down block but the last
            largest = None
        else:
            multiple = int(self.config["patch_size"])
            largest = int(self.config["pos_embed_max_size"]) * multiple
        if side < multiple or side % multiple:
            raise QuantDiffError(f"{self.name}: latent size {side} must be a positive multiple of {multiple}")
        if largest is not None and side > largest:
            raise QuantDiffError(f"{self.name}: latent size {side} is above its position table ({largest})")


# The tiny denoisers of quantdiff.pipelines.tiny (same configs): for tests and smoke runs of this module.
_TINY_SD15 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 32,
    "use_linear_projection": False,
}
_TINY_SDXL = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 6 * 16 + 32,
}
_TINY_SD3 = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "joint_attention_dim": 128,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
}

DENOISERS: Mapping[str, DenoiserSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            DenoiserSpec(
                "sd15", "SD1.5 UNet (860M)", "UNet2DConditionModel", SD15_UNET, 77, "runwayml/stable-diffusion-v1-5"
            ),
            DenoiserSpec(
                "sdxl",
                "SDXL UNet (2.57B)",
                "UNet2DConditionModel",
                SDXL_UNET,
                77,
                "stabilityai/stable-diffusion-xl-base-1.0",
            ),
            DenoiserSpec(
                "sd3",
                "SD3-Medium MMDiT (2.03B)",
                "SD3Transformer2DModel",
                SD3_MEDIUM_TRANSFORMER,
                77 + 256,
                "stabilityai/stable-diffusion-3-medium-diffusers",
            ),
            DenoiserSpec(
                "tiny-sd15",
                "tiny SD1.5-layout UNet",
                "UNet2DConditionModel",
                MappingProxyType(_TINY_SD15),
                77,
                "quantdiff tiny",
            ),
            DenoiserSpec(
                "tiny-sdxl",
                "tiny SDXL-layout UNet",
                "UNet2DConditionModel",
                MappingProxyType(_TINY_SDXL),
                77,
                "quantdiff tiny",
            ),
            DenoiserSpec(
                "tiny-sd3",
                "tiny SD3-layout MMDiT",
                "SD3Transformer2DModel",
                MappingProxyType(_TINY_SD3),
                77 + 16,
                "quantdiff tiny",
            ),
        )
    }
)


def build_denoiser(spec: DenoiserSpec, seed: int = 0) -> nn.Module:
    """The denoiser of ``spec`` in fp32 eval mode with seeded random weights, deterministic across processes.

    Parameters are created empty (accelerate's ``init_empty_weights`` when installed, so the library's own
    init is not paid for and then overwritten) and filled once, in module order, from one generator:
    Linear / Conv2d weights N(0, 1/fan_in) (bell-shaped like trained weights, so quantization error and
    the pair-safe cost are realistic; activations keep their scale through each layer), norm scales 1 and
    shifts 0, everything else N(0, 0.02). Buffers (e.g. SD3's position table) keep their computed values.
    """
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    try:
        from accelerate import init_empty_weights

        empty = init_empty_weights(include_buffers=False)
    except ImportError:
        empty = contextlib.nullcontext()
    with empty:
        model = cls.from_config(dict(spec.config))
    generator = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                data = torch.empty(param.shape, dtype=torch.float32) if param.is_meta else param.data.float()
                if isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight":
                    data.normal_(0.0, data[0].numel() ** -0.5, generator=generator)  # fan_in = in/groups * kh * kw
                elif isinstance(module, norms) or "norm" in type(module).__name__.lower():
                    data.fill_(1.0 if name == "weight" else 0.0)
                else:
                    data.normal_(0.0, 0.02, generator=generator)
                module._parameters[name] = nn.Parameter(data, requires_grad=False)
    return model.float().eval().requires_grad_(False)


def denoiser_inputs(spec: DenoiserSpec, latent: int, batch: int, timestep: float, seed: int) -> dict[str, Any]:
    """Keyword arguments of one denoiser call: Gaussian latent and text embeddings of the real shapes.

    UNets get an int64 timestep (DDPM-style, 0..999), SD3 a float one (flow matching: sigma x 1000). SDXL's
    size conditioning (``time_ids``) holds the image size the latent stands for (x8), no crop.
    """
    generator = torch.Generator().manual_seed(seed)
    config = spec.config
    channels = int(config["in_channels"])
    sample = torch.randn(batch, channels, latent, latent, generator=generator)  # (B, C, h, w)
    if spec.is_unet:
        text = torch.randn(
            batch, spec.text_tokens, int(config["cross_attention_dim"]), generator=generator
        )  # (B, T, D)
        inputs: dict[str, Any] = {
            "sample": sample,
            "timestep": torch.full((batch,), int(round(timestep)), dtype=torch.int64),
            "encoder_hidden_states": text,
        }
        if config.get("addition_embed_type") == "text_time":
            pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
            pixels = float(latent * 8)
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, generator=generator),  # (B, pooled)
                "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).expand(batch, 6).clone(),
            }
    else:
        text = torch.randn(batch, spec.text_tokens, int(config["joint_attention_dim"]), generator=generator)
        inputs = {
            "hidden_states": sample,
            "timestep": torch.full((batch,), float(timestep)),
            "encoder_hidden_states": text,  # (B, T, 4096)
            "pooled_projections": torch.randn(batch, int(config["pooled_projection_dim"]), generator=generator),
        }
    inputs["return_dict"] = False
    return inputs


def calibration_timesteps(count: int) -> list[float]:
    """``count`` timesteps evenly spread over (0, 1000), noisiest first: 4 -> 875, 625, 375, 125."""
    return [1000.0 * (count - i - 0.5) / count for i in range(count)]


EVAL_TIMESTEP = 500.0
EVAL_SEED_OFFSET = 1000  # the evaluation input's seed is seed + 1000; calibration input i uses seed + 1 + i


def bench_calibration(
    spec: DenoiserSpec, denoiser: nn.Module, latent: int, batch: int, count: int, seed: int
) -> CalibrationSet:
    """The calibration set quantdiff and PT2E both use: ``count`` random inputs at spread timesteps."""
    records = [
        CalibrationRecord(denoiser_inputs(spec, latent, batch, t, seed + 1 + i), i, i, t)
        for i, t in enumerate(calibration_timesteps(count))
    ]
    info = {
        "model": f"bench:{spec.name}",
        "denoiser_class": spec.class_name,
        "denoiser_config_hash": config_hash(denoiser.config),
        "mode": "bench-random",
        "step_indices": list(range(count)),
        "timesteps": calibration_timesteps(count),
        "prompts": [],
        "seed": seed,
    }
    return CalibrationSet(records, info)


# ------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """One row kind of the benchmark.

    Attributes:
        name: id (``qd-w8a8-compile``).
        label: human name.
        kind: ``fp32``, ``quantdiff`` or ``peer``.
        build: the model it runs; methods with the same build share one model (eager and compiled rows).
        compiled: the row runs ``torch.compile`` of the build.
        requires: importable modules it needs (optional packages): missing ones give a ``not installed`` row.
        description: what it is, for the report.
    """

    name: str
    label: str
    kind: str
    build: str
    compiled: bool
    requires: tuple[str, ...]
    description: str


def _minmax_weights(recipe: Recipe, name: str) -> Recipe:
    """``recipe`` with min-max weight ranges. The 4-bit presets search each group's range (Lp / MSE, 80
    candidates), measured at 4 s per million weights on one loaded core here: tens of minutes for an SD1.5
    UNet, which would dominate the benchmark; min-max gives the same stored format, path, speed and memory."""
    weights = dataclasses.replace(recipe.weights, observer="minmax", observer_options={})
    return Recipe(name=name, weights=weights, activations=recipe.activations)


# quantdiff builds -> recipe (all in integer mode; layers the kernel cannot take keep the reference path)
_QD_RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {
        "qd-w8a8": PRESETS["w8a8-int"],
        "qd-w4a8": _minmax_weights(PRESETS["w4a8"], "w4a8-minmax-weights"),
        "qd-w4a8-mse": PRESETS["w4a8"],
        "qd-w4a8-ch": Recipe(
            name="w4a8-channel",
            weights=TensorSpec(bits=4, symmetric=True, granularity="channel", observer="minmax"),
            activations=PRESETS["w4a8"].activations,
        ),
        "qd-w8a16": PRESETS["w8a16"],
        "qd-w4a16": _minmax_weights(PRESETS["w4a16"], "w4a16-minmax-weights"),
        "qd-w4a16-mse": PRESETS["w4a16"],
    }
)
_PIP_NAMES = MappingProxyType({"optimum.quanto": "optimum-quanto", "onnxruntime": "onnxruntime", "torchao": "torchao"})


def _method(name, label, kind, build, compiled, requires, description) -> MethodSpec:
    return MethodSpec(name, label, kind, build, compiled, tuple(requires), description)


METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        m.name: m
        for m in (
            _method("fp32", "fp32 eager", "fp32", "fp32", False, (), "the fp32 model, eager"),
            _method("fp32-compile", "fp32 torch.compile", "fp32", "fp32", True, (), "inductor, freezing"),
            _method(
                "qd-w8a8",
                "quantdiff W8A8 (int8 kernels)",
                "quantdiff",
                "qd-w8a8",
                False,
                (),
                "preset w8a8-int, integer mode",
            ),
            _method(
                "qd-w8a8-compile",
                "quantdiff W8A8 + compile",
                "quantdiff",
                "qd-w8a8",
                True,
                (),
                "preset w8a8-int, integer mode, inductor with freezing",
            ),
            _method(
                "qd-w4a8",
                "quantdiff W4A8 (group 128)",
                "quantdiff",
                "qd-w4a8",
                False,
                (),
                "preset w4a8's format (int4 groups of 128, int8 activations) with min-max weight ranges",
            ),
            _method(
                "qd-w4a8-mse",
                "quantdiff W4A8 (preset)",
                "quantdiff",
                "qd-w4a8-mse",
                False,
                (),
                "preset w4a8 exactly (MSE weight ranges: slow to quantize)",
            ),
            _method(
                "qd-w4a8-ch",
                "quantdiff W4A8 per-channel",
                "quantdiff",
                "qd-w4a8-ch",
                False,
                (),
                "int4 per-channel weights (min-max), int8 activations: the int8 kernel after widening",
            ),
            _method("qd-w8a16", "quantdiff W8A16", "quantdiff", "qd-w8a16", False, (), "preset w8a16 (weight-only)"),
            _method(
                "qd-w4a16",
                "quantdiff W4A16 (group 128)",
                "quantdiff",
                "qd-w4a16",
                False,
                (),
                "preset w4a16's format (int4 groups of 128) with min-max weight ranges",
            ),
            _method(
                "qd-w4a16-mse",
                "quantdiff W4A16 (preset)",
                "quantdiff",
                "qd-w4a16-mse",
                False,
                (),
                "preset w4a16 exactly (MSE weight ranges: slow to quantize)",
            ),
            _method(
                "ao-dynamic", "torch.ao dynamic int8", "peer", "ao-dynamic", False, (), "quantize_dynamic on nn.Linear"
            ),
            _method(
                "ao-dynamic-compile",
                "torch.ao dynamic int8 + compile",
                "peer",
                "ao-dynamic",
                True,
                (),
                "quantize_dynamic on nn.Linear, inductor with freezing",
            ),
            _method(
                "pt2e-compile",
                "PT2E static int8 + compile",
                "peer",
                "pt2e",
                True,
                ("torchao",),
                "torch.export, X86InductorQuantizer default config, same calibration, inductor with freezing",
            ),
            _method(
                "quanto-w8a8",
                "optimum-quanto W8A8",
                "peer",
                "quanto-w8a8",
                False,
                ("optimum.quanto",),
                "qint8 weights and activations, calibrated",
            ),
            _method(
                "quanto-w8a8-compile",
                "optimum-quanto W8A8 + compile",
                "peer",
                "quanto-w8a8",
                True,
                ("optimum.quanto",),
                "qint8 weights and activations, inductor with freezing",
            ),
            _method("quanto-w8", "optimum-quanto W8", "peer", "quanto-w8", False, ("optimum.quanto",), "qint8 weights"),
            _method(
                "torchao-w8",
                "torchao int8 weight-only",
                "peer",
                "torchao-w8",
                False,
                ("torchao",),
                "Int8WeightOnlyConfig",
            ),
            _method(
                "torchao-w8-compile",
                "torchao int8 weight-only + compile",
                "peer",
                "torchao-w8",
                True,
                ("torchao",),
                "Int8WeightOnlyConfig, inductor with freezing",
            ),
            _method(
                "torchao-w8a8",
                "torchao dynamic W8A8",
                "peer",
                "torchao-w8a8",
                False,
                ("torchao",),
                "Int8DynamicActivationInt8WeightConfig",
            ),
            _method(
                "torchao-w8a8-compile",
                "torchao dynamic W8A8 + compile",
                "peer",
                "torchao-w8a8",
                True,
                ("torchao",),
                "Int8DynamicActivationInt8WeightConfig, inductor with freezing",
            ),
            _method(
                "ort-qdq",
                "ONNX Runtime int8 QDQ",
                "peer",
                "ort",
                False,
                ("onnxruntime", "onnx"),
                "ONNX export, quantize_static QDQ (u8 activations, s8 per-channel weights), same calibration",
            ),
        )
    }
)

# The quick preset skips the peers whose setup takes minutes (PT2E export + calibration + compile, ONNX export
# + quantize_static, further compiles): two compiles (fp32 and quantdiff W8A8, the headline comparison) remain.
QUICK_METHODS = ("fp32", "fp32-compile", "qd-w8a8", "qd-w8a8-compile", "qd-w8a16", "ao-dynamic", "torchao-w8")
# Everything but: the exact 4-bit presets (their MSE weight search takes tens of minutes per SD1.5 UNet; the
# default 4-bit rows use min-max ranges, same format and speed); torchao's dynamic W8A8 (eager 6x slower
# than fp32 on AVX2; compiled it lowers to the reference _int_mm kernel, 25-60x slower); quanto's
# weight-only row. Add them with --methods.
_NOT_DEFAULT = ("qd-w4a8-mse", "qd-w4a16-mse", "torchao-w8a8", "torchao-w8a8-compile", "quanto-w8")
FULL_METHODS = tuple(m for m in METHODS if m not in _NOT_DEFAULT)
QUICK_MODELS = ("sd15",)
FULL_MODELS = ("sd15", "sdxl", "sd3")
QUICK_LATENTS: Mapping[str, tuple[int, ...]] = MappingProxyType({"sd15": (32,), "sdxl": (32,), "sd3": (32,)})
FULL_LATENTS: Mapping[str, tuple[int, ...]] = MappingProxyType({"sd15": (32, 64), "sdxl": (64,), "sd3": (64,)})
TINY_LATENT = 16


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how; build with :func:`make_settings` (validated, with the presets' defaults).

    Attributes:
        models: denoiser names (:data:`DENOISERS`), in run order.
        latents: model -> latent sides to measure.
        methods: method names (:data:`METHODS`); ``fp32`` is always included.
        repeats: timed rounds per group.
        warmup: untimed rounds before them (each method also ran twice when it was built).
        threads: torch (and ONNX Runtime) threads; ``None`` keeps torch's setting.
        batch: latents per call (1; 2 = classifier-free guidance).
        calibration_inputs: random calibration inputs for quantdiff and PT2E.
        seed: weights, inputs and the random round order.
        group_size: most methods alive (and timed together) besides fp32 eager; a build's eager and compiled
            rows stay in one group. ``None``: as many as the memory budget allows.
        memory_budget_bytes: RSS this process may reach; ``None``: 85% of (available + own) memory at the
            start of each case.
        freezing: compile with inductor's ``freezing`` (weights as constants, prepacked).
        quick: the quick preset was used (reported).
    """

    models: tuple[str, ...]
    latents: Mapping[str, tuple[int, ...]]
    methods: tuple[str, ...]
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    batch: int = 1
    calibration_inputs: int = 4
    seed: int = 0
    group_size: int | None = None
    memory_budget_bytes: int | None = None
    freezing: bool = True
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


def make_settings(
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    latents: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    repeats: int | None = None,
    warmup: int = 1,
    threads: int | None = None,
    batch: int = 1,
    calibration_inputs: int = 4,
    seed: int = 0,
    group_size: int | None = None,
    memory_budget_bytes: int | None = None,
    freezing: bool = True,
) -> BenchSettings:
    """Validated :class:`BenchSettings`; anything not given comes from the quick or the full preset.

    Presets: quick = ``sd15`` at 32x32, :data:`QUICK_METHODS` (no slow peers), 3 repeats; full = ``sd15``
    at 32x32 and 64x64, ``sdxl`` at 64x64 (512 px; its native 128x128 is ~4x slower per step), ``sd3`` at
    64x64, :data:`FULL_METHODS`, 5 repeats. ``methods`` entries may be names, shell patterns (``qd-*``),
    ``default`` (the preset's) or ``all``. ``latents`` is a mapping model -> sides, or sides for every
    model; with ``quick`` every real model defaults to 32x32, tiny models to 16x16. User errors raise
    :class:`QuantDiffError`.
    """
    models = tuple(models) if models else (QUICK_MODELS if quick else FULL_MODELS)
    unknown = [name for name in models if name not in DENOISERS]
    if unknown:
        raise QuantDiffError(f"unknown model(s) {', '.join(unknown)}: use {', '.join(DENOISERS)}")
    if latents is not None and not isinstance(latents, Mapping):
        latents = {"*": tuple(latents)}
    if latents is not None:
        extra = sorted(set(latents) - set(models) - {"*"})
        if extra:
            raise QuantDiffError(f"latent sizes given for {', '.join(extra)}, which is not among the models")
    chosen: dict[str, tuple[int, ...]] = {}
    for name in models:
        given = None if latents is None else (latents.get(name) or latents.get("*"))
        sides = tuple(given) if given is not None else _default_latents(name, quick)
        if not sides:
            raise QuantDiffError(f"{name}: no latent size given")
        for side in sides:
            if isinstance(side, bool) or not isinstance(side, int):
                raise QuantDiffError(f"{name}: latent size {side!r} is not an integer")
            DENOISERS[name].check_latent(side)
        chosen[name] = sides
    resolved = resolve_methods(methods, quick)
    for label, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("batch", batch, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise QuantDiffError(f"{label} must be an integer >= {low}, got {value!r}")
    if calibration_inputs < 1:
        raise QuantDiffError(f"calibration inputs must be at least 1, got {calibration_inputs}")
    if threads is not None and threads < 1:
        raise QuantDiffError(f"threads must be at least 1, got {threads}")
    if group_size is not None and group_size < 1:
        raise QuantDiffError(f"group size must be at least 1, got {group_size}")
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise QuantDiffError("the memory budget must be positive")
    return BenchSettings(
        models=models,
        latents=MappingProxyType(chosen),
        methods=resolved,
        repeats=repeats if repeats is not None else (3 if quick else 5),
        warmup=warmup,
        threads=threads,
        batch=batch,
        calibration_inputs=calibration_inputs,
        seed=seed,
        group_size=group_size,
        memory_budget_bytes=memory_budget_bytes,
        freezing=freezing,
        quick=quick,
    )


def _default_latents(model: str, quick: bool) -> tuple[int, ...]:
    """The preset's latent sides for ``model`` (quick: 32x32 for the real models); tiny models: 16x16."""
    return (QUICK_LATENTS if quick else FULL_LATENTS).get(model, (TINY_LATENT,))


def resolve_methods(methods: Sequence[str] | None, quick: bool = False) -> tuple[str, ...]:
    """Method names in :data:`METHODS` order from names, patterns, ``default`` or ``all``; fp32 always first."""
    wanted: set[str] = {"fp32"}
    for entry in methods or ("default",):
        entry = entry.strip()
        if not entry:
            continue
        if entry == "default":
            wanted.update(QUICK_METHODS if quick else FULL_METHODS)
        elif entry == "all":
            wanted.update(METHODS)
        else:
            matched = [name for name in METHODS if fnmatch.fnmatchcase(name, entry)]
            if not matched:
                raise QuantDiffError(
                    f"unknown method {entry!r}: use {', '.join(METHODS)}, a pattern, 'default' or 'all'"
                )
            wanted.update(matched)
    return tuple(name for name in METHODS if name in wanted)


# ------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BenchRow:
    """One measurement; the JSON schema is in the module docstring."""

    model: str
    latent: int
    latent_shape: tuple[int, ...]
    batch: int
    method: str
    label: str
    kind: str
    compiled: bool
    status: str
    reason: str = ""
    median_s: float | None = None
    min_s: float | None = None
    times_s: tuple[float, ...] = ()
    group: int | None = None
    fp32_median_s: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_vs_best_fp32: float | None = None
    best_fp32: str | None = None
    weight_bytes: int | None = None
    weight_ratio_vs_fp32: float | None = None
    stored_bytes: int | None = None
    kernel_bytes: int | None = None
    compile_added_bytes: int | None = None
    held_bytes: int | None = None
    peak_rss_bytes: int | None = None
    setup_peak_rss_bytes: int | None = None
    step_peak_extra_bytes: int | None = None
    sqnr_db: float | None = None
    identical_to_fp32: bool = False
    setup_s: float | None = None
    first_call_s: float | None = None
    one_time_s: float | None = None
    path: str | None = None
    path_detail: str = ""
    integer_layers: int | None = None
    reference_layers: int | None = None
    widened_layers: int | None = None
    quantized_layers: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)  # JSON has no inf / nan: they become None (sqnr_db: see identical_to_fp32)


@dataclass(frozen=True)
class MachineInfo:
    """Where the numbers come from: CPU, its int8-relevant flags, memory, software, threads, load."""

    cpu: str
    logical_cpus: int
    physical_cores: int | None
    usable_cpus: int
    flags: Mapping[str, bool]
    memory_bytes: int
    torch: str
    cpu_capability: str
    threads: int
    quantized_engine: str
    python: str
    system: str
    packages: Mapping[str, str | None]
    int8_kernels: str
    load_average: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def describe(self) -> list[str]:
        """Markdown bullet lines."""
        flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in self.flags.items())
        packages = ", ".join(f"{name} {version or 'not installed'}" for name, version in self.packages.items())
        cores = f"{self.physical_cores} physical cores, " if self.physical_cores else ""
        return [
            f"- CPU: {self.cpu} ({self.logical_cpus} logical CPUs, {cores}{self.usable_cpus} usable by this process)",
            f"- flags: {flags}",
            f"- memory: {self.memory_bytes / 2**30:.1f} GiB; load average at start {self.load_average[0]:.2f}",
            f"- torch {self.torch} (ATen CPU capability {self.cpu_capability}), {self.threads} threads, "
            f"quantized engine {self.quantized_engine}; python {self.python}; {self.system}",
            f"- int8 kernels: {self.int8_kernels}",
            f"- packages: {packages}",
        ]


@dataclass(frozen=True)
class BenchResult:
    """Everything one :func:`run_benchmark` measured."""

    settings: BenchSettings
    machine: MachineInfo
    rows: tuple[BenchRow, ...]
    cases: tuple[Mapping[str, Any], ...]
    started: str
    duration_s: float
    load_average_end: float
    command: str = ""
    complete: bool = True  # False in the snapshots run_benchmark hands to on_case

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "started": self.started,
            "duration_s": self.duration_s,
            "command": self.command,
            "complete": self.complete,
            "load_average_end": self.load_average_end,
            "machine": self.machine.to_dict(),
            "settings": self.settings.to_dict(),
            "cases": [_plain(case) for case in self.cases],
            "rows": [row.to_dict() for row in self.rows],
        }


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses and mappings to dicts, tuples to lists, non-finite floats to None."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
_PACKAGES = ("diffusers", "torchao", "optimum-quanto", "onnxruntime", "onnx", "onnxscript", "accelerate")


def machine_info() -> MachineInfo:
    """Describe this machine and process (CPU model and flags from /proc/cpuinfo where it exists)."""
    from importlib import metadata

    from quantdiff.nn import kernel_support

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu in ("", platform.processor(), platform.machine()):
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    support = kernel_support()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return MachineInfo(
        cpu=cpu,
        logical_cpus=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        usable_cpus=usable,
        flags=MappingProxyType({flag: flag in flags for flag in _FLAGS}),
        memory_bytes=psutil.virtual_memory().total,
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        quantized_engine=torch.backends.quantized.engine,
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
        packages=MappingProxyType(packages),
        int8_kernels=f"{support.describe()} ({support.probe})",
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0),
    )


# -------------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    return psutil.Process().memory_info().rss


def _settled_rss() -> int:
    """RSS after gc and glibc ``malloc_trim``: freed heap pages go back to the OS, so RSS shows what is held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss()


def _hwm() -> int | None:
    """VmHWM (peak RSS) of this process in bytes, ``None`` off Linux."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _hwm() is not None


class _PeakWatch:
    """Peak RSS over a block: VmHWM reset at entry where possible, else a 2 ms RSS sampler thread."""

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakWatch:
        self.start = _settled_rss()
        if not _reset_hwm():
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        else:
            self.peak = max(_hwm() or 0, _rss())

    @property
    def extra(self) -> int:
        """Peak above the RSS at entry."""
        return max(0, self.peak - self.start)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights ``model`` holds, each storage counted once (see the module docstring)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set[tuple[str, int]] = set()
    total = 0

    def add(tensor: Tensor) -> None:
        nonlocal total
        if is_traceable_wrapper_subclass(tensor):  # torchao / quanto: count the inner tensors
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                add(getattr(tensor, name))
            return
        if tensor.is_meta:
            return
        if tensor.is_mkldnn:
            key, size = ("mkldnn", id(tensor)), int(torch.ops.mkldnn._nbytes(tensor))
        elif tensor.is_quantized:
            key, size = ("quantized", id(tensor)), tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            key, size = ("storage", storage.data_ptr()), storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += size

    try:
        from torch.ao.nn.quantized.modules.linear import LinearPackedParams
    except ImportError:  # pragma: no cover - torch without torch.ao
        LinearPackedParams = ()  # noqa: N806
    inside_graphs: set[int] = set()
    for module in model.modules():
        if id(module) in inside_graphs:
            continue
        if isinstance(module, torch.fx.GraphModule):
            # PT2E: only what the graph reads. Its submodules still hold the fp32 parameters the export
            # lifted, which convert_pt2e replaced by int8 constants (they are the reference's, shared).
            inside_graphs.update(id(sub) for sub in module.modules())
            for node in module.graph.nodes:
                if node.op == "get_attr":
                    value = _get_attr(module, node.target)
                    if isinstance(value, Tensor):
                        add(value)
            continue
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
            if tensor is not None:
                add(tensor)
        for value in vars(module).values():  # other tensor attributes
            if isinstance(value, Tensor):
                add(value)
        if LinearPackedParams and isinstance(module, LinearPackedParams):  # torch.ao: packed int8 weight
            weight, bias = module._weight_bias()
            add(weight)
            if bias is not None:
                add(bias)
        total += int(getattr(module, "kernel_bytes", 0) or 0)  # quantdiff: the prepacked kernel copy
    return total


def _get_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


# ------------------------------------------------------------------------------------------------- helpers
def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300].rstrip(": ")


def _share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer with ``model`` (no weight memory).

    Methods that convert a model in place start from this, so the fp32 reference stays intact and no
    second fp32 copy is ever made (an SDXL UNet is 10 GB).
    """
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _inductor_config():
    import torch._inductor.config as inductor_config

    return inductor_config


@contextlib.contextmanager
def _record_inductor_changes(changes: dict[str, Any]) -> Iterator[None]:
    """Undo changes a peer makes to inductor's global config while it quantizes, remembering them in
    ``changes`` so that only its own compile uses them (torchao sets its recommended flags)."""
    config = _inductor_config()
    before = config.get_config_copy()
    precision = torch.get_float32_matmul_precision()  # torchao sets "high": every method keeps the default
    try:
        yield
    finally:
        after = config.get_config_copy()
        for key, value in after.items():
            if key in before and before[key] != value:
                changes[key] = value
                setattr(config, key, before[key])
        torch.set_float32_matmul_precision(precision)


def _dynamo_settings():
    """Compile each model as it would compile alone in a fresh process.

    The models of a group share their forward code (one ``UNet2DConditionModel.forward``), so dynamo sees
    each new model as a recompilation of the same frames: it needs cache room for all of them, and its
    automatic-dynamic-shapes rule (and its profile of earlier runs on disk) would otherwise compile the second
    and later models, or a second latent size, with symbolic shapes (measured: 3-4x longer compiles; it also
    broke torchao's tensor-subclass weights). With ``dynamic=False`` at the call, every compile is static.
    """
    import torch._dynamo.config as dynamo_config

    changes: dict[str, Any] = {"automatic_dynamic_shapes": False}
    if hasattr(dynamo_config, "automatic_dynamic_local_pgo"):  # profiles of earlier runs, kept on disk
        changes["automatic_dynamic_local_pgo"] = False
    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, n)]
    if names:
        changes[names[0]] = 64
    return dynamo_config.patch(changes)


def _compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far (to spot compiles inside timed rounds)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _call(module: Callable, inputs: Mapping[str, Any]) -> Tensor:
    return denoiser_output(module(**inputs))


def _flatten_tensors(inputs: Mapping[str, Any], prefix: str = "") -> tuple[list[str], list[Tensor], dict]:
    """Tensor leaves of a call's kwargs as dotted names (``added_cond_kwargs.time_ids``), and the constants."""
    names, tensors, constants = [], [], {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            names.append(prefix + key)
            tensors.append(value)
        elif isinstance(value, Mapping):
            sub_names, sub_tensors, _ = _flatten_tensors(value, f"{prefix}{key}.")
            names += sub_names
            tensors += sub_tensors
        else:
            constants[key] = value
    return names, tensors, constants


class _PositionalDenoiser(nn.Module):
    """The denoiser called with positional tensors (what ONNX export takes), returning the prediction."""

    def __init__(self, denoiser: nn.Module, names: Sequence[str], constants: Mapping[str, Any]):
        super().__init__()
        self.denoiser = denoiser
        self.names = list(names)
        self.constants = dict(constants)

    def forward(self, *tensors: Tensor) -> Tensor:
        kwargs: dict[str, Any] = dict(self.constants)
        for name, tensor in zip(self.names, tensors, strict=True):
            *parents, leaf = name.split(".")
            node = kwargs
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = tensor
        return denoiser_output(self.denoiser(**kwargs))


def _import_optional(module: str) -> tuple[bool, str]:
    """(importable, reason): a missing package reads ``<pip name> is not installed``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and (module == error.name or module.startswith(error.name + ".")):
            return False, f"{_PIP_NAMES.get(module, module)} is not installed"
        return False, f"import of {module} failed: {_one_line(error)}"
    except Exception as error:  # a broken install is a reason, not a crash
        return False, f"import of {module} failed: {_one_line(error)}"
    return True, ""


# --------------------------------------------------------------------------------------------- the builds
@dataclass
class _Built:
    """A method's model, ready to call on the evaluation input (mutable: the runner fills in measurements)."""

    call: Callable[[], Tensor] | None  # eager call; None: only the compiled row exists (PT2E)
    module: nn.Module | None = None  # what torch.compile wraps
    path: str = ""
    path_detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    stored_bytes: int | None = None
    kernel_bytes: int | None = None
    weight_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    inductor_changes: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    start_rss: int = 0  # settled RSS before the build
    setup_peak: int = 0  # highest RSS while building and in its first calls
    held: int = 0  # RSS the build (and its eager first calls) added


class _Context:
    """What builds need from a case: the fp32 reference, the inputs, the calibration set, threads."""

    def __init__(self, spec, reference, inputs, calibration, threads, ort_model: Path | None):
        self.spec = spec
        self.reference = reference
        self.inputs = inputs
        self.calibration = calibration
        self.threads = threads
        self.ort_model = ort_model


def _build_quantdiff(ctx: _Context, recipe: Recipe) -> _Built:
    from quantdiff.nn import use_integer_kernels
    from quantdiff.quantize import quantize_denoiser

    model = _share_weights_copy(ctx.reference)
    calibration = ctx.calibration if recipe.activations is not None else None
    info = quantize_denoiser(model, recipe, calibration, progress=False)
    summary = use_integer_kernels(model)  # layers the kernel cannot take keep the reference path (reason given)
    reasons = Counter(re.sub(r" \(worst pair sum \d+\)", "", layer.reason) for layer in summary.layers)
    integer, reference = len(summary.integer), len(summary.reference)
    path = "integer" if integer and not reference else ("reference" if not integer else "mixed")
    kept = len(info.plan) - len(info.plan.quantized)
    detail = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
    detail += f"; {kept} layers kept fp32 by the plan" if kept else ""
    built = _Built(call=lambda: _call(model, ctx.inputs), module=model, path=path, path_detail=detail)
    built.counts = {
        "integer_layers": integer,
        "reference_layers": reference,
        "widened_layers": sum(layer.widened for layer in summary.layers),
        "quantized_layers": len(summary.layers),
    }
    totals = summary.to_dict()
    built.stored_bytes, built.kernel_bytes = totals["stored_bytes"], totals["kernel_bytes"]
    if summary.support is not None:
        built.notes.append(summary.support.describe())
    return built


def _build_ao_dynamic(ctx: _Context) -> _Built:
    from torch.ao.quantization import quantize_dynamic

    model = _share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization is deprecated in 2.13; still what users find
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    linears = sum(type(m).__name__ == "Linear" and "dynamic" in type(m).__module__ for m in model.modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    detail = f"{linears} Linear as fbgemm/oneDNN dynamic int8 (per-call activation range); {convs} Conv2d fp32"
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="torch.ao dynamic", path_detail=detail)


def _build_pt2e(ctx: _Context) -> _Built:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(ctx.reference, args=(), kwargs=dict(ctx.inputs), strict=False).module()
        prepared = prepare_pt2e(exported, quantizer)
        for record in ctx.calibration:  # the same inputs quantdiff calibrates on
            prepared(**record.inputs)
        converted = convert_pt2e(prepared)
    detail = (
        f"X86InductorQuantizer default (static per-tensor u8 activations, per-channel s8 weights), "
        f"calibrated on the same {len(ctx.calibration)} inputs; inductor lowers q/dq to oneDNN int8 conv/linear"
    )
    return _Built(call=None, module=converted, path="PT2E + inductor", path_detail=detail)


def _build_quanto(ctx: _Context, activations: bool) -> _Built:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    model = _share_weights_copy(ctx.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, weights=qint8, activations=qint8 if activations else None)
        if activations:
            with Calibration():
                for record in ctx.calibration:
                    model(**record.inputs)
        freeze(model)
    detail = "qint8 weights" + (" and activations (calibrated on the same inputs)" if activations else "")
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="quanto", path_detail=detail)


def _build_torchao(ctx: _Context, dynamic_activations: bool) -> _Built:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    model = _share_weights_copy(ctx.reference)
    config = Int8DynamicActivationInt8WeightConfig() if dynamic_activations else Int8WeightOnlyConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config)  # nn.Linear only (torchao's default filter); Conv2d stays fp32
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    detail = f"{type(config).__name__} on nn.Linear; {convs} Conv2d fp32"
    return _Built(call=lambda: _call(model, ctx.inputs), module=model, path="torchao", path_detail=detail)


def _build_ort(ctx: _Context) -> _Built:
    import onnxruntime as ort

    if ctx.ort_model is None:
        raise RuntimeError("the ONNX model was not prepared")
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(ctx.ort_model), options, providers=["CPUExecutionProvider"])
    names, tensors, _ = _flatten_tensors(ctx.inputs)
    feeds_all = {name: tensor.numpy() for name, tensor in zip(names, tensors, strict=True)}
    missing = [i.name for i in session.get_inputs() if i.name not in feeds_all]
    if missing:
        raise RuntimeError(f"the ONNX model expects inputs {missing} that the denoiser call does not have")
    feeds = {i.name: feeds_all[i.name] for i in session.get_inputs()}
    output = session.get_outputs()[0].name

    def call() -> Tensor:
        return torch.from_numpy(session.run([output], feeds)[0])

    on_disk = sum(f.stat().st_size for f in ctx.ort_model.parent.iterdir() if f.name.startswith(ctx.ort_model.name))
    built = _Built(call=call, module=None, path="ONNX Runtime", weight_bytes=on_disk)
    built.path_detail = "CPU execution provider, QDQ int8 (u8 activations, s8 per-channel weights, MinMax calibration)"
    built.notes.append("weight bytes = the quantized ONNX model on disk; ORT's own prepacked copies show in held")
    return built


_BUILDERS: Mapping[str, Callable[[_Context], _Built]] = MappingProxyType(
    {
        **{name: (lambda ctx, r=recipe: _build_quantdiff(ctx, r)) for name, recipe in _QD_RECIPES.items()},
        "ao-dynamic": _build_ao_dynamic,
        "pt2e": _build_pt2e,
        "quanto-w8a8": lambda ctx: _build_quanto(ctx, True),
        "quanto-w8": lambda ctx: _build_quanto(ctx, False),
        "torchao-w8": lambda ctx: _build_torchao(ctx, False),
        "torchao-w8a8": lambda ctx: _build_torchao(ctx, True),
        "ort": _build_ort,
    }
)

# Memory estimates in units of the fp32 weight bytes, only to decide when a group must be timed and freed
# before the next build: (held after the build, extra transient while building, extra held by compiling).
# "lin" is the Linear share of the weights (what the Linear-only peers convert).
_MEMORY = MappingProxyType(
    {
        "fp32": (0.0, 0.0, 1.7),  # freezing: a packed copy, and a peak 1.65x the weights (SD1.5 measured)
        "qd-w8a8": (0.5, 0.3, 0.1),
        "qd-w4a8": (0.15, 0.4, 0.1),
        "qd-w4a8-mse": (0.15, 0.4, 0.1),
        "qd-w4a8-ch": (0.4, 0.4, 0.1),
        "qd-w8a16": (0.27, 0.3, 0.1),
        "qd-w4a16": (0.15, 0.4, 0.1),
        "qd-w4a16-mse": (0.15, 0.4, 0.1),
        "ao-dynamic": ("lin*0.27", 0.3, "1.1-lin"),
        "pt2e": (0.3, 0.3, 0.3),  # export shares the fp32 tensors; int8 constants, then their packed copies
        "quanto-w8a8": (0.4, 1.0, "1.1-lin"),
        "quanto-w8": (0.4, 1.0, "1.1-lin"),
        "torchao-w8": ("lin*0.27", 0.5, "1.1-lin"),
        "torchao-w8a8": ("lin*0.27", 0.5, "1.1-lin"),
        "ort": (0.6, 0.5, 0.0),
    }
)
_ORT_CHILD_FACTOR = 5.0  # ONNX export + quantize_static peak, x fp32 weight bytes (about 17 GB for SD1.5)


def _estimate(value: float | str, linear_share: float) -> float:
    if isinstance(value, str):
        if value.startswith("lin*"):
            return linear_share * float(value[4:])
        base, _, _ = value.partition("-lin")
        return max(0.0, float(base) - linear_share)
    return float(value)


# ------------------------------------------------------------------------------------------------ ORT child
def _ort_child(job_path: str) -> int:
    """Child process: build the same fp32 denoiser, export it to ONNX, quantize it with ORT; write a JSON result.

    A separate process because export + ``quantize_static`` peak at several times the model's size, which
    must not stay in (or crash) the benchmark process; its measured peak is the row's setup peak.
    """
    job = json.loads(Path(job_path).read_text())
    result: dict[str, Any] = {"status": "failed", "reason": ""}
    try:
        torch.set_num_threads(int(job["threads"]))
        spec = DENOISERS[job["model"]]
        model = build_denoiser(spec, int(job["seed"]))
        if _fingerprint(model) != job["fingerprint"]:
            raise RuntimeError("the child built different weights than the benchmark process")
        inputs = denoiser_inputs(spec, job["latent"], job["batch"], EVAL_TIMESTEP, job["seed"] + EVAL_SEED_OFFSET)
        names, tensors, constants = _flatten_tensors(inputs)
        wrapper = _PositionalDenoiser(model, names, constants).eval()
        folder = Path(job["folder"])
        calibration = [
            _flatten_tensors(denoiser_inputs(spec, job["latent"], job["batch"], t, job["seed"] + 1 + i))[1]
            for i, t in enumerate(calibration_timesteps(int(job["calibration"])))
        ]
        # The TorchScript exporter first: quantize_static rejects the dynamo exporter's UNet graph ("quantization
        # parameter shared mode is not supported for weight"); the dynamo one is the fallback.
        errors = []
        for exporter in ("torchscript", "dynamo"):
            fp32_path, q_path = folder / f"fp32-{exporter}.onnx", folder / f"int8-{exporter}.onnx"
            try:
                start = time.perf_counter()
                _export_onnx(wrapper, tuple(tensors), names, fp32_path, dynamo=exporter == "dynamo")
                export_s = time.perf_counter() - start
                start = time.perf_counter()
                _quantize_onnx(fp32_path, q_path, names, calibration)
                result.update(exporter=exporter, export_s=export_s, quantize_s=time.perf_counter() - start)
                break
            except Exception as error:  # try the other exporter, then give both reasons
                errors.append(f"{exporter} export: {_one_line(error)}")
            finally:
                for file in folder.iterdir():
                    if file.name.startswith(f"fp32-{exporter}.onnx"):
                        file.unlink()
        else:
            raise RuntimeError("; ".join(errors))
        result.update(status="ok", model_path=str(q_path))
    except Exception as error:  # reported as the row's reason
        result["reason"] = _one_line(error)
    result["peak_rss_bytes"] = _hwm() or _rss()
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def _export_onnx(wrapper: nn.Module, tensors: tuple[Tensor, ...], names: list[str], path: Path, dynamo: bool) -> None:
    """torch.onnx.export to ``path`` (weights in external data once the model passes 2 GB)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tensors, str(path), input_names=names, output_names=["out"], dynamo=dynamo, external_data=True
        )


def _quantize_onnx(fp32_path: Path, q_path: Path, names: list[str], calibration: list[list[Tensor]]) -> None:
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{n: t.numpy() for n, t in zip(names, ts, strict=True)} for ts in calibration])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(fp32_path),
        str(q_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
    )


def _fingerprint(model: nn.Module) -> float:
    """Sum of all weights in float64: the same seed must give the same number in every process."""
    with torch.no_grad():
        return float(sum(p.sum(dtype=torch.float64) for p in model.parameters()))


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class _Member:
    """A live row of the current group: how to call it and what its row says so far."""

    method: MethodSpec
    call: Callable[[], Tensor]
    row: dict[str, Any]
    times: list[float] = field(default_factory=list)
    recompiled: int = 0  # timed rounds in which dynamo compiled something


class _CaseRunner:
    """Measures one (model, latent) case; see the module docstring for the procedure."""

    def __init__(self, spec: DenoiserSpec, latent: int, settings: BenchSettings, available, log, clock, base: int):
        self.spec, self.latent, self.settings = spec, latent, settings
        self.process_base = base  # RSS of the process before its first case: the base of every peak figure
        self.available = available  # method -> (importable, reason)
        self.log = log
        self.clock = clock
        self.rows: dict[str, dict[str, Any]] = {}
        self.group: list[_Member] = []
        self.group_index = 0
        self.builds: list[_Built] = []  # alive in the current group
        self.anchor_times: dict[int, list[float]] = {}
        self.notes: list[str] = []

    # -- rows
    def _row(self, name: str, **values) -> dict[str, Any]:
        method = METHODS[name]
        row = self.rows.setdefault(
            name,
            {
                "model": self.spec.name,
                "latent": self.latent,
                "latent_shape": tuple(self.shape),
                "batch": self.settings.batch,
                "method": name,
                "label": method.label,
                "kind": method.kind,
                "compiled": method.compiled,
                "status": "ok",
                "notes": [],
            },
        )
        row.update(values)
        return row

    def _fail(self, names: Sequence[str], status: str, reason: str) -> None:
        for name in names:
            self._row(name, status=status, reason=reason)
        self.log(f"  {', '.join(names)}: {status}: {reason}")

    # -- the case
    def run(self) -> tuple[list[BenchRow], dict[str, Any]]:
        s = self.settings
        self.shape = [s.batch, int(self.spec.config["in_channels"]), self.latent, self.latent]
        builds = [b for b in dict.fromkeys(METHODS[m].build for m in s.methods)]
        self.base_rss = _settled_rss()
        budget = s.memory_budget_bytes or int(0.85 * (psutil.virtual_memory().available + self.base_rss))
        case: dict[str, Any] = {"model": self.spec.name, "latent": self.latent, "budget_bytes": budget}
        threads = torch.get_num_threads()
        # ONNX Runtime first: its child peaks at several times the model, so it runs before anything is held.
        self.workdir = tempfile.TemporaryDirectory(prefix="quantdiff-bench-")
        try:
            ort_model = self._prepare_ort(threads) if "ort" in builds else None
            with _PeakWatch() as watch:
                start = time.perf_counter()
                reference = build_denoiser(self.spec, s.seed)
                build_s = time.perf_counter() - start
                inputs = denoiser_inputs(self.spec, self.latent, s.batch, EVAL_TIMESTEP, s.seed + EVAL_SEED_OFFSET)
                start = time.perf_counter()
                y_ref = _call(reference, inputs)
                first_s = time.perf_counter() - start
            fp32_bytes = weight_bytes(reference)
            self.fp32_bytes = fp32_bytes
            self.fp32_held = _settled_rss() - self.base_rss
            params = sum(p.numel() for p in reference.parameters())
            linear = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.Linear))
            self.linear_share = linear / max(1, params)
            with _PeakWatch() as step:
                _call(reference, inputs)
            self._row(
                "fp32",
                weight_bytes=fp32_bytes,
                weight_ratio_vs_fp32=1.0,
                held_bytes=self.fp32_held,
                peak_rss_bytes=self.process_base + self.fp32_held + step.extra,
                setup_peak_rss_bytes=self.process_base + watch.extra,
                step_peak_extra_bytes=step.extra,
                setup_s=build_s,
                first_call_s=first_s,
                one_time_s=build_s + first_s,
                sqnr_db=math.inf,
                identical_to_fp32=True,
                path="fp32",
                path_detail="eager fp32 (ATen / oneDNN fp32 kernels)",
            )
            self.log(
                f"[{self.clock():7.1f}s] {self.spec.name} {self.latent}x{self.latent}: fp32 built ({params / 1e6:.0f}M "
                f"parameters, {fp32_bytes / 2**20:.0f} MiB) in {build_s:.1f} s, one step {first_s:.2f} s"
            )
            calibration = bench_calibration(self.spec, reference, self.latent, s.batch, s.calibration_inputs, s.seed)
            ctx = _Context(self.spec, reference, inputs, calibration, threads, ort_model)
            self.reference, self.inputs, self.y_ref = reference, inputs, y_ref
            self.anchor = _Member(METHODS["fp32"], lambda: _call(reference, inputs), self.rows["fp32"])
            for build in builds:
                self._add_build(build, ctx, budget)
            if self.group or self.group_index == 0:
                self._flush()
            y_again = _call(reference, inputs)
            if not torch.equal(y_again, y_ref):
                self.notes.append(
                    f"fp32 eager output changed during the run ({sqnr_db(y_ref, y_again):.1f} dB vs its first call): "
                    "a method modified shared weights, or the kernels are not deterministic"
                )
            case.update(
                fp32_weight_bytes=fp32_bytes,
                parameters=params,
                linear_share=self.linear_share,
                base_rss_bytes=self.process_base,
                case_start_rss_bytes=self.base_rss,
                groups=self.group_index,
                calibration=len(calibration),
                notes=self.notes,
            )
        finally:
            self.group, self.builds = [], []
            self.reference = self.inputs = self.anchor = None
            torch._dynamo.reset()
            self.workdir.cleanup()
            _settled_rss()
        return self._finish(), case

    def _prepare_ort(self, threads: int) -> Path | None:
        names = [m for m in self.settings.methods if METHODS[m].build == "ort"]
        ok, reason = self.available["ort"]
        if not ok:
            self._fail(names, "not installed" if "not installed" in reason else "failed", reason)
            return None
        params = _param_count(self.spec)
        need = _ORT_CHILD_FACTOR * 4 * params
        available = psutil.virtual_memory().available
        if need > available:
            self._fail(
                names,
                "skipped",
                f"ONNX export + quantize_static need about {need / 2**30:.0f} GiB ({_ORT_CHILD_FACTOR:.0f}x the fp32 "
                f"weights); {available / 2**30:.0f} GiB available",
            )
            return None
        reference = build_denoiser(self.spec, self.settings.seed)
        fingerprint = _fingerprint(reference)
        del reference
        _settled_rss()
        folder = Path(self.workdir.name)
        job = {
            "model": self.spec.name,
            "latent": self.latent,
            "batch": self.settings.batch,
            "seed": self.settings.seed,
            "calibration": self.settings.calibration_inputs,
            "threads": threads,
            "fingerprint": fingerprint,
            "folder": str(folder),
            "result": str(folder / "result.json"),
        }
        (folder / "job.json").write_text(json.dumps(job))
        self.log(f"[{self.clock():7.1f}s]   ort-qdq: exporting and quantizing in a child process")
        code = "import sys; from quantdiff.bench import _ort_child; sys.exit(_ort_child(sys.argv[1]))"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, str(folder / "job.json")], capture_output=True, text=True)
        child_s = time.perf_counter() - start
        result_file = folder / "result.json"
        if not result_file.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()
            self._fail(names, "failed", f"ONNX child exited with {done.returncode}: {tail[-1] if tail else ''}"[:300])
            return None
        result = json.loads(result_file.read_text())
        for name in names:
            self._row(name, setup_peak_rss_bytes=result.get("peak_rss_bytes"))
        if result["status"] != "ok":
            self._fail(names, "failed", result["reason"])
            return None
        self.ort_setup_s = child_s
        for name in names:
            self._row(name).setdefault("notes", []).append(
                f"{result['exporter']} ONNX export {result['export_s']:.1f} s, "
                f"quantize_static {result['quantize_s']:.1f} s "
                "(in a child process; setup peak is the child's)"
            )
        return Path(result["model_path"])

    # -- builds and groups
    def _add_build(self, build: str, ctx: _Context, budget: int) -> None:
        s = self.settings
        names = [m for m in s.methods if METHODS[m].build == build and m != "fp32"]
        if not names or all(self.rows.get(n, {}).get("status", "ok") != "ok" for n in names):
            return
        for module in {r for n in names for r in METHODS[n].requires}:
            ok, reason = _import_optional(module)
            if not ok:
                self._fail(names, "not installed" if "not installed" in reason else "failed", reason)
                return
        held, transient, compile_extra = (_estimate(v, self.linear_share) for v in _MEMORY[build])
        wants_compile = any(METHODS[n].compiled for n in names)
        need = (held + transient + (compile_extra if wants_compile else 0.0)) * self.fp32_bytes
        group_full = s.group_size is not None and len(self.group) + len(names) > s.group_size
        if self.group and (group_full or _settled_rss() + need > budget):
            self._flush()
        freezing = s.freezing
        if _settled_rss() + need > budget:
            if build == "fp32" and freezing and _settled_rss() + 0.2 * self.fp32_bytes <= budget:
                freezing = False  # compile without freezing: no second weight copy
                self._row("fp32-compile")["notes"].append(
                    "compiled without freezing: the frozen weight copy would not fit in the memory budget"
                )
            else:
                self._fail(
                    names,
                    "skipped",
                    f"needs about {need / 2**30:.1f} GiB more; budget {budget / 2**30:.1f} GiB, "
                    f"{_settled_rss() / 2**30:.1f} GiB held (set a larger --memory-budget or fewer methods)",
                )
                return
        self.log(f"[{self.clock():7.1f}s]   {build}: building")
        if build == "fp32":
            built = _Built(call=None, module=self.reference, path="fp32", weight_bytes=self.fp32_bytes)
            built.start_rss = built.setup_peak = _settled_rss()
        else:
            built = self._build(build, ctx, names)
            if built is None:
                return
        self.builds.append(built)
        for name in names:
            if METHODS[name].compiled:
                self._add_compiled(name, built, freezing)
            elif built.call is not None:
                self._add_eager(name, built)

    def _build(self, build: str, ctx: _Context, names: list[str]) -> _Built | None:
        changes: dict[str, Any] = {}
        try:
            with _PeakWatch() as watch, _record_inductor_changes(changes):
                start = time.perf_counter()
                built = _BUILDERS[build](ctx)
                built.setup_s = (
                    time.perf_counter() - start + (getattr(self, "ort_setup_s", 0.0) if build == "ort" else 0)
                )
            built.inductor_changes = changes
            built.start_rss, built.setup_peak = watch.start, watch.peak
            built.held = max(0, _settled_rss() - watch.start)
            if built.weight_bytes is None and built.module is not None:
                built.weight_bytes = weight_bytes(built.module)
        except Exception as error:
            self._fail(names, "failed", _one_line(error))
            _settled_rss()
            return None
        return built

    def _common(self, built: _Built) -> dict[str, Any]:
        return {
            "path": built.path,
            "path_detail": built.path_detail,
            "stored_bytes": built.stored_bytes,
            "kernel_bytes": built.kernel_bytes,
            "weight_bytes": built.weight_bytes,
            "weight_ratio_vs_fp32": None if built.weight_bytes is None else built.weight_bytes / self.fp32_bytes,
            "setup_s": built.setup_s,
            **built.counts,
        }

    @staticmethod
    def _first_calls(call: Callable[[], Tensor]) -> tuple[Tensor, float, _PeakWatch, int]:
        """(output, first-call seconds, the first call's watch, the second call's transient bytes)."""
        with _PeakWatch() as first:
            start = time.perf_counter()
            output = call()
            seconds = time.perf_counter() - start
        with _PeakWatch() as step:
            call()
        return output, seconds, first, step.extra

    def _add_eager(self, name: str, built: _Built) -> None:
        row = self._row(name, **self._common(built))
        row["notes"] += built.notes
        try:
            output, seconds, first, step_extra = self._first_calls(built.call)
        except Exception as error:
            self._fail([name], "failed", _one_line(error))
            return
        built.held += max(0, _settled_rss() - first.start)
        built.setup_peak = max(built.setup_peak, first.peak)
        self._finish_first(name, row, output, seconds, built.held, built.setup_peak - built.start_rss, step_extra)
        self.group.append(_Member(METHODS[name], built.call, row))

    def _add_compiled(self, name: str, built: _Built, freezing: bool) -> None:
        row = self._row(name, **self._common(built))
        row["notes"] += built.notes
        if built.module is None:
            self._fail([name], "failed", "this method has no module to compile")
            return
        compiled = torch.compile(built.module, dynamic=False)  # static shapes, as a first compile would be
        inputs = self.inputs
        config = _inductor_config()
        settings = {**built.inductor_changes, "freezing": freezing, "fx_graph_cache": False}

        def call() -> Tensor:
            # Every call under the compile settings: models with graph breaks (diffusers' SD3) share resume
            # frames, and a guard failure on one of them recompiles in the middle of the timing rounds; that
            # compile must be the same kind (frozen, static), or qlinear's lowering fails without freezing.
            with config.patch(settings), _dynamo_settings():
                return _call(compiled, inputs)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inductor's own UserWarnings, one per lowered layer
                output, seconds, first, step_extra = self._first_calls(call)
        except Exception as error:
            # no dynamo reset here: it would drop the compiled code of the group's other members
            hint = "" if freezing else " (inductor's int8 linear lowering wants freezing: drop --no-freezing)"
            self._fail([name], "failed", f"torch.compile: {_one_line(error)}{hint}")
            return
        added = max(0, _settled_rss() - first.start)
        row["compile_added_bytes"] = added
        how = "inductor with freezing" if freezing else "inductor without freezing"
        if built.path == "fp32":
            row["path"], row["path_detail"] = "inductor", f"{how}, fp32"
        else:
            row["path_detail"] = f"{row['path_detail']}; {how}" if row["path_detail"] else how
        setup_extra = max(built.setup_peak, first.peak) - built.start_rss
        self._finish_first(name, row, output, seconds, built.held + added, setup_extra, step_extra)
        self.group.append(_Member(METHODS[name], call, row))

    def _finish_first(self, name, row, output, first, held, setup_extra, step_extra) -> None:
        try:
            sqnr = sqnr_db(self.y_ref, output.float())
        except ValueError as error:
            sqnr, row["reason"] = None, f"output not comparable: {error}"
        row.update(
            first_call_s=first,
            one_time_s=(row.get("setup_s") or 0.0) + first,
            sqnr_db=sqnr,
            identical_to_fp32=sqnr == math.inf,
            held_bytes=held,
            peak_rss_bytes=self.process_base + held + step_extra,
            setup_peak_rss_bytes=row.get("setup_peak_rss_bytes") or (self.process_base + self.fp32_held + setup_extra),
            step_peak_extra_bytes=step_extra,
        )
        quality = "n/a" if sqnr is None else f"{sqnr:.1f} dB"
        self.log(
            f"[{self.clock():7.1f}s]   {name}: setup {row.get('setup_s') or 0:.1f} s, first call {first:.2f} s, "
            f"SQNR {quality}, path {row.get('path')}"
        )

    def _flush(self) -> None:
        """Time the current group in interleaved, randomly ordered rounds (fp32 eager in each), then free it."""
        s = self.settings
        index = self.group_index
        members = [self.anchor, *self.group]
        rng = random.Random(s.seed * 1_000_003 + index * 7919 + self.latent)
        anchor_times = self.anchor_times.setdefault(index, [])
        order = list(members)
        gc.collect()
        for round_index in range(s.warmup + s.repeats):
            rng.shuffle(order)
            for member in order:
                if member.row.get("status") != "ok":
                    continue
                graphs = _compiled_graphs()
                try:
                    start = time.perf_counter()
                    member.call()
                    elapsed = time.perf_counter() - start
                except Exception as error:
                    self._fail([member.method.name], "failed", _one_line(error))
                    continue
                if round_index >= s.warmup:
                    (anchor_times if member is self.anchor else member.times).append(elapsed)
                    if _compiled_graphs() > graphs:
                        member.recompiled += 1
        for member in self.group:
            member.row["group"] = index
            member.row["times_s"] = tuple(member.times)
            if member.recompiled:
                member.row["notes"].append(
                    f"dynamo recompiled during {member.recompiled} of the {s.repeats} timed rounds (a guard of a "
                    "frame shared with another model failed); those rounds include compile time"
                )
        self.log(
            f"[{self.clock():7.1f}s]   group {index}: timed {len(members)} methods x {s.repeats} rounds "
            f"({', '.join(m.method.name for m in members)})"
        )
        compiled = any(m.method.compiled for m in self.group)
        member = None
        members.clear()
        order.clear()
        self.group, self.builds = [], []  # the last references to the group's models
        self.group_index += 1
        if compiled:
            torch._dynamo.reset()  # nothing compiled outlives its group; frees the caches
        _settled_rss()

    # -- the rows, with ratios anchored to fp32 eager of each row's group
    def _finish(self) -> list[BenchRow]:
        anchor_all = [t for times in self.anchor_times.values() for t in times]
        if "fp32" in self.rows and anchor_all:
            self.rows["fp32"].update(
                median_s=statistics.median(anchor_all),
                min_s=min(anchor_all),
                times_s=tuple(anchor_all),
                fp32_median_s=statistics.median(anchor_all),
                speedup_vs_fp32=1.0,
            )
        for row in self.rows.values():
            times = row.get("times_s") or ()
            if row["method"] == "fp32" or not times or row["status"] != "ok":
                continue
            anchor = self.anchor_times.get(row.get("group"), [])
            row["median_s"], row["min_s"] = statistics.median(times), min(times)
            if anchor:
                row["fp32_median_s"] = statistics.median(anchor)
                row["speedup_vs_fp32"] = row["fp32_median_s"] / row["median_s"]
        compiled = self.rows.get("fp32-compile", {})
        compiled_speedup = compiled.get("speedup_vs_fp32") if compiled.get("status") == "ok" else None
        best = max(1.0, compiled_speedup or 1.0)
        for row in self.rows.values():
            if row.get("speedup_vs_fp32") is not None:
                row["speedup_vs_best_fp32"] = row["speedup_vs_fp32"] / best
                row["best_fp32"] = "fp32-compile" if best > 1.0 else "fp32"
        out = []
        for name in self.settings.methods:
            if name not in self.rows:
                continue
            row = dict(self.rows[name])
            row["notes"] = tuple(dict.fromkeys(row.get("notes") or ()))
            row["latent_shape"] = tuple(self.shape)
            if row["status"] == "ok" and row.get("median_s") is None:
                row["status"], row["reason"] = "failed", row.get("reason") or "not timed"
            out.append(BenchRow(**{k: v for k, v in row.items() if k in BenchRow.__dataclass_fields__}))
        return out


def _failed_row(spec: DenoiserSpec, latent: int, settings: BenchSettings, name: str, reason: str) -> BenchRow:
    method = METHODS[name]
    shape = (settings.batch, int(spec.config["in_channels"]), latent, latent)
    return BenchRow(
        spec.name, latent, shape, settings.batch, name, method.label, method.kind, method.compiled, "failed", reason
    )


def _param_count(spec: DenoiserSpec) -> int:
    """Parameters of ``spec``'s denoiser, counted on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, spec.class_name).from_config(dict(spec.config))
    return sum(p.numel() for p in model.parameters())


def _warm_up(settings: BenchSettings) -> None:
    """Load the libraries and run one tiny denoiser of each class once, so that one-time process costs
    (imports, kernel and thread-pool initialisation) land before the first case measures its base RSS."""
    for class_name in dict.fromkeys(DENOISERS[m].class_name for m in settings.models):
        tiny = next(
            spec for spec in DENOISERS.values() if spec.class_name == class_name and spec.name.startswith("tiny")
        )
        with torch.no_grad():
            _call(build_denoiser(tiny), denoiser_inputs(tiny, TINY_LATENT, 1, EVAL_TIMESTEP, 0))
    gc.collect()


def run_benchmark(
    settings: BenchSettings,
    *,
    log: Callable[[str], None] | None = None,
    command: str = "",
    on_case: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Measure every (model, latent, method) of ``settings``; see the module docstring for what and how.

    Args:
        settings: from :func:`make_settings`.
        log: receives one progress line at a time (``None``: silent).
        command: the command line, recorded in the result.
        on_case: called after each (model, latent) case with the result so far (``complete`` False until the
            last one), e.g. to write the files as a multi-hour run goes, so that nothing measured is lost.
    """
    log = log or (lambda _line: None)
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    started = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    rows: list[BenchRow] = []
    cases: list[Mapping[str, Any]] = []

    def result(complete: bool) -> BenchResult:
        return BenchResult(
            settings=settings,
            machine=machine,
            rows=tuple(rows),
            cases=tuple(cases),
            started=started,
            duration_s=clock(),
            load_average_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
            command=command,
            complete=complete,
        )

    total = sum(len(settings.latents[model]) for model in settings.models)
    try:
        _warm_up(settings)
        machine = machine_info()
        # The optional packages are imported once, before the base RSS is read, so that no row pays for them.
        available = {}
        for name in settings.methods:
            method = METHODS[name]
            reasons = [reason for ok, reason in (_import_optional(m) for m in method.requires) if not ok]
            available[method.build] = (not reasons, "; ".join(reasons))
        base = _settled_rss()
        with torch.no_grad():
            for model in settings.models:
                spec = DENOISERS[model]
                for latent in settings.latents[model]:
                    log(f"[{clock():7.1f}s] {spec.title}, latent {latent}x{latent}, batch {settings.batch}")
                    try:
                        case_rows, case = _CaseRunner(spec, latent, settings, available, log, clock, base).run()
                    except Exception as error:  # e.g. the fp32 model does not fit: the other cases still run
                        reason = f"the case failed: {_one_line(error)}"
                        log(f"  {reason}")
                        case_rows = [_failed_row(spec, latent, settings, name, reason) for name in settings.methods]
                        case = {"model": model, "latent": latent, "error": reason}
                    rows.extend(case_rows)
                    cases.append(MappingProxyType(case))
                    if on_case is not None and len(cases) < total:
                        on_case(result(complete=False))
    finally:
        torch.set_num_threads(threads_before)
    return result(complete=True)


# -------------------------------------------------------------------------------------------------- output
def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _speed(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _db(row: BenchRow) -> str:
    if row.identical_to_fp32:
        return "identical"
    return "" if row.sqnr_db is None else f"{row.sqnr_db:.1f}"


def _case_table(rows: Sequence[BenchRow]) -> list[str]:
    lines = [
        "| method | status | path | s / step (median) | vs fp32 eager | vs best fp32 | weights MiB (x fp32) "
        "| held MiB | peak RSS MiB | SQNR dB | one-time s (setup + first call) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        weights = _mib(r.weight_bytes) + ("" if r.weight_ratio_vs_fp32 is None else f" ({r.weight_ratio_vs_fp32:.2f}x)")
        one_time = (
            "" if r.one_time_s is None else f"{r.one_time_s:.1f} ({r.setup_s or 0:.1f} + {r.first_call_s or 0:.1f})"
        )
        median = "" if r.median_s is None else f"{r.median_s:.3f}"
        lines.append(
            f"| {r.method} | {r.status} | {r.path or ''} | {median} | {_speed(r.speedup_vs_fp32)} "
            f"| {_speed(r.speedup_vs_best_fp32)} | {weights} | {_mib(r.held_bytes)} | {_mib(r.peak_rss_bytes)} "
            f"| {_db(r)} | {one_time} |"
        )
    return lines


def _cases(result: BenchResult) -> Iterator[tuple[str, int, list[BenchRow], Mapping[str, Any]]]:
    infos = {(c["model"], c["latent"]): c for c in result.cases}
    keys = list(dict.fromkeys((r.model, r.latent) for r in result.rows))
    for model, latent in keys:
        yield (
            model,
            latent,
            [r for r in result.rows if (r.model, r.latent) == (model, latent)],
            infos.get((model, latent), {}),
        )


def _case_title(model: str, latent: int, batch: int) -> str:
    spec = DENOISERS[model]
    pixels = f" ({latent * 8} px)" if not model.startswith("tiny") else ""
    return f"{spec.title}, latent {latent}x{latent}{pixels}, batch {batch}"


def format_table(result: BenchResult) -> str:
    """The result tables as text (markdown tables, one per model and latent size) plus failure reasons."""
    lines = []
    for model, latent, rows, _ in _cases(result):
        lines += ["", f"{_case_title(model, latent, result.settings.batch)}", *_case_table(rows)]
        lines += [f"  {r.method}: {r.status}: {r.reason}" for r in rows if r.status != "ok"]
    return "\n".join(lines).lstrip("\n")


def _targets(result: BenchResult) -> list[str]:
    """Issue 4's targets against what this run measured (only those it has data for)."""
    lines = []
    goals = {("sd15", 64): 1.5, ("sd15", 32): 1.8, ("sd3", 64): 1.6}
    for model, latent, rows, _ in _cases(result):
        by = {r.method: r for r in rows if r.status == "ok"}
        ours = [by[m] for m in ("qd-w8a8", "qd-w8a8-compile") if m in by and by[m].speedup_vs_best_fp32]
        if not ours:
            continue
        best = max(ours, key=lambda r: r.speedup_vs_best_fp32)
        goal = goals.get((model, latent))
        verdict = (
            "" if goal is None else f" (target >= {goal}x: {'met' if best.speedup_vs_best_fp32 >= goal else 'NOT met'})"
        )
        lines.append(
            f"- {model} {latent}x{latent}: best quantdiff W8A8 = {best.method}, "
            f"{best.speedup_vs_best_fp32:.2f}x vs the "
            f"faster fp32 baseline ({best.best_fp32}){verdict}; SQNR {_db(best)} dB"
        )
        faster = [
            f"{r.method} {r.speedup_vs_fp32:.2f}x"
            for r in rows
            if r.kind == "peer" and r.status == "ok" and r.speedup_vs_fp32 and r.speedup_vs_fp32 > best.speedup_vs_fp32
        ]
        lines.append(
            "  - peers faster than it: "
            + (", ".join(faster) if faster else "none")
            + (f" (it: {best.speedup_vs_fp32:.2f}x vs fp32 eager)")
        )
        pt2e = by.get("pt2e-compile")
        if pt2e is not None and pt2e.sqnr_db is not None:
            lines.append(
                f"  - SQNR vs PT2E default: {_db(best)} dB vs {_db(pt2e)} dB at {best.speedup_vs_fp32:.2f}x vs "
                f"{pt2e.speedup_vs_fp32:.2f}x"
            )
        w8 = by.get("qd-w8a8")
        if w8 is not None and w8.weight_ratio_vs_fp32 is not None:
            lines.append(
                f"  - W8 weights in memory (target <= 0.26x): {w8.weight_ratio_vs_fp32:.3f}x of fp32 in integer mode "
                f"(oneDNN's packed int8 copy in place of weight_q, plus the fp32 layers the plan keeps, biases, norms)"
            )
        w4 = by.get("qd-w4a8")
        if w4 is not None and w4.weight_ratio_vs_fp32 is not None:
            lines.append(
                f"  - W4A8 weights in memory (target <= 0.15x): {w4.weight_ratio_vs_fp32:.3f}x of fp32 "
                f"(packed int4 + the fp32 layers the plan keeps; path {w4.path})"
            )
    return lines


def render_markdown(result: BenchResult) -> str:
    """``RESULTS.md``: machine, settings, one table per case, notes, targets and how it was measured."""
    s = result.settings
    when = result.started.replace("T", " ").replace("+00:00", " UTC")
    lines = [
        "# quantdiff bench results",
        "",
        f"Written by `{result.command or 'quantdiff bench'}` on {when}, in {result.duration_s / 60:.1f} min "
        f"({'quick' if s.quick else 'full'} preset)"
        + ("" if result.complete else "; PARTIAL: the run was still going when this was written")
        + ". Regenerate with the same command; `--json FILE` writes the rows "
        "(schema: `quantdiff.bench` module docstring).",
        "",
        "## Machine",
        "",
        *result.machine.describe(),
        f"- load average at end {result.load_average_end:.2f}",
        "",
        "## Settings",
        "",
        "- models and latent sizes: "
        + "; ".join(f"{m} at {', '.join(f'{x}x{x}' for x in s.latents[m])}" for m in s.models),
        f"- batch {s.batch}"
        + (
            " (one latent: no classifier-free guidance doubling)"
            if s.batch == 1
            else " (e.g. classifier-free guidance)"
        ),
        f"- methods: {', '.join(s.methods)}",
        f"- timing: {s.warmup} warm-up + {s.repeats} timed rounds per group; every round calls each live method once "
        "(fp32 eager included) in a fresh random order; median reported",
        f"- calibration (quantdiff and PT2E, the same inputs): {s.calibration_inputs} Gaussian latents at timesteps "
        + ", ".join(f"{t:.0f}" for t in calibration_timesteps(s.calibration_inputs))
        + " with Gaussian text embeddings of the real shapes (SD1.5 77x768; SDXL 77x2048 + pooled 1280 + size ids; "
        "SD3 333x4096 + pooled 2048)",
        f"- evaluation input (timing and SQNR): another Gaussian input at timestep {EVAL_TIMESTEP:.0f}",
        f"- weights: random, seed {s.seed}: Linear/Conv2d N(0, 1/fan_in), norms 1/0, other N(0, 0.02)",
        f"- compile: inductor, freezing {'on' if s.freezing else 'off'}, cold FX graph cache; threads "
        f"{result.machine.threads}",
        "",
        "## Results",
    ]
    for model, latent, rows, case in _cases(result):
        lines += ["", f"### {_case_title(model, latent, s.batch)}", ""]
        if case:
            lines.append(
                f"fp32 weights {_mib(case.get('fp32_weight_bytes'))} MiB ({case.get('parameters', 0) / 1e6:.0f}M "
                f"parameters, {case.get('linear_share', 0) * 100:.0f}% in Linear); {case.get('groups')} timing "
                f"group(s); process base RSS {_mib(case.get('base_rss_bytes'))} MiB; memory budget "
                f"{_mib(case.get('budget_bytes'))} MiB."
            )
            lines.append("")
        lines += _case_table(rows)
        notes = []
        for r in rows:
            if r.status != "ok":
                notes.append(f"- **{r.method}**: {r.status}: {r.reason}")
            elif r.path_detail and r.kind != "fp32":
                notes.append(f"- {r.method}: {r.path_detail}")
            for note in r.notes:
                if r.status == "ok" and "oneDNN int8 kernels, CPU" not in note:
                    notes.append(f"  - {r.method}: {note}")
        notes += [f"- {note}" for note in case.get("notes", ())]
        if notes:
            lines += ["", *notes]
    targets = _targets(result)
    if targets:
        lines += ["", "## Targets (issue 4)", "", *targets]
    lines += [
        "",
        "## How it is measured",
        "",
        "- One process. Each method is built from the fp32 model (converted copies share its fp32 tensors, so no "
        "second fp32 copy is made) and kept alive in a group; a group is timed when the next method would not fit "
        "the memory budget, then freed. `vs fp32 eager` = fp32 eager median in the same group / the method's "
        "median; `vs best fp32` divides by fp32-compile's own speedup when compiling helped.",
        "- weights: tensor bytes the method holds (prepacked kernel copies included: quantdiff's integer mode "
        "holds oneDNN's packed copy in place of `weight_q`; fp32 layers a method does not quantize count too). held: RSS the "
        "method added when built, after gc + malloc_trim, including what torch.compile added (frozen weight copies, "
        "code). peak RSS: process base + held + the step's measured transient, i.e. a process holding only this "
        "method. one-time: setup (quantize, calibrate, export, convert) + first call (compile included).",
        "- SQNR: the method's output vs fp32 eager on the evaluation input; random weights make this a relative "
        "figure (trained models: `quantdiff eval`).",
        "- `path`: quantdiff rows from `use_integer_kernels`' ExecutionSummary: `integer` (every quantized layer on "
        "the oneDNN int8 kernel), `reference` (fake-quant path: per-group or weight-only layers have no int8 "
        "kernel), `mixed`; widened int4 layers are listed.",
    ]
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, path: str | os.PathLike) -> Path:
    """Write :func:`render_markdown` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(result))
    return path


def write_json(result: BenchResult, path: str | os.PathLike) -> Path:
    """Write the result as JSON (schema in the module docstring); infinities become ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    return path
