"""Integer execution with ``torch._int_mm``: the int8 GEMM path of quantized layers on CUDA GPUs.

Why this op: on NVIDIA GPUs PyTorch ships cuBLASLt's int8 GEMM (int8 x int8 -> int32 accumulation) as
``torch._int_mm``, so the GPU path needs no extension to build. Under ``torch.compile`` the input
quantization in front of it and the dequantize epilogue behind it are plain elementwise ops that inductor
fuses with their neighbours, and CUDA graphs (``mode="reduce-overhead"``) remove the launch overhead of
batch-1 steps. The speed of this path has not been measured on a GPU in this repository yet:
``quantdiff bench --device cuda`` measures it against bf16.

The same math runs on any device (``torch._int_mm`` has a CPU reference kernel, 25-60x slower than fp32
there), which is how the tests check it on machines without a GPU: ``use_integer_kernels(model,
backend="int_mm")``. On the CPU the oneDNN kernels (:mod:`quantdiff.nn.kernels`) are the fast path.

What one layer does (``Linear``; ``Conv2d`` with a 1x1 kernel, stride 1, no padding and one group, which
is a Linear over pixels):

* once: the int8 weight ``W`` ``(C_out, K)`` is stored transposed and contiguous, ``(K, C_out)``, as the
  cuBLAS path needs (a non-contiguous second operand gives wrong results), and replaces ``weight_q`` (one
  byte per weight, 4-bit weights widened); its row sums ``(C_out,)`` and the folded output scale
  ``input_scale * weight_scale[c]`` are precomputed;
* per call: the input is quantized with the static per-tensor scale by exactly the reference formula
  (``clamp(round(x / s) + z)``), shifted to int8 when it is unsigned (``q - 128``, zero point
  ``z' = z - 128``), multiplied as ``(M, K) x (K, C_out)`` int8 -> int32, and rescaled
  ``y = (acc - z' * rowsum(W)) * s * w_s + bias``, the subtraction in int32 and the rest in float32,
  returned in the input's dtype. The integer sum is exact, so the result equals the fake-quant reference
  up to the float rounding of the rescale.

cuBLAS wants ``K`` and ``C_out`` to be nonzero multiples of 8 (otherwise the layer keeps the reference path,
and the decision says why) and more than 16 rows; calls with fewer rows (time embeddings at batch 1) are
padded with zero rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantdiff.nn.kernels import KernelDecision, KernelInputs, shared_blockers
from quantdiff.primitives import compute_qparams

__all__ = ["Int8MatmulKernel", "IntMMBackend"]

_MIN_ROWS = 17  # cuBLAS int8 GEMM wants more than 16 rows


class IntMMBackend:
    """``torch._int_mm`` int8 GEMM: Linear and 1x1 Conv2d on any device (the fast path on CUDA)."""

    name = "int_mm"

    def decide(self, inputs: KernelInputs, support=None, allow_inexact: bool = False) -> KernelDecision:
        """Whether the layer can run on ``torch._int_mm``, and why (not); ``support`` is the CPU's (unused)."""
        blockers = shared_blockers(inputs)
        shape = inputs.weight_shape
        if inputs.conv is not None and not inputs.conv.is_pointwise(shape):
            size = "x".join(str(v) for v in shape[2:])
            blockers.append(f"{size} convolution (the int8 GEMM path takes 1x1 convolutions only)")
        if inputs.reduction_size % 8 or inputs.c_out % 8:
            blockers.append(f"K={inputs.reduction_size}, C_out={inputs.c_out} (cuBLAS int8 GEMM needs multiples of 8)")
        if blockers:
            return KernelDecision("reference", "reference: " + "; ".join(blockers))
        widened = inputs.weights.packed
        return KernelDecision(
            "integer",
            "int8 GEMM (torch._int_mm)" + ("; int4 weights widened to int8" if widened else ""),
            True,
            widened,
        )

    def build(self, inputs: KernelInputs) -> Int8MatmulKernel:
        return Int8MatmulKernel(inputs)


class Int8MatmulKernel:
    """One layer's int8 weight in the GEMM's layout and the scalars of its epilogue.

    A plain object, not a module: rebuilt from the layer's buffers whenever they change, as
    :class:`quantdiff.nn.kernels.onednn.IntegerKernel` is; its tensors live on the weight's device.
    """

    def __init__(self, inputs: KernelInputs):
        c_out = inputs.c_out
        activations = inputs.activations
        w = inputs.int8_weight()  # (C_out, K) int8
        self.device = w.device
        self.weight_t = w.t().contiguous()  # (K, C_out): the GEMM's second operand, contiguous
        self.is_conv = inputs.conv is not None
        self.per_token = activations.granularity == "token"
        self.clip_ratio = activations.clip_ratio
        self.bits, self.symmetric = activations.bits, activations.symmetric
        if activations.symmetric:  # signed q in [-2^(b-1), 2^(b-1) - 1], zero point 0
            self.q_low, self.q_high, self.shift = -(1 << (activations.bits - 1)), (1 << (activations.bits - 1)) - 1, 0
        else:  # unsigned q in [0, 2^b - 1], shifted by 128 into int8
            self.q_low, self.q_high, self.shift = 0, (1 << activations.bits) - 1, 128
        self.row_sums = w.sum(dim=1, dtype=torch.int32)  # (C_out,)
        self.w_scale = inputs.weight_scale.reshape(-1).to(torch.float32).expand(c_out).contiguous()  # (C_out,)
        # Static inputs: Python numbers (.item() in forward would break compiled graphs) and the folded
        # epilogue; per-call and per-token inputs compute theirs in the call.
        static = inputs.input_scale is not None and inputs.input_scale.dim() == 0
        self.x_scale = float(inputs.input_scale) if static else 1.0
        self.x_zp = int(inputs.input_zero_point) if static else 0
        self.compensation = (self.x_zp - self.shift) * self.row_sums  # (C_out,) int32: z' * sum_k W[c, k]
        self.out_scale = (self.x_scale * self.w_scale).contiguous()  # (C_out,)

    def dense_weight(self) -> Tensor:
        """The int8 weight ``(C_out, K)`` (equals the widened ``weight_q``)."""
        return self.weight_t.t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight_t.numel() * self.weight_t.element_size()

    requirement = "floating-point inputs on the weight's device without autograd"

    def accepts(self, x: Tensor) -> bool:
        return (
            x.is_floating_point()
            and x.device == self.device
            and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def quantize(self, x: Tensor, x_scale: float | Tensor | None = None, x_zp: int | Tensor | None = None) -> Tensor:
        """int8 input ``q - shift``, with ``q`` bit-identical to ``primitives.quantize`` of the fp32 input."""
        x_scale = self.x_scale if x_scale is None else x_scale
        x_zp = self.x_zp if x_zp is None else x_zp
        q = torch.clamp(torch.round(x.float() / x_scale) + x_zp, self.q_low, self.q_high)
        return (q - self.shift).to(torch.int8)

    def _matmul(self, x2d: Tensor, bias: Tensor | None, input_qparams: tuple[float, int] | None) -> Tensor:
        """``(M, K)`` floating -> ``(M, C_out)`` float32."""
        rows = x2d.shape[0]
        if self.per_token:  # a scale and zero point per row, from the row's own range
            low, high = x2d.float().amin(dim=1, keepdim=True), x2d.float().amax(dim=1, keepdim=True)  # (M, 1)
            if self.clip_ratio != 1.0:  # as the layer clips: the same products, bit for bit
                low, high = low * self.clip_ratio, high * self.clip_ratio
            x_scale, x_zp = compute_qparams(low, high, self.bits, self.symmetric)  # (M, 1), (M, 1)
            compensation = (x_zp - self.shift) * self.row_sums  # (M, C_out) int32
            out_scale = x_scale * self.w_scale  # (M, C_out)
        elif input_qparams is not None:
            x_scale, x_zp = input_qparams
            compensation, out_scale = (x_zp - self.shift) * self.row_sums, x_scale * self.w_scale
        else:
            x_scale, x_zp, compensation, out_scale = self.x_scale, self.x_zp, self.compensation, self.out_scale
        q = self.quantize(x2d, x_scale, x_zp)  # (M, K) int8
        if rows < _MIN_ROWS:
            q = F.pad(q, (0, 0, 0, _MIN_ROWS - rows))  # zero rows, dropped below
        acc = torch._int_mm(q, self.weight_t)[:rows]  # (M, C_out) int32, exact
        y = (acc - compensation).to(torch.float32) * out_scale  # exact integers, one rounding
        return y if bias is None else y + bias.to(torch.float32)

    def __call__(self, x: Tensor, bias: Tensor | None, input_qparams: tuple[float, int] | None = None) -> Tensor:
        y = self._compute(x, bias, input_qparams)
        # NaN has no int8 image: the cast alone would turn it into a finite integer and hide it from the
        # numerics guard downstream. A call whose input holds NaN answers NaN (the whole output), as the
        # oneDNN kernel does; torch.where keeps it free of a device sync on CUDA.
        if not torch.compiler.is_compiling():
            y = y.add_(torch.where(torch.isnan(x).any(), float("nan"), 0.0))
        return y

    def _compute(self, x: Tensor, bias: Tensor | None, input_qparams: tuple[float, int] | None) -> Tensor:
        if not self.is_conv:  # (..., K) -> (..., C_out)
            y = self._matmul(x.reshape(-1, x.shape[-1]), bias, input_qparams)
            return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        unbatched = x.dim() == 3  # nn.Conv2d accepts (C, H, W)
        x4 = x.unsqueeze(0) if unbatched else x  # (N, C_in, H, W)
        n, _, h, w = x4.shape
        pixels = x4.permute(0, 2, 3, 1).reshape(n * h * w, -1)  # (N*H*W, C_in)
        y = self._matmul(pixels, bias, input_qparams).reshape(n, h, w, -1).permute(0, 3, 1, 2)  # (N, C_out, H, W)
        y = y.contiguous().to(x.dtype)
        return y.squeeze(0) if unbatched else y
