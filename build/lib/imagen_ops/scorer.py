"""A contrastive text-image scorer: CLIP's recipe, at this project's scale and without CLIP.

Two towers map an image and a caption into one unit sphere (Radford et al. 2021): a small
CNN over the image at the base stage's resolution, and a text head over the frozen
encoder's token embeddings, from the same cache as the cascade's (no second text encoder)
but at its own layer, `text.scorer_layer`: the last by default, which a sentence encoder
trains for similarity, while the U-Net may read an earlier one that binds words better
(relation flips were read at 0.72-0.90 over three seeds from MiniLM's layer 3, 0.88-0.94
from its last). The image tower ends in a linear layer over the whole final feature
map, not a global pool, so where things are survives into the embedding (relations need
it: over three seeds an 8 x 8 map read relation flips at 0.88-0.94, a 4 x 4 one at
0.72-0.94); the text head adds position encodings to the tokens, runs one self-attention
layer over them and pools them with a learned query, so word order and which word goes with
which can matter (without positions, "a red circle above a blue square" and "a blue square
above a red circle" would be one set of tokens: relations were read at chance).

`Scorer.similarity` gives the cosine of image and caption, the basis of the in-domain CLIP
score (100 x max(cos, 0), CLIP score's convention) and of best-of-N reranking.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from imagen_ops.config import ScorerConfig
from imagen_ops.files import atomic_dir, sha256_files
from imagen_ops.models.layers import Linear
from imagen_ops.models.unet import TransformerLayer, multihead_attention, position_encoding
from imagen_ops.text.encoders import TextEmbeddings

__all__ = ["SCORER_FORMAT", "Scorer", "load_scorer", "scorer_digest"]

SCORER_FORMAT = 4  # 2: text position encodings; 3: scorer.map_size; 4: text_layer


class ImageTower(nn.Module):
    def __init__(self, cfg: ScorerConfig, resolution: int):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.GELU()]
        size, width = resolution, c
        while size > cfg.map_size:
            out = min(2 * width, 4 * c)
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1),
                nn.GroupNorm(8, out),
                nn.GELU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.GroupNorm(8, out),
                nn.GELU(),
            ]
            size, width = size // 2, out
        self.body = nn.Sequential(*layers)
        self.head = Linear(width * size * size, cfg.embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        # channels_last: on the CPU, oneDNN's convolutions at these widths (16-64 channels)
        # train 15-25% faster in NHWC (BENCHMARKS: the scorer's step); values agree to ~1e-7
        x = self.body(images.contiguous(memory_format=torch.channels_last))
        return self.head(x.flatten(1))


class TextHead(nn.Module):
    def __init__(self, cfg: ScorerConfig, text_dim: int):
        super().__init__()
        w = cfg.text_width
        self.proj = Linear(text_dim, w)
        self.layer = TransformerLayer(w, 4)
        self.query = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.pool = nn.MultiheadAttention(w, 4, batch_first=True)  # its parameters
        self.out = nn.Sequential(nn.LayerNorm(w), Linear(w, cfg.embed_dim))

    def forward(self, text: TextEmbeddings) -> Tensor:
        x = self.proj(text.tokens)
        x = self.layer(x + position_encoding(*x.shape[1:], x.device).to(x), text.mask)
        query = self.query.expand(len(x), -1, -1)
        return self.out(multihead_attention(self.pool, x, text.mask, query)[:, 0])


class Scorer(nn.Module):
    """Image and caption embeddings on the unit sphere, and a learned temperature."""

    def __init__(self, cfg: ScorerConfig, resolution: int, text_dim: int, text_layer: int = -1):
        super().__init__()
        self.cfg, self.resolution, self.text_dim = cfg, resolution, text_dim
        self.text_layer = text_layer  # the encoder layer it reads (text.scorer_layer)
        self.image = ImageTower(cfg, resolution)
        self.text = TextHead(cfg, text_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init
        self.sha256: str | None = None  # scorer_digest of the files it was loaded from

    def embed_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1], any size (resized to the scorer's resolution)."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=self.resolution, mode="area")
        return F.normalize(self.image(images), dim=-1)

    def embed_text(self, text: TextEmbeddings) -> Tensor:
        return F.normalize(self.text(text), dim=-1)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(100)).exp()

    @torch.no_grad()
    def similarity(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        """Cosine of each image with its own caption, (B,)."""
        return (self.embed_images(images) * self.embed_text(text)).sum(-1)

    def save(self, path: str | Path) -> None:
        config = {
            "format": SCORER_FORMAT,
            "scorer": self.cfg.model_dump(mode="json"),
            "resolution": self.resolution,
            "text_dim": self.text_dim,
            "text_layer": self.text_layer,
        }
        with atomic_dir(path) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "scorer.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def scorer_digest(path: str | Path) -> str:
    """sha256 over a saved scorer's config.json and weights: its identity, which metrics
    measured with it carry (like cascade_digest for the cascade)."""
    return sha256_files({name: Path(path) / name for name in ("config.json", "scorer.safetensors")})


def load_scorer(
    path: str | Path, device: str | torch.device = "cpu", cache_layer: int | None = None
) -> Scorer:
    """A trained scorer from its folder (config.json + scorer.safetensors), frozen.

    Format 3 (the same weights, no recorded layer) read the cache's `text.layer`: given it
    as `cache_layer`, such a scorer still loads, so a champion registered before format 4
    stays comparable on the next scheduled run."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} holds no scorer (no config.json): run `imagen-ops train-scorer` "
            "(or `dvc repro train_scorer`)"
        )
    cfg = json.loads(config_path.read_text())
    if cfg.get("format") == 3 and cache_layer is not None:
        cfg = {**cfg, "format": SCORER_FORMAT, "text_layer": cache_layer}
    if cfg.get("format") != SCORER_FORMAT:
        raise ValueError(
            f"{config_path}: scorer format {cfg.get('format')}, this version reads "
            f"{SCORER_FORMAT}: retrain it (`imagen-ops train-scorer`)"
        )
    scorer = Scorer(
        ScorerConfig.model_validate(cfg["scorer"]),
        cfg["resolution"],
        cfg["text_dim"],
        cfg["text_layer"],
    )
    scorer.load_state_dict(load_file(str(path / "scorer.safetensors")))
    scorer.sha256 = scorer_digest(path)
    return scorer.to(device).eval().requires_grad_(False)
