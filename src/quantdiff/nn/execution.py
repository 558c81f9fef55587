"""Execution modes of whole models: switch every quantized layer to its integer kernel, to the faster of the
kernel and the float path (auto), or back to the reference, and say which path each layer takes and why
(:class:`ExecutionSummary`, shown by ``quantdiff inspect --execution``)."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from quantdiff.nn.attention import (
    attention_dtype,
    describe_attention,
    native_bf16,
    resolve_attention,
    use_attention_dtype,
)
from quantdiff.nn.kernels import KernelSupport, kernel_support, packed_support
from quantdiff.nn.quantized import EXECUTION_MODES, QuantizedConv2d, QuantizedLayer


@dataclass(frozen=True)
class LayerExecution:
    """One quantized layer's path after :func:`use_execution` (or :func:`use_integer_kernels` / :func:`use_reference`).

    Attributes:
        name: qualified module name in the model.
        layer_type: ``Linear`` or ``Conv2d``.
        weights: the weight spec, described (``int8 sym channel minmax pair-safe``).
        path: ``"integer"`` (the int8 kernel), ``"reference"`` (fake-quant), and in auto mode ``"float"`` (the
            reference math on a cached fp32 weight: faster than the kernel for this layer here) or
            ``"pending"`` (chosen at the layer's first call).
        reason: why, e.g. ``"int8 oneDNN; pair-safe weights"``, ``"reference: per-group weights ..."`` or
            ``"float: float 0.020 ms vs int8 kernel 0.051 ms per call at input 2x64x8x8 (7 calls each)"``.
        exact: the path computes what the reference computes (False: an allowed, saturating integer layer).
        widened: 4-bit weights widened to int8 for the kernel.
        stored_bytes: bytes of ``weight_q`` held now: 0 on the integer path, where the packed copy replaces it.
        kernel_bytes: bytes of the kernel's prepacked copy (integer path only).
        float_bytes: bytes of the float path's fp32 weight copy, held beside ``weight_q`` (float path only).
    """

    name: str
    layer_type: str
    weights: str
    path: str
    reason: str
    exact: bool
    widened: bool
    stored_bytes: int
    kernel_bytes: int
    float_bytes: int = 0


@dataclass(frozen=True)
class ExecutionSummary:
    """Per-layer paths of a model, with what the CPU's int8 kernels can do (``support``).

    ``attention`` is the dtype its attention modules compute scaled-dot-product attention in
    (``"float32"``, ``"bfloat16"``, ``"bfloat16-large"``, ``"int8"``: see :mod:`quantdiff.nn.attention`; None: no attention modules).
    ``layout``: the layout of the activations between its convolutions (:func:`use_activation_layout`:
    ``"channels_last"`` or ``"nchw"``; None: no quantized convolutions).
    """

    mode: str
    support: KernelSupport | None
    layers: tuple[LayerExecution, ...]
    attention: str | None = None
    layout: str | None = None
    layout_reason: str = ""

    @property
    def integer(self) -> tuple[LayerExecution, ...]:
        return tuple(layer for layer in self.layers if layer.path == "integer")

    @property
    def reference(self) -> tuple[LayerExecution, ...]:
        return tuple(layer for layer in self.layers if layer.path == "reference")

    @property
    def floating(self) -> tuple[LayerExecution, ...]:
        """Layers on the float path (auto mode: faster than the kernel here)."""
        return tuple(layer for layer in self.layers if layer.path == "float")

    @property
    def pending(self) -> tuple[LayerExecution, ...]:
        """Layers whose path auto mode chooses at their first call (none has run yet)."""
        return tuple(layer for layer in self.layers if layer.path == "pending")

    @property
    def inexact(self) -> tuple[LayerExecution, ...]:
        return tuple(layer for layer in self.layers if not layer.exact)

    def describe_kernels(self) -> str | None:
        """What this CPU's kernels in use can do: oneDNN's description, and the packed kernels' where layers run
        on them."""
        parts = [] if self.support is None else [self.support.describe()]
        if any("packed" in layer.reason for layer in self.layers if layer.path == "integer"):
            parts.append(packed_support().describe())
        return "; ".join(parts) or None

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "support": self.describe_kernels(),
            "integer_layers": len(self.integer),
            "float_layers": len(self.floating),
            "pending_layers": len(self.pending),
            "reference_layers": len(self.reference),
            "stored_bytes": sum(layer.stored_bytes for layer in self.layers),
            "kernel_bytes": sum(layer.kernel_bytes for layer in self.layers),
            "float_bytes": sum(layer.float_bytes for layer in self.layers),
            "attention": self.attention,
            "layout": self.layout,
            "layout_reason": self.layout_reason,
            "layers": [layer.__dict__.copy() for layer in self.layers],
        }

    def headline(self) -> str:
        """How many layers take each path, e.g. ``"auto mode: 4 of 120 quantized layers on the int8 kernel, 116
        on the float path (+1.52 MiB fp32 weight copies), 0 on the reference path"``."""
        float_bytes = sum(layer.float_bytes for layer in self.layers)
        return (
            f"{self.mode} mode: {len(self.integer)} of {len(self.layers)} quantized layers on the int8 kernel, "
            + (
                f"{len(self.floating)} on the float path (+{float_bytes / 2**20:.2f} MiB fp32 weight copies), "
                if self.floating
                else ""
            )
            + (f"{len(self.pending)} chosen at their first call, " if self.pending else "")
            + f"{len(self.reference)} on the reference path"
        )

    def format(self, max_layers: int | None = None) -> str:
        """Plain text: one header line, then one line per layer (``name  path  reason``)."""
        kernels = self.describe_kernels()
        lines = [
            self.headline()
            + (f", {len(self.inexact)} INEXACT" if self.inexact else "")
            + (f" ({kernels})" if kernels else "")
            + (f"; attention in {describe_attention(self.attention)}" if self.attention is not None else "")
            + (f"; activations {self.layout_reason}" if self.layout_reason else "")
        ]
        width = max((len(layer.name) for layer in self.layers), default=0)
        shown = self.layers if max_layers is None else self.layers[:max_layers]
        lines += [f"  {layer.name:<{width}}  {layer.path:<9}  {layer.reason}" for layer in shown]
        if len(shown) < len(self.layers):
            lines.append(f"  ... {len(self.layers) - len(shown)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


WEIGHT_ONLY_CHOICES = ("auto", "float32", "bfloat16")


def resolve_weight_only(choice: str, device: str = "cpu") -> torch.dtype:
    """The dtype weight-only layers' float op may run in: ``"auto"`` -> bfloat16 on a CPU that computes it
    natively (the packed kernel then uses it: 0.23-0.53x the fp32 layer's time, about 51 dB per layer), else
    float32 (bit-identical to the reference path); ``"bfloat16"`` still needs the native support."""
    if choice not in WEIGHT_ONLY_CHOICES:
        raise ValueError(f"weight_only={choice!r} is unknown: use one of {', '.join(WEIGHT_ONLY_CHOICES)}")
    if choice == "auto":
        return torch.bfloat16 if device == "cpu" and native_bf16()[0] else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


def use_integer_kernels(
    model: nn.Module,
    *,
    allow_inexact: bool = False,
    attention: str = "auto",
    backend: str = "auto",
    weight_only: str = "auto",
    layout: str = "auto",
) -> ExecutionSummary:
    """Switch ``model`` to its deployment path: each quantized layer on the int8 kernel where it can take it.

    Each layer's int8 weight is prepacked once here into the kernel's own copy, which replaces ``weight_q``
    (see :mod:`quantdiff.nn.kernels`); layers that cannot run a kernel keep the reference path, and the
    summary says why for each. Nothing saved changes: ``save_quantized`` writes the same file in either mode.

    Args:
        model: any module containing :class:`QuantizedLinear` / :class:`QuantizedConv2d` layers.
        allow_inexact: also run layers whose weights are not pair-safe on a CPU that saturates int16 pair
            sums (AVX2 without VNNI). Their results are wrong (14-46 dB per layer measured); a warning
            names them. Default: they stay on the reference path.
        attention: dtype of the attention modules' scaled-dot-product attention: ``"auto"`` (bf16 where the
            CPU computes bf16 natively, else fp32), ``"float32"``, ``"bfloat16"`` or ``"int8"`` (QK^T and PV
            in int8, CPU only; :mod:`quantdiff.nn.attention`). :func:`use_reference` restores fp32.
        backend: ``"auto"`` (oneDNN on the CPU, ``torch._int_mm`` for layers on CUDA), ``"onednn"``, or
            ``"int_mm"`` on any device (:mod:`quantdiff.nn.kernels.int_mm`; on the CPU only a check of the GPU math).
        weight_only: dtype of weight-only layers' float op (W4A16, W8A16) on the packed kernel: ``"auto"``
            (bf16 where the CPU computes bf16 natively, else fp32), ``"float32"`` (bit-identical to the
            reference path) or ``"bfloat16"`` (:func:`resolve_weight_only`).
        layout: the activations' layout between convolutions: ``"auto"`` (channels-last where convolutions
            run the packed AMX kernel, else NCHW), ``"channels_last"`` or ``"nchw"`` (:func:`use_activation_layout`).

    Returns:
        The per-layer :class:`ExecutionSummary`.
    """
    support = None if backend == "int_mm" else kernel_support()  # what the oneDNN path can do on this CPU
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device.type
    use_attention_dtype(model, resolve_attention(attention, device))
    summary = _switch(model, "integer", support, allow_inexact, backend, resolve_weight_only(weight_only, device))
    summary = _with_layout(summary, *use_activation_layout(model, layout))
    if summary.inexact:
        warnings.warn(
            f"{len(summary.inexact)} layer(s) run the int8 kernel although their weights are not pair-safe on "
            f"this CPU ({summary.support.describe()}); their outputs saturate and are wrong, e.g. "
            f"{summary.inexact[0].name}. Quantize with pair_safe weights (preset w8a8-int) instead.",
            stacklevel=2,
        )
    return summary


def use_execution(
    model: nn.Module,
    mode: str = "auto",
    *,
    allow_inexact: bool = False,
    attention: str = "auto",
    backend: str = "auto",
    weight_only: str = "auto",
    layout: str = "auto",
) -> ExecutionSummary:
    """Switch ``model``'s quantized layers to an execution mode.

    Args:
        mode: ``"auto"``: each layer the int8 kernel can take runs whichever of the kernel and the float path
            is faster for its shape on this CPU, measured at its first call (the summary says ``pending``
            until then; a later :func:`execution_summary` gives each choice with the timings); the others keep
            the reference path. ``"integer"``: every layer the kernel can take runs it
            (:func:`use_integer_kernels`). ``"reference"``: the fake-quant path everywhere (:func:`use_reference`).
        allow_inexact, attention, backend, weight_only, layout: as for :func:`use_integer_kernels` (not used by
            ``"reference"``, which restores NCHW).
    """
    if mode not in EXECUTION_MODES:
        raise ValueError(f"execution mode {mode!r} is unknown: use one of {', '.join(EXECUTION_MODES)}")
    if mode == "reference":
        return use_reference(model)
    if mode == "integer":
        return use_integer_kernels(
            model,
            allow_inexact=allow_inexact,
            attention=attention,
            backend=backend,
            weight_only=weight_only,
            layout=layout,
        )
    support = None if backend == "int_mm" else kernel_support()
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device.type
    use_attention_dtype(model, resolve_attention(attention, device))
    summary = _switch(model, "auto", support, allow_inexact, backend, resolve_weight_only(weight_only, device))
    return _with_layout(summary, *use_activation_layout(model, layout))


def use_reference(model: nn.Module) -> ExecutionSummary:
    """Switch every quantized layer of ``model`` back to the reference (fake-quant) path, attention to fp32,
    activations to NCHW; frees the kernels."""
    use_attention_dtype(model, "float32")
    summary = _switch(model, "reference", None, False)
    return _with_layout(summary, *use_activation_layout(model, "nchw"))


def execution_summary(model: nn.Module) -> ExecutionSummary:
    """The current per-layer paths of ``model`` without switching anything."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]
    modes = {m.execution for _, m in layers}
    support = next((m._support for _, m in layers if m._support is not None), None)
    layout = activation_layout(model)
    return ExecutionSummary(
        modes.pop() if len(modes) == 1 else "mixed",
        support,
        tuple(_describe(n, m) for n, m in layers),
        attention_dtype(model),
        layout,
        _CHANNELS_LAST_REASON if layout == "channels_last" else "",
    )


# ---------------------------------------------------------------------------------------- activation layout
LAYOUT_CHOICES = ("auto", "nchw", "channels_last")
_CHANNELS_LAST_REASON = "channels-last between convolutions (the packed kernel's output, not copied back to NCHW)"
_LAYOUT_HOOKS = "_quantdiff_layout_hooks"  # the model attribute holding the layout hooks' handles


def use_activation_layout(model: nn.Module, layout: str = "auto") -> tuple[str | None, str]:
    """Keep ``model``'s activations channels-last between its convolutions, or NCHW as ``nn.Conv2d`` gives.

    Why: the packed AMX convolution reads a channels-last input as it is and writes a channels-last output
    (its im2col copies runs of channels of one pixel). Returning NCHW, as ``nn.Conv2d`` does for an NCHW
    input, costs a copy of every output, and the next convolution transposes it back while quantizing it.
    GroupNorm, SiLU, residual adds, nearest upsampling and skip concatenations keep channels-last inputs
    channels-last, so once the convolutions return their output as it is, a diffusers UNet stays channels-last
    from its first convolution to its last, except where its own code asks for a contiguous NCHW tensor
    (Transformer2DModel before ``proj_out``; that convolution's output is channels-last again). Measured on
    the SD1.5 UNet (one thread, benchmarks/PROFILE.md, benchmarks/KERNELS.md section 8): layout copies from
    8-11% to 1% of the W8A8 step's op time, the eager step 0.91-0.93x the time at 32x32 and 0.88x at 64x64. The outputs are not bit-identical to NCHW's: torch's channels-last GroupNorm sums in
    another order, and an input that lands on a rounding boundary of the next layer's int8 grid can move by
    one step (the model's output SQNR against the reference path changes by about 0.1 dB either way).

    ``"channels_last"``: every :class:`QuantizedConv2d` on the packed kernel returns its output channels-last
    (other paths return what their float op gives), a forward pre-hook on ``model`` makes its 4-D float inputs
    channels-last (a first convolution left in float then starts the model channels-last too), and a forward
    hook turns its 4-D outputs back into contiguous NCHW tensors, so callers see the layout they always did.
    ``"nchw"``: removes the hooks and the flags.
    ``"auto"``: channels-last where at least one convolution runs the packed kernel, else NCHW. Code that
    ``.view()``s a convolution's output across channels and pixels fails with an error on channels-last
    tensors (never silently): use ``"nchw"`` for such models.

    Returns:
        The layout now in place (None: the model has no quantized convolution) and why (for the summary).
    """
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout={layout!r} is unknown: use one of {', '.join(LAYOUT_CHOICES)}")
    convs = [module for module in model.modules() if isinstance(module, QuantizedConv2d)]
    reason = ""
    if layout == "auto":
        packed = [conv for conv in convs if _runs_packed(conv)]
        layout = "channels_last" if packed else "nchw"
        if convs and not packed:
            reason = "NCHW: no convolution runs the packed AMX kernel (channels-last would only add copies)"
    for handle in getattr(model, _LAYOUT_HOOKS, ()):  # whoever added the hooks removes them
        handle.remove()
    if hasattr(model, _LAYOUT_HOOKS):
        delattr(model, _LAYOUT_HOOKS)
    channels_last = layout == "channels_last" and bool(convs)
    for conv in convs:
        conv.channels_last_output = channels_last
    if channels_last:
        hooks = (
            model.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True),
            model.register_forward_hook(_contiguous_outputs),
        )
        setattr(model, _LAYOUT_HOOKS, hooks)
        reason = _CHANNELS_LAST_REASON
    return (layout if convs else None), reason


def activation_layout(model: nn.Module) -> str | None:
    """The layout :func:`use_activation_layout` left in place (None: no quantized convolution)."""
    convs = [module for module in model.modules() if isinstance(module, QuantizedConv2d)]
    if not convs:
        return None
    return "channels_last" if any(conv.channels_last_output for conv in convs) else "nchw"


def _runs_packed(conv: QuantizedConv2d) -> bool:
    """The convolution runs (or, in auto mode, may run after its first call) the packed AMX kernel."""
    decision = conv.execution_decision()
    if decision.path == "pending":
        decision = conv._eligible
    return decision.path == "integer" and "packed" in decision.reason


def _channels_last_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The model's 4-D float inputs (a UNet's latent) channels-last, so that a first convolution left in float
    starts the model channels-last too (a copy of a few channels, once per call)."""

    def channels_last(value):
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            return value.contiguous(memory_format=torch.channels_last)
        return value

    return tuple(channels_last(a) for a in args), {key: channels_last(v) for key, v in kwargs.items()}


def _contiguous_outputs(module: nn.Module, args, output):
    """The model's 4-D output tensors as contiguous NCHW tensors (a diffusers output object: its fields)."""
    if isinstance(output, torch.Tensor):
        return output.contiguous() if output.dim() == 4 else output
    if isinstance(output, MutableMapping):  # diffusers' BaseOutput is an OrderedDict
        for key, value in list(output.items()):
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                output[key] = value.contiguous()
        return output
    if type(output) in (tuple, list):
        return type(output)(_contiguous_outputs(module, args, value) for value in output)
    return output


def _with_layout(summary: ExecutionSummary, layout: str | None, reason: str) -> ExecutionSummary:
    return dataclasses.replace(summary, layout=layout, layout_reason=reason)


def _switch(
    model: nn.Module,
    mode: str,
    support: KernelSupport | None,
    allow_inexact: bool,
    backend: str = "auto",
    weight_only_dtype: torch.dtype = torch.float32,
) -> ExecutionSummary:
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            module.set_execution(
                mode,
                support=support,
                allow_inexact=allow_inexact,
                backend=backend,
                weight_only_dtype=weight_only_dtype,
            )
            layers.append(_describe(name, module))
    return ExecutionSummary(mode, support, tuple(layers), attention_dtype(model))


def _describe(name: str, module: QuantizedLayer) -> LayerExecution:
    decision = module.execution_decision()
    return LayerExecution(
        name=name,
        layer_type=type(module).__name__.removeprefix("Quantized"),
        weights=module.weight_spec.describe(),
        path=decision.path,
        reason=decision.reason,
        exact=decision.exact,
        widened=decision.widened,
        stored_bytes=module.weight_q.numel() * module.weight_q.element_size() if module.holds_weight_q else 0,
        kernel_bytes=module.kernel_bytes,
        float_bytes=module.float_weight_bytes,
    )
