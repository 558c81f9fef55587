"""The quantized-model folder: save, read, load.

Layout::

    q/
      quantdiff.json                      # see below
      unet/config.json                    # the denoiser's diffusers config (or transformer/)
      unet/quantized.safetensors          # every tensor of the quantized denoiser
      [model_index.json, vae/, text_encoder/, ...]   # only with copy_components=True

``quantdiff.json`` holds ``quant_method`` ("quantdiff"), ``format_version``, ``quantdiff_version``, the
base pipeline (``path``, ``pipeline_class``, ``components_hash`` over its JSON files), the denoiser
(``component``, ``class``, ``architecture``, ``config_hash``), the ``recipe``, the resolved per-layer
``plan`` and the ``calibration`` settings. Components other than the denoiser are referenced from the
base folder, not copied, unless ``copy_components`` makes the folder self-contained (``base.path`` is
then ``"."``).

Format versions (:data:`FOLDER_FEATURES`): 1 is the original layout; 2 adds layer extras in the plan
(tensors such as an input pre-scale, a low-rank branch or per-timestep input scales), dynamic activation
scales, and recipes with algorithms or exact per-layer entries; 3 adds the layer extra ``bos_kv`` (BOS-aware
text keys and values, whose attention modules get a processor wrapper when loaded); 4 adds inputs quantized
per token in groups of channels (an activation spec with ``group_size``), clipped dynamic ranges
(``clip_ratio``) and the layer extra ``input_rotation``. A folder is written with
the lowest version that can express it (:mod:`quantdiff.versioning`), so one that uses nothing new stays
version 1 and loads in every quantdiff; a reader refuses a newer version with "upgrade quantdiff".

In ``quantized.safetensors`` a quantized layer ``L`` stores what its plan entry declares
(:meth:`quantdiff.plan.LayerPlan.stored_tensors`): ``L.weight_q`` (int8/uint8, or two 4-bit values per
uint8), ``L.weight_scale``, ``L.weight_zero_point`` (asymmetric weights only), ``L.input_scale`` /
``L.input_zero_point`` (quantized inputs only), ``L.bias`` and its extras' tensors; every other tensor of
the denoiser is stored under its own name, in its own dtype.

Loading builds the denoiser's skeleton on the meta device from its config, swaps in empty quantized
modules per the plan (every declared tensor), and assigns the stored tensors strictly: names, shapes and
dtypes must match exactly. There is no pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quantdiff.atomic import atomic_directory
from quantdiff.errors import FormatError, RecipeError
from quantdiff.jsonfile import check_inside, one_line, read_json_object
from quantdiff.nn.attention import use_bos_aware_attention
from quantdiff.nn.quantized import QuantizedLayer
from quantdiff.pipelines.architectures import ARCHITECTURES
from quantdiff.pipelines.loading import (
    component_configs_hash,
    config_hash,
    denoiser_of,
    load_pipeline,
    read_pipeline_folder,
)
from quantdiff.plan import QuantPlan
from quantdiff.quantize import INFO_ATTRIBUTE, QuantizationInfo, build_skeleton, quantization_info
from quantdiff.recipe import Recipe
from quantdiff.version import __version__
from quantdiff.versioning import Feature, check_version, lowest_version

QUANT_METHOD = "quantdiff"
FORMAT_VERSION = 4  # the newest folder format this quantdiff reads and writes; see the module docstring
FOLDER_FEATURES = (
    Feature("plan.*.extras", 2, "layer extras"),
    Feature("recipe.algorithms", 2, "a recipe with algorithms"),
    Feature("recipe.layers", 2, "a recipe with exact per-layer entries"),
    Feature("plan.*.activations.dynamic", 2, "dynamic activation scales"),
    Feature("recipe.activations.dynamic", 2, "dynamic activation scales"),
    Feature("recipe.overrides.*.activations.dynamic", 2, "dynamic activation scales"),
    # Older readers would refuse the unknown extra anyway; the version says "upgrade quantdiff" up front.
    Feature("plan.*.extras.bos_kv", 3, "BOS-aware text keys / values (precomputed first token)"),
    # An older reader would refuse the spec with a confusing message ("dynamic scales are per tensor or per token").
    Feature("plan.*.activations.group_size", 4, "per-token groups of input channels"),
    Feature("recipe.activations.group_size", 4, "per-token groups of input channels"),
    Feature("recipe.overrides.*.activations.group_size", 4, "per-token groups of input channels"),
    Feature("recipe.layers.*.activations.group_size", 4, "per-token groups of input channels"),
    Feature("plan.*.activations.clip_ratio", 4, "clipped dynamic input ranges"),
    Feature("plan.*.extras.input_rotation", 4, "Hadamard-rotated layer inputs"),
    Feature("recipe.activations.clip_ratio", 4, "clipped dynamic input ranges"),
    Feature("recipe.overrides.*.activations.clip_ratio", 4, "clipped dynamic input ranges"),
    Feature("recipe.layers.*.activations.clip_ratio", 4, "clipped dynamic input ranges"),
)
CONFIG_NAME = "quantdiff.json"
WEIGHTS_NAME = "quantized.safetensors"


@dataclass(frozen=True)
class QuantizedFolder:
    """A quantized folder's ``quantdiff.json``, parsed and checked (no tensors loaded).

    Attributes:
        path: the folder.
        config: the raw JSON.
        info: recipe, plan, calibration settings and architecture.
        base_path: the base pipeline folder the other components come from.
        component: ``unet`` or ``transformer``.
        denoiser_class: diffusers class name of the denoiser.
    """

    path: Path
    config: dict[str, Any]
    info: QuantizationInfo
    base_path: Path
    component: str
    denoiser_class: str

    @property
    def weights_path(self) -> Path:
        return self.path / self.component / WEIGHTS_NAME


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_quantized(
    model,
    out: str | os.PathLike,
    *,
    base_path: str | os.PathLike | None = None,
    copy_components: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a quantized denoiser to ``out`` (atomically).

    Args:
        model: a pipeline whose denoiser went through ``quantize_denoiser``, or that denoiser itself.
        out: output folder; must not exist unless ``overwrite``.
        base_path: the pipeline folder the denoiser was loaded from (default for a pipeline:
            ``pipe.name_or_path``; required for a bare denoiser).
        copy_components: also copy the other components and ``model_index.json``, so the output works
            without the base folder.
        overwrite: replace an existing ``out``.
    """
    if isinstance(model, nn.Module):
        if base_path is None:
            raise FormatError("saving a bare denoiser needs base_path: the pipeline folder it came from")
        denoiser = model
        base = read_pipeline_folder(base_path)
        component = base.denoiser_component
    else:
        component, denoiser = denoiser_of(model)
        base = read_pipeline_folder(base_path or getattr(model, "name_or_path", None) or "")
    info = quantization_info(denoiser)
    if info is None:
        raise FormatError("the denoiser is not quantized: run quantize_denoiser first")
    if base.denoiser_config_hash() != config_hash(denoiser.config):
        raise FormatError(f"the denoiser does not come from the base folder '{base.path}' (its config differs)")
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": None,  # the lowest that can express the rest: set below
        "quantdiff_version": __version__,
        "base": {
            "path": "." if copy_components else str(base.path),
            "original_path": str(base.path),
            "pipeline_class": base.pipeline_class,
            "components_hash": component_configs_hash(base.path),
        },
        "denoiser": {
            "component": component,
            "class": type(denoiser).__name__,
            "architecture": info.architecture.name,
            "config_hash": config_hash(denoiser.config),
        },
        "recipe": info.recipe.to_dict(),
        "calibration": None if info.calibration is None else dict(info.calibration),
        "plan": info.plan.to_dict(),
    }
    config["format_version"] = lowest_version(config, FOLDER_FEATURES)
    with atomic_directory(out, overwrite=overwrite) as staging:
        if copy_components:
            for entry in base.path.iterdir():
                if entry.name != component and not entry.name.startswith("."):
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        (staging / component).mkdir()
        shutil.copy2(base.path / component / "config.json", staging / component / "config.json")
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in all_tensors(denoiser).items()}
        save_file(tensors, staging / component / WEIGHTS_NAME, metadata={"format": QUANT_METHOD})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return Path(out)


def read_quantized_folder(path: str | os.PathLike) -> QuantizedFolder:
    """Parse and check ``quantdiff.json`` of a quantized folder.

    The folder may come from someone else, so what it names is checked before anything is opened: the
    denoiser component is ``unet`` or ``transformer`` (the architecture's), its class is the architecture's
    diffusers class, and ``base.path`` is ``"."`` (self-contained) or an absolute path. Any malformed value is
    a :class:`FormatError`; see the README's Reliability section for the policy.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FormatError(f"quantized folder '{path}' does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(f"'{path}' is not a quantdiff folder: it has no {CONFIG_NAME}")
    check_inside(folder, config_path, FormatError)
    config = read_json_object(config_path, FormatError, "re-run quantize")
    if config.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{config_path} was not written by quantdiff (quant_method != 'quantdiff')")
    try:
        check_version(
            config,
            config.get("format_version"),
            FORMAT_VERSION,
            FOLDER_FEATURES,
            f"'{path}'",
            f"quantdiff {config.get('quantdiff_version')}",
        )
    except ValueError as error:
        raise FormatError(str(error)) from None
    try:
        denoiser, base = config["denoiser"], config["base"]
        if not isinstance(denoiser, dict) or not isinstance(base, dict):
            raise TypeError("'denoiser' and 'base' must be JSON objects")
        architecture = (
            ARCHITECTURES.get(denoiser["architecture"]) if isinstance(denoiser["architecture"], str) else None
        )
        if architecture is None:
            raise ValueError(f"unknown architecture {denoiser['architecture']!r} (known: {', '.join(ARCHITECTURES)})")
        component, denoiser_class = denoiser["component"], denoiser["class"]
        if component != architecture.denoiser_component or denoiser_class != architecture.denoiser_class:
            raise ValueError(
                f"a {architecture.name} denoiser is component {architecture.denoiser_component!r} of class "
                f"{architecture.denoiser_class!r}, not {component!r} of class {denoiser_class!r}"
            )
        if not isinstance(denoiser["config_hash"], str):
            raise TypeError("denoiser.config_hash must be a string")
        info = QuantizationInfo(
            architecture=architecture,
            recipe=Recipe.from_dict(config["recipe"]),
            plan=QuantPlan.from_dict(config["plan"]),
            calibration=config.get("calibration"),
        )
        base_path = _base_path(base["path"])
    except KeyError as error:
        raise FormatError(f"{config_path} is missing {error}: the folder is damaged, re-run quantize") from None
    except (TypeError, ValueError, AttributeError, RecursionError, RecipeError, FormatError) as error:
        raise FormatError(
            f"{config_path} is malformed ({one_line(error)}): the folder is damaged, re-run quantize"
        ) from None
    if not base_path.is_absolute():
        base_path = folder.resolve()
    return QuantizedFolder(folder.resolve(), config, info, base_path, component, denoiser_class)


def _base_path(value: Any) -> Path:
    """``base.path``: ``"."`` (the folder itself) or an absolute path; anything else is refused."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ValueError(f"base.path must be a non-empty path string, got {value!r}")
    if value == ".":
        return Path(".")
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(
            f"base.path {value!r} is relative: quantdiff writes '.' (self-contained) or the base pipeline "
            "folder's absolute path, so set it to that absolute path"
        )
    return path


def load_quantized_denoiser(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the quantized denoiser stored in ``path``; the base folder is not needed."""
    import diffusers

    folder = read_quantized_folder(path)
    denoiser_config_path = folder.path / folder.component / "config.json"
    if not denoiser_config_path.is_file():
        raise FormatError(f"'{path}' is missing {folder.component}/config.json: re-run quantize")
    check_inside(folder.path, denoiser_config_path, FormatError)
    check_inside(folder.path, folder.weights_path, FormatError)
    cls = getattr(diffusers, folder.denoiser_class, None)
    if cls is None:
        raise FormatError(f"diffusers has no class {folder.denoiser_class!r}: upgrade diffusers")
    read_json_object(denoiser_config_path, FormatError, "re-run quantize")  # bounded, before diffusers parses it
    try:
        with torch.device("meta"):
            denoiser = cls.from_config(cls.load_config(denoiser_config_path.parent))
    except Exception as error:  # diffusers' own checks of a config raise anything: refuse the file, say why
        raise FormatError(
            f"{denoiser_config_path} is not a valid {folder.denoiser_class} config ({one_line(error)}): re-run quantize"
        ) from None
    if config_hash(denoiser.config) != folder.config["denoiser"]["config_hash"]:
        raise FormatError(f"{denoiser_config_path} was changed after quantization: re-run quantize")
    tensors = _read_tensors(folder.weights_path)
    _check_plan_fits(denoiser, folder.info.plan, folder.path / CONFIG_NAME)
    try:
        build_skeleton(denoiser, folder.info.plan)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
        raise FormatError(
            f"the plan in {folder.path / CONFIG_NAME} cannot be built ({one_line(error)}): re-run quantize"
        ) from None
    _assign(denoiser, tensors, folder.weights_path)
    use_bos_aware_attention(denoiser)  # layers with a precomputed first token need their attention's wrapper
    denoiser.eval().requires_grad_(False)
    setattr(denoiser, INFO_ATTRIBUTE, folder.info)
    return denoiser.to(device)


def _check_plan_fits(denoiser: nn.Module, plan: QuantPlan, source: Path) -> None:
    """Every planned layer exists in ``denoiser`` with the planned type, weight shape and bias."""
    modules = dict(denoiser.named_modules())
    for layer in plan:
        module = modules.get(layer.name)
        weight = getattr(module, "weight", None)
        actual = (
            None
            if module is None or weight is None
            else (type(module).__name__, tuple(weight.shape), getattr(module, "bias", None) is not None)
        )
        if actual != (layer.layer_type, tuple(layer.weight_shape), layer.has_bias):
            found = (
                "no such layer" if module is None else f"{actual[0]} {actual[1]}" if actual else type(module).__name__
            )
            raise FormatError(
                f"the plan in {source} does not match its {type(denoiser).__name__}: layer {layer.name!r} is planned "
                f"as {layer.layer_type} {tuple(layer.weight_shape)}, the model has {found}; re-run quantize"
            )


def load_quantized_pipeline(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    **components: Any,
):
    """Load the full pipeline of a quantized folder: its denoiser plus the base folder's other components.

    ``torch_dtype`` applies to the floating-point tensors (other components, and the denoiser's biases,
    norms and unquantized layers); integer weights stay integer.
    """
    folder = read_quantized_folder(path)
    if not (folder.base_path / "model_index.json").is_file():
        raise FormatError(
            f"the base pipeline folder '{folder.base_path}' recorded in {folder.path / CONFIG_NAME} is gone: "
            "move it back, or quantize again with --copy-components for a self-contained folder"
        )
    if component_configs_hash(folder.base_path) != folder.config["base"].get("components_hash"):
        warnings.warn(
            f"the base pipeline folder '{folder.base_path}' changed since quantization "
            "(its component configs differ); images may not match the quantized model's evaluation",
            stacklevel=2,
        )
    denoiser = load_quantized_denoiser(folder.path, device=device)
    if torch_dtype != torch.float32:
        denoiser = denoiser.to(torch_dtype)
    return load_pipeline(
        folder.base_path, device=device, torch_dtype=torch_dtype, **{folder.component: denoiser}, **components
    )


def all_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and *all* buffers, non-persistent ones included, so loading needs no re-initialisation.

    A quantized layer in integer mode has released ``weight_q`` to its kernel; it is rebuilt here, so a
    model saves the same tensors in either mode.
    """
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name, layer in module.named_modules():
        if isinstance(layer, QuantizedLayer) and not layer.holds_weight_q:
            tensors[f"{name}.weight_q" if name else "weight_q"] = layer.integer_weight()
    return tensors


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FormatError(f"'{path}' is missing: the quantized folder is incomplete, re-run quantize")
    try:
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != QUANT_METHOD:
                raise FormatError(f"'{path}' was not written by quantdiff")
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise FormatError(f"'{path}' is corrupt or truncated ({error}): re-run quantize") from None


def _assign(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """Put stored tensors into a meta skeleton, checking that names and shapes match exactly."""
    expected = all_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"'{source}' does not match its plan: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; re-run quantize"
        )
    for name, tensor in tensors.items():
        slot = expected[name]
        # Float tensors may be stored in another float dtype (a pipeline loaded in fp16); integer ones may not.
        same_kind = slot.is_floating_point() and tensor.is_floating_point() or slot.dtype == tensor.dtype
        if tuple(slot.shape) != tuple(tensor.shape) or not same_kind:
            raise FormatError(
                f"'{source}': tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the model expects "
                f"{tuple(slot.shape)} {slot.dtype}; re-run quantize"
            )
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attribute in owner._parameters:
            owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attribute] = tensor
