"""The ONNX Runtime peer (``ort-qdq``): the child process that exports and quantizes the denoiser
(:func:`quantize_in_child`, :func:`ort_child`), and the builder that runs the quantized model in the
benchmark process (:func:`build_ort`).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantdiff.bench.builds import BuildContext, Built, one_line
from quantdiff.bench.denoisers import (
    DENOISERS,
    EVAL_SEED_OFFSET,
    EVAL_TIMESTEP,
    DenoiserSpec,
    build_denoiser,
    calibration_timesteps,
    denoiser_inputs,
)
from quantdiff.bench.memory import exit_diagnosis, peak_rss, rss, settled_rss
from quantdiff.calibration.dataset import denoiser_output


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


def quantize_in_child(
    spec: DenoiserSpec, latent: int, batch: int, seed: int, calibration: int, threads: int, folder: Path
) -> dict[str, Any]:
    """Export the fp32 denoiser to ONNX and quantize it with ``quantize_static`` in a child process
    (:func:`ort_child`), writing into ``folder``.

    Returns the child's result: ``status`` (``ok`` with ``model_path``, ``exporter``, ``export_s``,
    ``quantize_s``; or ``failed`` with a one-line ``reason``), the child's ``peak_rss_bytes`` where it got
    to write it, and ``child_s``, the child's whole time.
    """
    # The child builds the same weights from the seed; a fingerprint proves it (the model is not passed).
    reference = build_denoiser(spec, seed)
    job = {
        "model": spec.name,
        "latent": latent,
        "batch": batch,
        "seed": seed,
        "calibration": calibration,
        "threads": threads,
        "fingerprint": fingerprint(reference),
        "folder": str(folder),
        "result": str(folder / "result.json"),
    }
    del reference
    settled_rss()
    (folder / "job.json").write_text(json.dumps(job))
    code = "import sys; from quantdiff.bench.ort import ort_child; sys.exit(ort_child(sys.argv[1]))"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(folder / "job.json")], capture_output=True, text=True)
    child_s = time.perf_counter() - start
    result_file = folder / "result.json"
    if not result_file.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()
        reason = f"ONNX child {exit_diagnosis(done.returncode)} after {child_s:.0f} s: {tail[-1] if tail else ''}"
        return {"status": "failed", "reason": reason[:300], "child_s": child_s}
    return {**json.loads(result_file.read_text()), "child_s": child_s}


def build_ort(ctx: BuildContext) -> Built:
    """An ONNX Runtime session (CPU execution provider) on the model :func:`quantize_in_child` wrote."""
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
    built = Built(call=call, module=None, path="ONNX Runtime", weight_bytes=on_disk)
    built.path_detail = "CPU execution provider, QDQ int8 (u8 activations, s8 per-channel weights, MinMax calibration)"
    built.notes.append("weight bytes = the quantized ONNX model on disk; ORT's own prepacked copies show in held")
    return built


def ort_child(job_path: str) -> int:
    """Child process: build the same fp32 denoiser, export it to ONNX, quantize it with ORT; write a JSON result.

    A separate process because export + ``quantize_static`` peak at several times the model's size, which
    must not stay in (or crash) the benchmark process; its measured peak is the row's setup peak.
    """
    job = json.loads(Path(job_path).read_text())
    result: dict[str, Any] = {"status": "failed", "reason": ""}
    try:
        torch.set_num_threads(int(job["threads"]))
        spec = DENOISERS[job["model"]]
        inputs = denoiser_inputs(spec, job["latent"], job["batch"], EVAL_TIMESTEP, job["seed"] + EVAL_SEED_OFFSET)
        names, tensors, constants = _flatten_tensors(inputs)

        def exportable() -> nn.Module:
            model = build_denoiser(spec, int(job["seed"]))
            if fingerprint(model) != job["fingerprint"]:
                raise RuntimeError("the child built different weights than the benchmark process")
            return _PositionalDenoiser(model, names, constants).eval()

        folder = Path(job["folder"])
        calibration = [
            _flatten_tensors(denoiser_inputs(spec, job["latent"], job["batch"], t, job["seed"] + 1 + i))[1]
            for i, t in enumerate(calibration_timesteps(int(job["calibration"])))
        ]
        # The TorchScript exporter first: quantize_static rejects the dynamo exporter's UNet graph ("quantization
        # parameter shared mode is not supported for weight"); the dynamo one is the fallback.
        errors = []
        wrapper: nn.Module | None = exportable()
        for exporter in ("torchscript", "dynamo"):
            fp32_path, q_path = folder / f"fp32-{exporter}.onnx", folder / f"int8-{exporter}.onnx"
            try:
                wrapper = wrapper if wrapper is not None else exportable()
                start = time.perf_counter()
                _export_onnx(wrapper, tuple(tensors), names, fp32_path, dynamo=exporter == "dynamo")
                export_s = time.perf_counter() - start
                # quantize_static holds the fp32 ONNX model several times over (loaded, augmented, in a
                # session); the torch copy must not sit beside them (built again if the fallback needs it).
                wrapper = None
                gc.collect()
                start = time.perf_counter()
                _quantize_onnx(fp32_path, q_path, names, calibration)
                result.update(exporter=exporter, export_s=export_s, quantize_s=time.perf_counter() - start)
                break
            except Exception as error:  # try the other exporter, then give both reasons
                errors.append(f"{exporter} export: {one_line(error)}")
            finally:
                for file in folder.iterdir():
                    if file.name.startswith(f"fp32-{exporter}.onnx"):
                        file.unlink()
        else:
            raise RuntimeError("; ".join(errors))
        result.update(status="ok", model_path=str(q_path))
    except Exception as error:  # reported as the row's reason
        result["reason"] = one_line(error)
    result["peak_rss_bytes"] = peak_rss() or rss()
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


def fingerprint(model: nn.Module) -> float:
    """Sum of all weights in float64: the same seed must give the same number in every process."""
    with torch.no_grad():
        return float(sum(p.sum(dtype=torch.float64) for p in model.parameters()))
