"""Load local diffusers pipeline folders, with no network, and find their denoiser.

quantdiff never reaches a model hub: every load passes ``local_files_only=True``, so a folder that is
incomplete fails here with a clear message instead of trying to download the missing part.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantdiff.errors import PipelineError
from quantdiff.jsonfile import read_json_object
from quantdiff.pipelines.architectures import Architecture, architecture_from_config

DENOISER_COMPONENTS = ("unet", "transformer")


@dataclass(frozen=True)
class PipelineFolder:
    """What a pipeline folder holds, read from its JSON files only (no weights are loaded).

    Attributes:
        path: absolute folder path.
        pipeline_class: ``_class_name`` of ``model_index.json``, e.g. ``StableDiffusionPipeline``.
        components: component name -> ``(library, class name)``; ``None`` entries are absent components.
        denoiser_component: ``unet`` or ``transformer``.
        denoiser_config: the denoiser's ``config.json``.
        architecture: the matching :class:`Architecture`.
    """

    path: Path
    pipeline_class: str
    components: Mapping[str, tuple[str, str] | None]
    denoiser_component: str
    denoiser_config: Mapping[str, Any]
    architecture: Architecture

    @property
    def denoiser_class(self) -> str:
        return self.architecture.denoiser_class

    def denoiser_skeleton(self) -> nn.Module:
        """The denoiser built from its config on the meta device: shapes and full config, no weights."""
        import diffusers

        cls = getattr(diffusers, self.denoiser_class)
        with torch.device("meta"):
            return cls.from_config(cls.load_config(self.path / self.denoiser_component))

    def denoiser_config_hash(self) -> str:
        """:func:`config_hash` of the denoiser's config with every default filled in, as a loaded model has it."""
        return config_hash(self.denoiser_skeleton().config)


def read_pipeline_folder(path: str | os.PathLike) -> PipelineFolder:
    """Validate that ``path`` is a diffusers text-to-image pipeline folder quantdiff supports."""
    folder = Path(path).expanduser()
    if not folder.exists():
        from quantdiff.pipelines.bundled import unknown_model_hint  # imports diffusers: only when needed

        raise PipelineError(f"model folder '{path}' does not exist{unknown_model_hint(str(path))}")
    if not folder.is_dir():
        raise PipelineError(f"'{path}' is a file, not a diffusers pipeline folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PipelineError(
            f"'{path}' is not a diffusers pipeline folder: it has no model_index.json "
            "(save one with pipeline.save_pretrained(folder))"
        )
    index = read_json_object(index_path, PipelineError)
    pipeline_class = index.get("_class_name")
    if not isinstance(pipeline_class, str):
        raise PipelineError(f"{index_path} has no '_class_name': it is not a diffusers pipeline index")
    components: dict[str, tuple[str, str] | None] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2:
            components[name] = None if value[0] is None or value[1] is None else (value[0], value[1])
    denoisers = [name for name in DENOISER_COMPONENTS if components.get(name)]
    if not denoisers:
        raise PipelineError(
            f"pipeline {pipeline_class} in '{path}' has no 'unet' or 'transformer' component to quantize"
        )
    denoiser_component = denoisers[0]
    config_path = folder / denoiser_component / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"'{path}' is missing {denoiser_component}/config.json")
    denoiser_config = read_json_object(config_path, PipelineError)
    class_name = components[denoiser_component][1]  # type: ignore[index]
    return PipelineFolder(
        path=folder.resolve(),
        pipeline_class=pipeline_class,
        components=components,
        denoiser_component=denoiser_component,
        denoiser_config=denoiser_config,
        architecture=architecture_from_config(class_name, denoiser_config),
    )


def load_pipeline(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **components: Any,
):
    """Load a local pipeline folder with ``local_files_only=True``.

    Args:
        path: pipeline folder.
        torch_dtype: dtype of the loaded weights (fp32 by default: bf16/fp16 are very slow on most CPUs).
        device: where to move the pipeline.
        **components: components passed to ``from_pretrained`` instead of being loaded from the folder,
            e.g. ``unet=quantized_unet`` or ``text_encoder_3=None``.
    """
    from diffusers import DiffusionPipeline

    folder = read_pipeline_folder(path)
    # Components saved as [null, null] (e.g. SD3 without T5) must be passed as None explicitly, or
    # pipelines that do not list them as optional refuse to load.
    absent = {name: None for name, entry in folder.components.items() if entry is None}
    try:
        # safetensors only: a folder with pickled .bin weights is refused rather than unpickled
        pipe = DiffusionPipeline.from_pretrained(
            folder.path, local_files_only=True, dtype=torch_dtype, use_safetensors=True, **{**absent, **components}
        )
    except (OSError, ValueError, EnvironmentError) as error:
        raise PipelineError(
            f"could not load the pipeline in '{path}': {_first_line(error)} (quantdiff reads .safetensors "
            "weights only; convert .bin weights with diffusers' save_pretrained)"
        ) from None
    return pipe.to(device)


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """``(component name, module)`` of a loaded pipeline's denoiser."""
    for name in DENOISER_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise PipelineError(f"{type(pipe).__name__} has no 'unet' or 'transformer' to quantize")


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a model config, ignoring bookkeeping keys (``_name_or_path``, ``_diffusers_version``...)."""
    clean = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    text = json.dumps(clean, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def component_configs_hash(path: str | os.PathLike) -> str:
    """SHA-256 over ``model_index.json`` and every component's JSON files (configs, tokenizer files).

    Identifies a pipeline folder without reading its weights, so a quantized folder can check that the
    base folder it references is still the one it was made from.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    files = [folder / "model_index.json"] + sorted(folder.glob("*/*.json"))
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
