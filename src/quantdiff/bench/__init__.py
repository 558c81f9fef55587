"""``quantdiff bench``: one denoiser step, fp32 vs quantdiff's integer and reference paths vs the int8 tools a
user would pick instead, measured side by side in one process; on a GPU, bf16 vs quantdiff W8A8 (see GPU).

Why: research PTQ code quantizes "in simulation" and gets no faster; quantdiff claims integer kernels and
integer weights (issue 4). This module proves or refutes that on the machine it runs on, against the
baseline that matters (the faster of fp32 eager and fp32 ``torch.compile``) and against every peer, with
the memory and the one-time costs a user pays. Real-size denoisers are built from their published configs
with random weights: speed and memory depend only on shapes, so nothing is downloaded.

Rows. One row per (model, latent size, method). Methods of the CPU suite (:data:`METHODS`; the GPU's: see GPU):

* ``fp32`` / ``fp32-compile``: the baselines. ``fp32`` always runs: it is the reference output (SQNR), the
  source every other method is built from, and the anchor of every timing round.
* ``bf16`` (+ ``-compile``): the whole model in bf16, on CPUs that compute bf16 natively (AMX-BF16 /
  AVX512-BF16; elsewhere ``skipped``: emulated bf16 is tens of times slower than fp32). Not a target
  baseline, but what a user of such a CPU would try first, so it is listed among the peers.
* ``qd-w8a8`` (+ ``-compile``): static int8 weights and activations in integer mode
  (``quantdiff.nn.use_integer_kernels``): oneDNN int8 conv/linear, with the preset this CPU's kernels
  compute exactly (``w8a8``; ``w8a8-int``, pair-safe weights, where they saturate: AVX2 without VNNI),
  and attention's SDPA in bf16 where the CPU computes bf16 natively (``quantdiff.nn.attention``).
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
  (ONNX Runtime static int8 QDQ, u8 activations, s8 per-channel weights), ``openvino-fp32`` /
  ``openvino-bf16`` / ``openvino-int8`` (``openvino.convert_model`` on the CPU plugin; int8: NNCF
  ``nncf.quantize`` calibrated on the same inputs as quantdiff), ``sdnq-w8a8`` / ``sdnq-w4`` (SD.Next's
  sdnq: int8 weights with its int8 matmul, uint4 weights dequantized per call).

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
makes fp32 and PT2E fast on CPU), the FX-graph cache off and a new inductor kernel cache for each case, so
``first_call_s`` is a user's first compile.
A method slower than ``slow_cutoff`` x fp32 eager in its first timed round is timed in that round only (its
row's notes say so): at real sizes such a peer costs minutes per round and more rounds would not change its
place.

Parts. The full preset takes hours on a small CPU. ``run_benchmark(previous=...)`` (CLI: ``--resume`` with
``--json FILE``) keeps the finished cases of an earlier result with the same settings on the same machine and
software, and measures only the others; each case is still measured within one process, and its entry in
``cases`` records when (``started``, ``load_average_start``, ``run_started``, ``command``).

Memory (one process, Linux). Every reading follows ``gc.collect()`` + ``malloc_trim``; peaks come from
VmHWM, reset through ``/proc/self/clear_refs`` (or a 2 ms RSS sampler where that is refused):

* ``weight_bytes``: weight tensors the method holds, counted tensor by tensor: parameters, buffers,
  tensor attributes, the inner tensors of tensor subclasses (torchao, quanto), torch.ao packed weights,
  and quantdiff's prepacked kernel copies (integer mode releases ``weight_q`` to the packed copy, so a W8
  layer holds 1 byte per weight); fp32 layers a method leaves unquantized count too. ``ort-qdq``: the quantized ONNX
  model's bytes; ``openvino-*``: the OpenVINO model's constants (fp32 ones at 2 bytes where it runs in bf16). What ``torch.compile`` adds (frozen / prepacked weight copies plus generated code) cannot
  be split by tensor; it is measured as RSS and reported as ``compile_added_bytes``.
* ``held_bytes``: RSS the method added when it was built (after its first calls, settled), including
  ``compile_added_bytes``; for ``fp32`` the model itself.
* ``peak_rss_bytes``: the peak RSS of a process that holds only this method while it runs one step:
  the process's RSS before its first case (libraries loaded, no model: the cases' ``base_rss_bytes``) +
  ``held_bytes`` + the step's own transient peak (activations, workspaces), each measured here. A run of
  several cases measures each in its own child process (``cases[].pid``): compiling with freezing leaves
  the frozen weights held by torch's C++ side after the group is freed, so later groups of the same case
  start higher (deltas keep that out of their rows; the memory budget sees it), but later cases do not.
* ``setup_peak_rss_bytes``: peak RSS while building it: base + the fp32 model it is built from (kept) + the
  build's measured peak. ``ort-qdq``: the measured peak of the child process that exports and quantizes.

One-time cost: ``setup_s`` (quantize / calibrate / export / convert / prepack, before the first call) and
``first_call_s`` (compile included); ``one_time_s`` is their sum.

JSON (:func:`write_json`): ``{"format": "quantdiff-bench", "version": 1, "started", "duration_s",
"machine": {...}, "settings": {...}, "cases": [...], "rows": [...]}`` (``machine`` has ``gpu``,
``gpu_memory_bytes`` and ``cuda`` on CUDA; ``settings`` has ``device`` and ``baseline``; files written before
those fields read as CPU results); each row has the fields of :class:`BenchRow`:

* ``model`` (str), ``latent`` (int, side of the square latent), ``latent_shape`` ([B, C, H, W]), ``batch``,
  ``method``, ``label``, ``kind`` (``fp32`` | ``quantdiff`` | ``peer``), ``compiled`` (bool);
* ``status`` (``ok`` | ``failed`` | ``not installed`` | ``skipped``), ``reason`` (one line, "" when ok);
* ``median_s``, ``min_s``, ``times_s`` (list), ``group`` (int), ``fp32_median_s`` (fp32 eager's median in
  that group), ``speedup_vs_fp32``, ``speedup_vs_best_fp32``, ``best_fp32`` (``fp32`` | ``fp32-compile``);
  ``bf16_median_s``, ``speedup_vs_bf16``, ``speedup_vs_best_bf16``, ``best_bf16``: the same against bf16 eager
  (GPU suite; ``null`` on the CPU's);
* ``weight_bytes``, ``weight_ratio_vs_fp32``, ``stored_bytes`` / ``kernel_bytes`` (quantdiff: ``weight_q``
  bytes still held, 0 for layers on the integer path, and prepacked bytes), ``compile_added_bytes``,
  ``held_bytes``, ``peak_rss_bytes``, ``setup_peak_rss_bytes``, ``step_peak_extra_bytes``,
  ``device_peak_bytes`` (CUDA only);
* ``sqnr_db`` (dB vs fp32 eager on the evaluation input; ``null`` with ``identical_to_fp32: true`` when
  bit-identical), ``setup_s``, ``first_call_s``, ``one_time_s``;
* ``path`` (``fp32`` | ``inductor`` | ``integer`` | ``reference`` | ``mixed`` | a peer's engine),
  ``path_detail``, ``integer_layers``, ``reference_layers``, ``widened_layers``, ``quantized_layers``,
  ``notes`` (list of strings).

Numbers are ``null`` where they do not apply (e.g. a failed row). The API changes process-wide torch state
while it runs: the thread count (restored), dynamo's caches (reset between groups).

GPU (``device="cuda"``, CLI ``--device cuda``): the same runner, rows and JSON format, with the bf16 baseline
(``baseline="bf16"``), because on a GPU the baseline a user deploys is bf16, not fp32. Its methods:
``bf16`` / ``bf16-compile`` / ``bf16-graphs`` (the model in bf16, eager, ``torch.compile`` and
``torch.compile(mode="reduce-overhead")``: CUDA graphs) and ``qd-w8a8`` / ``-compile`` / ``-graphs`` (preset
``w8a8`` calibrated in fp32, then cast to bf16 around the int8 layers: Linear and 1x1 Conv2d on the int8 GEMM,
``torch._int_mm``; 3x3 convolutions keep the reference path, which ``path_detail`` counts). ``bf16`` eager is the
anchor of every round (the fp32 model is only the SQNR reference: no ``fp32`` row) and its ratios fill
``bf16_median_s``, ``speedup_vs_bf16``, ``speedup_vs_best_bf16`` (against the fastest of the bf16 rows) and
``best_bf16`` where the CPU's fill the fp32 ones. Calls are timed with CUDA events; ``device_peak_bytes`` is
``torch.cuda.max_memory_allocated`` over one step (weights included); the memory budget does not apply. The
GPU preset: ``sdxl`` and ``sd3`` at 128x128 (1024 px), 10 repeats, 2 warm-up rounds, one group, no freezing;
the slow cutoff counts in times bf16 eager.
``make_settings(device="cpu", baseline="bf16")`` runs this suite's code on the CPU (tiny models in the tests;
its timings mean nothing there). Before the GPU suite joined this runner it had its own JSON format
(``quantdiff-bench-gpu``); no result of it was ever written.
"""

from quantdiff.bench.denoisers import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    DenoiserSpec,
    bench_calibration,
    build_denoiser,
    denoiser_inputs,
    parameter_count,
)
from quantdiff.bench.memory import weight_bytes
from quantdiff.bench.methods import METHODS, MethodSpec
from quantdiff.bench.report import format_table, render_markdown, write_markdown
from quantdiff.bench.results import BenchResult, BenchRow, MachineInfo, read_json, write_json
from quantdiff.bench.runner import run_benchmark
from quantdiff.bench.settings import BenchSettings, make_settings

__all__ = [
    "DENOISERS",
    "EVAL_SEED_OFFSET",
    "EVAL_TIMESTEP",
    "METHODS",
    "BenchResult",
    "BenchRow",
    "BenchSettings",
    "DenoiserSpec",
    "MachineInfo",
    "MethodSpec",
    "bench_calibration",
    "build_denoiser",
    "denoiser_inputs",
    "format_table",
    "make_settings",
    "parameter_count",
    "read_json",
    "render_markdown",
    "run_benchmark",
    "weight_bytes",
    "write_json",
    "write_markdown",
]
