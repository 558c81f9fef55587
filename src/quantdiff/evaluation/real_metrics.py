"""Metrics for real text-to-image models, computed with weights the user already has on disk.

The digits benchmark has its own evaluator (``evaluator.py``); real pipelines (SD1.5, SDXL, SD3, PixArt)
are judged by the community's metrics instead: FID with the TF-FID Inception network, CLIPScore with a
CLIP model, and ImageReward. Nothing here downloads anything: every loader takes a local path and fails
with a ``QuantDiffError`` that says what is missing and how to get it.

FID Inception weights. The network below is pytorch-fid's ``FIDInceptionV3`` (the 2015-12-05 TF graph
that the original FID code uses), with the same state-dict key names, so pytorch-fid's published
``pt_inception-2015-12-05-6726825d.pth`` (from https://github.com/mseitzer/pytorch-fid/releases) loads
once it is converted to safetensors. quantdiff never unpickles it; convert it once with::

    python -c "import torch; from safetensors.torch import save_file; sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True); save_file({k: v.contiguous() for k, v in sd.items()}, 'pt_inception-2015-12-05.safetensors')"

CLIPScore needs a full CLIP model folder (``CLIPModel.save_pretrained`` layout, e.g. a local copy of
openai/clip-vit-large-patch14 with ``model.safetensors``); ImageReward needs the optional
``image-reward`` package, its ``ImageReward.pt`` checkpoint and ``med_config.json``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from quantdiff.errors import QuantDiffError
from quantdiff.evaluation.metrics import fid_from_features

INCEPTION_FEATURES = 2048
INCEPTION_SIZE = 299
# The TF graph's classifier has 1008 outputs (1000 ImageNet classes + 8 unused); kept so the keys match.
INCEPTION_CLASSES = 1008
_INCEPTION_HOWTO = (
    "download pt_inception-2015-12-05-6726825d.pth from https://github.com/mseitzer/pytorch-fid/releases and "
    "convert it once to safetensors (recipe in the docstring of quantdiff.evaluation.real_metrics)"
)


# --- FID Inception (pytorch-fid's FIDInceptionV3) --------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU: every convolution of InceptionV3."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TF's average pool ignores the zero padding at the borders; torch counts it unless told not to.

    This is the one difference between pytorch-fid's FID blocks and torchvision's InceptionA/C/E.
    """
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches; 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)  # (B, 64, H, W)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))  # (B, 64, H, W)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, H, W)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))  # (B, pool_features, H, W)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): strided 3x3, strided double 3x3 and max pool; 480 + C_in channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)  # (B, 384, H', W')
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, H', W')
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, C_in, H', W')
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 1x7 / 7x1 convolutions; 768 channels out."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)  # (B, 192, H, W)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (B, 192, H, W)
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)  # ends (B, 192, H, W)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))  # (B, 192, H, W)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and max pool; 512 + C_in out."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))  # (B, 320, H', W')
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)  # ends (B, 192, H', W')
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, C_in, H', W')
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 branches; 2048 channels out.

    The TF graph pools differently in its two E blocks: Mixed_7b averages (ignoring padding), Mixed_7c
    takes the max, which is pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2. ``pool`` picks the variant;
    the weights are the same shape either way.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)  # (B, 320, H, W)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)  # (B, 768, H, W)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1
        )  # (B, 768, H, W)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)  # (B, 192, H, W)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in the TF FID graph (pt_inception-2015-12-05), returning the 2048-d pool features.

    Built with random weights; ``load_inception`` fills them. ``forward`` takes RGB in [0, 1] at any size
    and does what pytorch-fid does before the network: bilinear resize to 299x299 (align_corners False)
    and scaling to [-1, 1]. ``fc`` (the 1008-way classifier) is unused for FID but kept so the file's keys
    match pytorch-fid's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(INCEPTION_FEATURES, INCEPTION_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 2048) pool features."""
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


def _is_bn_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked`` is training bookkeeping: files may or may not carry it."""
    return key.endswith("num_batches_tracked")


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception network with the weights of a safetensors file, in eval mode on ``device``.

    Only safetensors is read (never a pickle), and the keys must be exactly pytorch-fid's: a file with
    missing or unexpected keys is refused rather than half-loaded, since a partially random Inception
    gives FIDs that look plausible and mean nothing.

    Raises:
        QuantDiffError: the file is missing, is not safetensors (e.g. the original ``.pth``), or its
            keys or shapes are not those of the FID Inception.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise QuantDiffError(f"FID Inception weights {path} not found; {_INCEPTION_HOWTO}")
    with path.open("rb") as f:
        is_zip = f.read(2) == b"PK"  # torch.save writes a zip archive
    if is_zip:
        raise QuantDiffError(f"{path} is a pickled torch checkpoint, which quantdiff does not load; {_INCEPTION_HOWTO}")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise QuantDiffError(f"{path} is not a readable safetensors file ({exc}); {_INCEPTION_HOWTO}") from exc

    model = FIDInceptionV3()
    expected = {key for key in model.state_dict() if not _is_bn_counter(key)}
    given = {key for key in tensors if not _is_bn_counter(key)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise QuantDiffError(
            f"{path} is not pytorch-fid's FID Inception: keys {' and '.join(parts)}; {_INCEPTION_HOWTO}"
        )
    state = {key: value for key, value in tensors.items() if not _is_bn_counter(key)}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise QuantDiffError(f"{path} has FID Inception keys with wrong shapes: {exc}") from exc
    return model.to(device).eval()


def _uint8_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be (N, H, W, 3) RGB, got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {images.dtype}")
    return images


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def inception_features(model: FIDInceptionV3, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 2048) float64 FID Inception pool features.

    Images are scaled to [0, 1] like pytorch-fid's ``ToTensor``; the model resizes them to 299x299.
    """
    images = _uint8_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)  # (B, H, W, 3)
            x = batch.permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, H, W) in [0, 1]
            chunks.append(model(x).double().cpu().numpy())  # (B, 2048)
    if not chunks:
        return np.zeros((0, INCEPTION_FEATURES))
    return np.concatenate(chunks)  # (N, 2048)


def _fid_cross_gram(features_a: np.ndarray, features_b: np.ndarray) -> float:
    r"""FID of the Gaussian fits computed in sample space, exact for any N and M.

    With centred features A (N, D) and B (M, D), Sigma_a = A^T A / (N-1) and Sigma_b = B^T B / (M-1). The
    non-zero eigenvalues of Sigma_a Sigma_b are those of (A B^T)(A B^T)^T / ((N-1)(M-1)), so
    tr((Sigma_a Sigma_b)^{1/2}) is the nuclear norm of the (N, M) cross-Gram matrix A B^T over
    sqrt((N-1)(M-1)). No D x D matrix square root: at D = 2048 scipy's ``sqrtm`` takes ~20 s on one core,
    and with fewer images than dimensions it is the ill-conditioned case pytorch-fid patches with eps.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    n, m = len(a), len(b)
    centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)  # (N, D), (M, D)
    cross = centred_a @ centred_b.T  # (N, M)
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = a.mean(axis=0) - b.mean(axis=0)  # (D,)
    trace_a = np.sum(centred_a**2) / (n - 1)
    trace_b = np.sum(centred_b**2) / (m - 1)
    return float(max(diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt, 0.0))


def inception_fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) / (M, D) feature sets, e.g. cached ``inception_features`` outputs.

    Small sets (N * M <= D^2, i.e. up to about D images each) go through the exact sample-space formula
    ``_fid_cross_gram``; larger ones through ``fid_from_features`` (the covariance route of pytorch-fid),
    where the D x D square root is the cheaper of the two. Both compute the same quantity.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or len(a) < 2 or len(b) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if len(a) * len(b) <= a.shape[1] ** 2:
        return _fid_cross_gram(a, b)
    return fid_from_features(a, b)


def inception_fid(model: FIDInceptionV3, images_a: np.ndarray, images_b: np.ndarray, batch_size: int = 32) -> float:
    """FID between two uint8 (N, H, W, 3) image sets with the FID Inception network.

    FID is biased upward for small sets; published numbers use 10k-50k images, and the FID paper
    recommends at least 2048 (the feature size) per set. Only compare FIDs computed on equal counts.
    """
    features_a = inception_features(model, _uint8_images(images_a, "images_a"), batch_size)
    features_b = inception_features(model, _uint8_images(images_b, "images_b"), batch_size)
    return inception_fid_from_features(features_a, features_b)


# --- CLIPScore ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipBundle:
    """A CLIP model with the tokenizer and (PIL-backend) image processor saved next to it."""

    model: nn.Module
    tokenizer: object
    image_processor: object


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> ClipBundle:
    """Loads a local CLIP folder (model, tokenizer, image processor) with ``local_files_only=True``.

    The image processor is transformers' PIL backend: the default ``CLIPImageProcessor`` wants
    torchvision, which does not install next to CPU torch. Weights must be safetensors (no pickles).

    Raises:
        QuantDiffError: the folder is missing, is not a full CLIP model (a Stable Diffusion
            ``text_encoder`` is only CLIP's text half), or lacks tokenizer / preprocessor files.
    """
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    howto = "CLIPScore needs a full CLIP model folder saved with save_pretrained, e.g. openai/clip-vit-large-patch14"
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise QuantDiffError(f"CLIP model folder {folder} not found; {howto}")
    if not config_file.is_file():
        raise QuantDiffError(f"{folder} has no config.json, so it is not a transformers model; {howto}")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise QuantDiffError(f"{config_file} is not a valid model config ({exc})") from exc
    if model_type in ("clip_text_model", "clip_vision_model"):
        raise QuantDiffError(f"{folder} holds only half of CLIP ({model_type}); {howto}")
    if model_type != "clip":
        raise QuantDiffError(f"{folder} is a {model_type!r} model, not CLIP; {howto}")
    if not (folder / "preprocessor_config.json").is_file():
        raise QuantDiffError(f"{folder} has no preprocessor_config.json (the CLIP image processor); {howto}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise QuantDiffError(f"{folder} has no CLIP tokenizer (tokenizer.json or vocab.json + merges.txt); {howto}")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        image_processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise QuantDiffError(f"could not load the CLIP model in {folder}: {exc}") from exc
    return ClipBundle(model=model.to(device).eval(), tokenizer=tokenizer, image_processor=image_processor)


def _pil_images(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> list[Image.Image]:
    """uint8 (N, H, W, 3) array or a sequence of (H, W, 3) arrays / PIL images -> RGB PIL images."""
    if isinstance(images, np.ndarray):
        images = list(_uint8_images(images))
    pil = []
    for image in images:
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
                raise ValueError(f"each image must be (H, W, 3) uint8 RGB, got {array.shape} {array.dtype}")
            image = Image.fromarray(array)
        pil.append(image.convert("RGB"))
    return pil


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projection; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_embeddings(
    bundle: ClipBundle, images: np.ndarray | Sequence[np.ndarray | Image.Image], prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm CLIP embeddings: ((N, P) images, (N, P) prompts), float32 on CPU.

    Prompts longer than CLIP's context are truncated by the tokenizer (the end-of-text token is kept,
    which CLIP pools on; torchmetrics cuts the ids instead and warns).
    """
    pil = _pil_images(images)
    prompts = list(prompts)
    if len(pil) != len(prompts):
        raise ValueError(f"got {len(pil)} images but {len(prompts)} prompts")
    device = _model_device(bundle.model)
    max_length = bundle.model.config.text_config.max_position_embeddings
    with torch.no_grad():
        pixels = bundle.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(device)  # (N, 3, S, S)
        tokens = bundle.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        image_emb = _pooled(bundle.model.get_image_features(pixel_values=pixels))  # (N, P)
        text_emb = _pooled(
            bundle.model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        )  # (N, P)
    image_emb = F.normalize(image_emb.float(), dim=-1).cpu()
    text_emb = F.normalize(text_emb.float(), dim=-1).cpu()
    return image_emb, text_emb


def clip_scores(
    bundle: ClipBundle,
    images: np.ndarray | Sequence[np.ndarray | Image.Image],
    prompts: Sequence[str],
    batch_size: int = 32,
) -> np.ndarray:
    """(N,) per-image CLIPScore: 100 * max(cos(image embedding, prompt embedding), 0), in [0, 100].

    Hessel et al. 2021 ("CLIPScore: a reference-free evaluation metric for image captioning") with
    torchmetrics' weight of 100 instead of 2.5.
    """
    pil, prompts = _pil_images(images), list(prompts)
    if len(pil) != len(prompts):
        raise ValueError(f"got {len(pil)} images but {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scores = []
    for start in range(0, len(pil), batch_size):
        image_emb, text_emb = clip_embeddings(
            bundle, pil[start : start + batch_size], prompts[start : start + batch_size]
        )  # (B, P) each
        scores.append((100.0 * (image_emb * text_emb).sum(dim=-1)).clamp(min=0.0).double().numpy())  # (B,)
    return np.concatenate(scores) if scores else np.zeros(0)


def clip_score(
    bundle: ClipBundle,
    images: np.ndarray | Sequence[np.ndarray | Image.Image],
    prompts: Sequence[str],
    batch_size: int = 32,
) -> float:
    """Mean CLIPScore of images against their prompts (one prompt per image), in [0, 100].

    Clamps each image's score at 0 before averaging (the documented formula); torchmetrics' code clamps
    the mean instead. With a trained CLIP the cosines are positive and the two agree.
    """
    scores = clip_scores(bundle, images, prompts, batch_size)
    if len(scores) == 0:
        raise ValueError("clip_score needs at least one image")
    return float(scores.mean())


# --- ImageReward -------------------------------------------------------------------------------------------

_IMAGE_REWARD_HOWTO = (
    "get ImageReward.pt and med_config.json from https://huggingface.co/THUDM/ImageReward on a machine with "
    "internet and pass their local paths"
)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration of the block, restored afterwards.

    ImageReward's BLIP loads its BERT tokenizer by hub name (``bert-base-uncased``); offline it is taken
    from the local cache or fails, instead of being downloaded.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_image_reward(checkpoint: str | Path, med_config: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Builds the ImageReward model (Xu et al. 2023) from local files, in eval mode on ``device``.

    Needs the optional ``image-reward`` package (imported only here), the checkpoint ``ImageReward.pt``
    (converted once to ``.safetensors``: quantdiff never unpickles user files) and the
    BLIP text-encoder config ``med_config.json``. ``ImageReward.load`` is not used: it fetches
    med_config.json from the hub every time.

    Raises:
        QuantDiffError: listing every missing piece (package, checkpoint, config, cached BERT tokenizer)
            and how to get it, or a checkpoint that is not ImageReward's.
    """
    checkpoint, med_config = Path(checkpoint), Path(med_config)
    problems = []
    if not checkpoint.is_file():
        problems.append(f"ImageReward checkpoint {checkpoint} not found")
    if not med_config.is_file():
        problems.append(f"BLIP config {med_config} not found")
    model_class = None
    try:
        from ImageReward.ImageReward import ImageReward as model_class
    except ModuleNotFoundError as exc:
        if exc.name == "ImageReward":
            problems.append(
                "the optional ImageReward package is not installed (pip install image-reward; it needs torchvision and timm)"
            )
        else:
            problems.append(f"the ImageReward package needs {exc.name!r}, which is not installed")
    except Exception as exc:  # a broken optional dependency must not look like a quantdiff bug
        problems.append(f"the ImageReward package failed to import ({type(exc).__name__}: {exc})")
    if problems:
        raise QuantDiffError(f"ImageReward is unavailable: {'; '.join(problems)}; {_IMAGE_REWARD_HOWTO}")

    try:
        with _hub_offline():
            model = model_class(med_config=str(med_config), device=str(device))
    except OSError as exc:
        raise QuantDiffError(
            "ImageReward's BLIP needs the bert-base-uncased tokenizer in the Hugging Face cache and quantdiff "
            "does not download it; on a machine with internet run "
            "`python -c \"from transformers import BertTokenizer; BertTokenizer.from_pretrained('bert-base-uncased')\"` "
            f"and copy ~/.cache/huggingface ({exc})"
        ) from exc
    if checkpoint.suffix != ".safetensors":
        raise QuantDiffError(
            f"{checkpoint}: quantdiff reads checkpoints only as safetensors (it never unpickles files); convert "
            "ImageReward.pt once with torch.load(..., weights_only=True) and safetensors.torch.save_file"
        )
    try:
        from safetensors.torch import load_file

        state = load_file(str(checkpoint), device="cpu")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise QuantDiffError(f"{checkpoint} is not a loadable ImageReward state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise QuantDiffError(f"{checkpoint} does not hold a state dict")
    # Upstream loads with strict=False (the file and the class differ in a few buffers); refuse only a file
    # that cannot be ImageReward's: one without the reward head or sharing no key with the model.
    own_keys = set(model.state_dict())
    if not any(key.startswith("mlp.") for key in state) or not own_keys & set(state):
        raise QuantDiffError(f"{checkpoint} is not an ImageReward checkpoint (no reward head weights)")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def image_reward_scores(
    model: nn.Module, images: np.ndarray | Sequence[np.ndarray | Image.Image], prompts: Sequence[str]
) -> np.ndarray:
    """(N,) ImageReward of each image for its prompt (normalised: about 0 mean, 1 std on its test set)."""
    pil, prompts = _pil_images(images), list(prompts)
    if len(pil) != len(prompts):
        raise ValueError(f"got {len(pil)} images but {len(prompts)} prompts")
    with torch.no_grad():
        return np.array([float(model.score(prompt, image)) for image, prompt in zip(pil, prompts, strict=True)])


def image_reward(
    checkpoint: str | Path,
    med_config: str | Path,
    images: np.ndarray | Sequence[np.ndarray | Image.Image],
    prompts: Sequence[str],
    device: str | torch.device = "cpu",
) -> float:
    """Mean ImageReward of images against their prompts, from local files only (see ``load_image_reward``)."""
    pil, prompts = _pil_images(images), list(prompts)  # checked before the (large) model loads
    if len(pil) != len(prompts) or not pil:
        raise ValueError(f"image_reward needs one prompt per image and at least one, got {len(pil)} and {len(prompts)}")
    model = load_image_reward(checkpoint, med_config, device)
    return float(image_reward_scores(model, pil, prompts).mean())
