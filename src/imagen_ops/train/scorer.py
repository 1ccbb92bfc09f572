"""Training the contrastive scorer (stage train_scorer), and measuring it where it matters.

Symmetric InfoNCE (CLIP): for a batch of B images and their captions, each image must pick
its caption among the batch's captions and its own hard negatives, each caption its image
among the batch's images. Captions repeat in this data ("a red circle" is hundreds of
records), so a pair whose captions are equal is masked out of the other's negatives
instead of being taught apart. Batches give each scene category the same share, and a
second loss ranks each image's caption against its own hard negatives alone (weight
`hard_negative_weight`). Hard negatives differ from the true caption in one
compositional fact (`shapes.hard_negatives`: colors swapped, relation flipped, count or
one attribute changed); captions without a scene spec get word-order swaps. They are
encoded once by the frozen text encoder, like the cache.

The held-out report is the accuracy at ranking the true caption above each kind of hard
negative for validation images: what a reranker or an alignment score relies on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from imagen_ops.config import ScorerConfig, TextConfig
from imagen_ops.data.prepare import PreparedData
from imagen_ops.data.shapes import NEGATIVE_KINDS, Scene, hard_negatives
from imagen_ops.files import write_json_atomic
from imagen_ops.images import from_uint8
from imagen_ops.scorer import Scorer
from imagen_ops.text.cache import EmbeddingCache, encode_captions, stored_rows
from imagen_ops.text.encoders import TextEmbeddings

__all__ = ["ScorerPaths", "negatives_for", "train_scorer", "word_swap"]

log = logging.getLogger(__name__)
SHUFFLE = "word_swap"  # the negative of a caption without a scene spec
BINDING_KINDS = ("color_swap", "relation_flip", "count_change")


@dataclass(frozen=True)
class ScorerPaths:
    prepared: Path
    cache: Path
    out: Path  # artifacts/scorer: config.json + scorer.safetensors
    metrics: Path  # reports/scorer.json


def word_swap(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with two different words swapped; None when it has no two."""
    words = caption.split()
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words))]
    pairs = [(i, j) for i, j in pairs if words[i] != words[j]]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def negatives_for(table: pd.DataFrame, records: np.ndarray, seed: int) -> list[dict[str, str]]:
    """Hard negative captions of each record, by kind (seeded by the record: stable)."""
    out = []
    for r in records:
        rng = np.random.default_rng([seed, int(r)])
        scene = table["scene"].iloc[r]
        if isinstance(scene, str):
            out.append(hard_negatives(Scene.from_dict(json.loads(scene)), rng))
        else:
            swapped = word_swap(table["caption"].iloc[r], rng)
            out.append({SHUFFLE: swapped} if swapped else {})
    return out


class _CaptionBank:
    """Every caption training uses (the records' own and their hard negatives) as token
    embeddings at the scorer's layer: copied from the cache where it holds the caption (the
    records' own, and negatives that are other records' captions), encoded once otherwise.
    A caption's row is its identity: equal rows, equal captions. By record position:
    `captions` (rows) and `rows` (negative rows by kind)."""

    def __init__(
        self,
        captions: list[str],
        negatives: list[dict[str, str]],
        cache: EmbeddingCache,
        encoder: Any,
        cfg: TextConfig,
        layer: int,
        progress: bool,
    ):
        unique = list(dict.fromkeys(captions + [c for d in negatives for c in d.values()]))
        self.row = {c: i for i, c in enumerate(unique)}
        self.captions = np.array([self.row[c] for c in captions])
        self.rows = [{k: self.row[c] for k, c in d.items()} for d in negatives]
        cached = cache.row_of_caption()
        held = [(i, cached[c]) for i, c in enumerate(unique) if c in cached]
        new = [c for c in unique if c not in cached]
        stored = cache.layer_tokens(layer)
        width = stored.shape[1]
        if new:
            (tokens,), lengths, _ = encode_captions(new, encoder, progress, [layer])
            width = max(width, tokens.shape[1])
        self.tokens = np.zeros((len(unique), width, cache.dim), dtype=np.float16)
        self.lengths = np.zeros(len(unique), dtype=np.int32)
        if held:
            rows, source = (np.array(v) for v in zip(*held, strict=True))
            self.tokens[rows, : stored.shape[1]] = stored[source]
            self.lengths[rows] = cache.lengths[source]
        if new:
            rows = np.array([self.row[c] for c in new])
            self.tokens[rows, : tokens.shape[1]], self.lengths[rows] = tokens, lengths
        log.info("scorer captions: %d from the cache, %d encoded", len(held), len(new))

    def sample(self, positions: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """k negative rows per position, -1 where none. The first ones are the record's
        binding negatives (colors swapped, relation flipped, count changed) in random
        order: those are what a bag of words cannot tell apart, and rarer than attribute
        changes; the others are drawn from every kind."""
        out = np.full((len(positions), k), -1)
        for i, p in enumerate(positions):
            kinds = self.rows[p]
            if not kinds:
                continue
            binding = [row for kind, row in kinds.items() if kind in BINDING_KINDS]
            out[i] = rng.choice(list(kinds.values()), size=k)
            first = rng.permutation(binding)[:k]
            out[i, : len(first)] = first
        return out

    def embeddings(self, rows: np.ndarray) -> TextEmbeddings:
        return stored_rows(self.tokens, self.lengths, rows)


def category_weights(table: pd.DataFrame, records: np.ndarray) -> np.ndarray | None:
    """Sampling probabilities that give every scene category the same share of batches
    (single prompts would otherwise outnumber each two-object category); None (uniform)
    for data without scene specs."""
    scenes = table["scene"].iloc[records]
    if not scenes.map(lambda s: isinstance(s, str)).all():
        return None
    category = scenes.map(lambda s: json.loads(s)["category"])
    weights = 1.0 / category.map(category.value_counts()).to_numpy(dtype=float)
    return weights / weights.sum()


def _lr(step: int, cfg: ScorerConfig) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def _loss(
    model: Scorer,
    images: torch.Tensor,
    embedded: torch.Tensor,
    caption_ids: np.ndarray,
    hard_weight: float,
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (the image's hard negatives among its captions),
    plus `hard_weight` x the cross-entropy of each image's true caption against its hard
    negatives alone: in-batch captions are easy and would otherwise drown out the few
    negatives that teach binding and relations.

    `embedded`: the B captions' text embeddings, then those of the k hard negatives of each image
    (image-major), k >= 0."""
    img = model.embed_images(images)
    b = len(img)
    text, neg = embedded[:b], embedded[b:]
    same = torch.from_numpy(caption_ids[:, None] == caption_ids[None, :]) & ~torch.eye(
        b, dtype=bool
    )
    i2t = model.scale * img @ text.T
    t2i = i2t.T.clone()
    i2t, t2i = i2t.masked_fill(same, -torch.inf), t2i.masked_fill(same, -torch.inf)
    target = torch.arange(b)
    hard_loss = torch.zeros(())
    if len(neg):
        hard = model.scale * torch.einsum("bd,bkd->bk", img, neg.view(b, -1, img.shape[1]))
        i2t = torch.cat([i2t, hard], dim=1)
        own = torch.cat([i2t[:, :b].diagonal()[:, None], hard], dim=1)
        hard_loss = F.cross_entropy(own, torch.zeros(b, dtype=torch.long))
    infonce = (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2
    return infonce + hard_weight * hard_loss


def _embed_rows(
    model: Scorer, embeddings: Callable[[np.ndarray], TextEmbeddings], rows: np.ndarray
) -> torch.Tensor:
    """`model.embed_text` of caption rows (`embeddings`: rows -> their token embeddings,
    `_CaptionBank.embeddings`) in one pass of the text head, each distinct row once:
    a step's captions and hard negatives repeat (~30% of the demo's rows), and two passes
    cost ~10% more than one (benchmarks/bench_scorer_step.py). Gathered by a one-hot
    matmul, not indexing: indexing's backward adds a repeated row's gradients atomically
    on the CPU, in an order that changes from run to run, and the weights with it."""
    unique, inverse = np.unique(rows, return_inverse=True)
    embedded = model.embed_text(embeddings(unique))
    return F.one_hot(torch.from_numpy(inverse), len(unique)).to(embedded.dtype) @ embedded


def train_scorer(
    cfg: ScorerConfig,
    text: TextConfig,
    resolution: int,
    paths: ScorerPaths,
    *,
    encoder: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the scorer on the train split, save it, and report it on the validation split.

    `encoder` (the frozen text encoder) is loaded from `text` when not given."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    prepared = PreparedData.open(paths.prepared)
    table = prepared.table
    cache = EmbeddingCache.open(paths.cache, text, table["caption"].tolist())
    cache.layer_tokens(text.scorer_layer)  # a cache without the scorer's layer fails here
    images = prepared.images(resolution)
    train, val = prepared.indices("train"), prepared.indices("val")
    if len(train) < cfg.batch_size:
        raise ValueError(
            f"{len(train)} training records, fewer than scorer.batch_size={cfg.batch_size}"
        )
    if encoder is None:
        from imagen_ops.text.encoders import load_text_encoder

        encoder = load_text_encoder(text)
    cache.check_encoder(encoder)  # its embeddings and the encoder's meet in one batch
    records = np.concatenate([train, val])
    bank = _CaptionBank(
        table["caption"].iloc[records].tolist(),
        negatives_for(table, records, cfg.seed),
        cache,
        encoder,
        text,
        text.scorer_layer,
        progress,
    )
    weights = category_weights(table, train)
    model = Scorer(cfg, resolution, cache.dim, text.scorer_layer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    bar = tqdm(range(cfg.steps), desc="train scorer", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        positions = rng.choice(len(train), size=cfg.batch_size, replace=False, p=weights)
        captions = text_rows = bank.captions[positions]
        if cfg.hard_negatives:
            rows = bank.sample(positions, cfg.hard_negatives, rng)
            if (rows >= 0).all():
                text_rows = np.concatenate([captions, rows.reshape(-1)])
        x = from_uint8(images[train[positions]])
        text_emb = _embed_rows(model, bank.embeddings, text_rows)
        loss = _loss(model, x, text_emb, captions, cfg.hard_negative_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    bar.close()
    model.eval().requires_grad_(False)
    window = max(1, cfg.steps // 10)
    report = {
        "loss_start": float(np.mean(losses[:window])),  # the first and last 10% of steps
        "loss_end": float(np.mean(losses[-window:])),
        "temperature": float(1 / model.scale),
        **held_out_accuracy(model, images, cache, bank, val, len(train)),
    }
    model.save(paths.out)
    write_json_atomic(paths.metrics, report)
    log.info("scorer: held-out hard-negative accuracy %s", report["hard_negative_accuracy"])
    return report


@torch.no_grad()
def held_out_accuracy(
    model: Scorer,
    images: Any,
    cache: EmbeddingCache,
    bank: _CaptionBank,
    val: np.ndarray,
    offset: int,
    batch: int = 256,
) -> dict[str, Any]:
    """How often a validation image scores its caption above each kind of hard negative."""
    wins: dict[str, list[bool]] = {}
    cosines = []
    for start in range(0, len(val), batch):
        records = val[start : start + batch]
        img = model.embed_images(from_uint8(images[records]))
        true = (img * model.embed_text(cache.lookup(records, model.text_layer))).sum(-1)
        cosines += true.tolist()
        for kind in (*NEGATIVE_KINDS, SHUFFLE):
            which = [i for i in range(len(records)) if kind in bank.rows[offset + start + i]]
            if not which:
                continue
            rows = np.array([bank.rows[offset + start + i][kind] for i in which])
            neg = (img[which] * model.embed_text(bank.embeddings(rows))).sum(-1)
            wins.setdefault(kind, []).extend((true[which] > neg).tolist())
    return {
        "hard_negative_accuracy": {k: float(np.mean(v)) for k, v in wins.items()},
        "hard_negative_n": {k: len(v) for k, v in wins.items()},
        "true_caption_cosine": float(np.mean(cosines)) if cosines else None,
    }
