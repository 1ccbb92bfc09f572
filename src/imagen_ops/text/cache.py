"""The on-disk embedding cache: the frozen encoder runs once per distinct caption.

Layout of a cache directory (written atomically as a whole):

    manifest.json   encoder name, kind, weights id, max_length, layer, batch_size (the
                    encoder's pass size), extra layers, dim, stored length L,
                    caption-table hash, counts
    tokens.npy      (U, L, D) float16 token embeddings of the U distinct captions at
                    text.layer, padding 0
    tokens_layer<k>.npy   the same at each extra layer k (the scorer's, text.scorer_layer,
                    where it differs): one pass through the encoder gives both
    lengths.npy     (U,) int32 number of real tokens per distinct caption
    index.npy       (N,) int32 row of each prepared record's caption in tokens.npy
    captions.json   the U distinct captions

Synthetic captions repeat a lot (6,000 scenes have ~2,000 distinct captions), and L is the
longest caption actually seen rather than max_length, so the cache stays small.
The trainer and the evaluator read embeddings only from here; a cache whose manifest
disagrees with params.yaml or with the caption table is an error, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from imagen_ops.config import TextConfig
from imagen_ops.files import atomic_dir
from imagen_ops.text.encoders import TextEmbeddings, TextEncoder

__all__ = [
    "CACHE_VERSION",
    "CacheMismatchError",
    "EmbeddingCache",
    "build_cache",
    "captions_digest",
    "encode_captions",
    "stored_rows",
]

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class CacheMismatchError(ValueError):
    """The cache was built with other text settings (encoder, max_length, layer,
    batch_size) or for other captions."""


def captions_digest(captions: Sequence[str]) -> str:
    """Hash of the ordered caption list: identifies which records a cache serves."""
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode())
        h.update(b"\0")
    return h.hexdigest()


def _expected(cfg: TextConfig) -> dict[str, Any]:
    """The manifest fields that must agree with params.yaml's text section."""
    return {
        "encoder": cfg.encoder,
        "revision": cfg.revision,
        "max_length": cfg.max_length,
        "layer": cfg.layer,
        "batch_size": cfg.batch_size,  # the pass size moves float16 steps on some CPUs
        "dtype": cfg.dtype,  # the encoder's precision moves every embedding
    }


def _layer_file(layer: int) -> str:
    return f"tokens_layer{layer}.npy"


def build_cache(
    captions: Sequence[str],
    encoder: TextEncoder,
    out_dir: str | Path,
    *,
    extra_layers: Sequence[int] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every distinct caption once, at `text.layer` and at each of `extra_layers`,
    and write the cache; returns the manifest."""
    unique = list(dict.fromkeys(captions))
    row = {c: i for i, c in enumerate(unique)}
    index = np.array([row[c] for c in captions], dtype=np.int32)
    extra = [k for k in dict.fromkeys(extra_layers) if k != encoder.cfg.layer]
    tokens, lengths, truncated = encode_captions(
        unique, encoder, progress, [encoder.cfg.layer, *extra]
    )
    if np.isinf(tokens).any():
        raise FloatingPointError("embeddings overflow float16; use a smaller encoder dtype range")
    manifest = {
        "version": CACHE_VERSION,
        **_expected(encoder.cfg),
        "extra_layers": extra,
        "kind": encoder.kind,
        "weights_id": encoder.weights_id,
        "dim": encoder.dim,
        "stored_length": tokens.shape[2],
        "captions_sha256": captions_digest(captions),
        "num_records": len(captions),
        "num_unique": len(unique),
        "num_truncated": truncated,
    }
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "tokens.npy", tokens[0])
        for k, layer in enumerate(extra, start=1):
            np.save(tmp / _layer_file(layer), tokens[k])
        np.save(tmp / "lengths.npy", lengths)
        np.save(tmp / "index.npy", index)
        (tmp / "captions.json").write_text(json.dumps(unique, indent=0))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    log.info(
        "encoded %d distinct captions of %d records into %s", len(unique), len(captions), out_dir
    )
    return manifest


def encode_captions(
    unique: Sequence[str],
    encoder: TextEncoder,
    progress: bool = True,
    layers: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Token embeddings (K, N, W, D) at each of the K `layers` (default: text.layer) as
    stored (float16), lengths (N,) and the number of captions truncated to max_length, for
    captions in the given order, filled one encoder pass at a time."""
    layers = [encoder.cfg.layer] if layers is None else list(layers)
    lengths_full = encoder.token_lengths(unique)
    truncated = len(encoder.truncated(lengths_full))
    if truncated:
        log.warning(
            "%d of %d distinct captions exceed max_length=%d tokens and were truncated",
            truncated,
            len(unique),
            encoder.max_length,
        )
    width = encoder.stored_width(lengths_full)
    tokens = np.zeros((len(layers), len(unique), width, encoder.dim), dtype=np.float16)
    lengths = np.zeros(len(unique), dtype=np.int32)
    bar = tqdm(total=len(unique), desc="encode_text", unit="caption", disable=not progress)
    for rows, embs in encoder.iter_passes(unique, lengths_full, layers):
        for k, emb in enumerate(embs):
            values = emb.tokens[:, :width].numpy()
            if not np.isfinite(values).all():
                raise FloatingPointError(f"{encoder.name} produced non-finite embeddings")
            tokens[k, rows, : values.shape[1]] = values.astype(np.float16)
        lengths[rows] = embs[0].mask.sum(1).numpy()  # one mask for every layer
        bar.update(len(rows))
    bar.close()
    return tokens, lengths, truncated


def stored_rows(tokens: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> TextEmbeddings:
    """Rows of stored (N, W, D) tokens as embeddings, trimmed to the longest of them."""
    rows = np.asarray(rows)
    width = max(int(lengths[rows].max()), 1)
    values = torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])).float()
    mask = torch.arange(width)[None, :] < torch.from_numpy(lengths[rows])[:, None].long()
    return TextEmbeddings(values, mask)


class EmbeddingCache:
    """Read side of the cache: `lookup(record_indices)` gives the batch's embeddings (at
    text.layer, or at an extra layer the cache holds)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.tokens = np.load(root / "tokens.npy", mmap_mode="r")
        self.lengths = np.load(root / "lengths.npy")
        self.index = np.load(root / "index.npy")
        self._extra: dict[int, np.ndarray] = {}  # extra layers, mapped on first use

    @classmethod
    def open(
        cls, root: str | Path, cfg: TextConfig | None = None, captions: Sequence[str] | None = None
    ) -> EmbeddingCache:
        """Open a cache, checking it against the text config and the caption list if given."""
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{root} is not an embedding cache (no manifest.json); "
                "run `imagen-ops encode-text` (DVC stage encode_text)"
            )
        manifest = json.loads(path.read_text())
        if manifest.get("version") != CACHE_VERSION:
            raise CacheMismatchError(
                f"{root}: cache version {manifest.get('version')}, "
                f"expected {CACHE_VERSION}; rebuild it"
            )
        wanted = _expected(cfg) if cfg is not None else {}
        if captions is not None:
            wanted["captions_sha256"] = captions_digest(captions)
        for key, value in wanted.items():
            if manifest.get(key) != value:
                raise CacheMismatchError(
                    f"{root}: built with {key}={manifest.get(key)!r} but {value!r} is expected; "
                    "rebuild it with `imagen-ops encode-text` (or `dvc repro encode_text`)"
                )
        return cls(root, manifest)

    def check_encoder(self, encoder: Any) -> None:
        """Embeddings mixed with `encoder`'s own (the scorer's hard negatives) must come
        from the same weights: a local encoder folder can change under the same name."""
        for key in ("kind", "weights_id"):
            built, loaded = self.manifest.get(key), getattr(encoder, key)
            if built != loaded:
                raise CacheMismatchError(
                    f"{self.root}: built by encoder {key}={built!r}, but the loaded encoder "
                    f"has {loaded!r}; rebuild it with `imagen-ops encode-text` (or `dvc "
                    "repro encode_text`)"
                )

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.index)

    def row_of_caption(self) -> dict[str, int]:
        """The row of each distinct caption the cache holds."""
        captions = json.loads((self.root / "captions.json").read_text())
        return {c: i for i, c in enumerate(captions)}

    def layer_tokens(self, layer: int | None = None) -> np.ndarray:
        """The stored (U, L, D) tokens at `layer` (None: text.layer's)."""
        main = self.manifest.get("layer", -1)  # caches from before text.layer: the last
        if layer is None or layer == main:
            return self.tokens
        held = self.manifest.get("extra_layers", [])
        if layer not in held:
            raise CacheMismatchError(
                f"{self.root} holds the encoder's layers {[main, *held]}, not {layer} "
                "(text.scorer_layer): rebuild it with `imagen-ops encode-text` "
                "(or `dvc repro encode_text`)"
            )
        if layer not in self._extra:
            self._extra[layer] = np.load(self.root / _layer_file(layer), mmap_mode="r")
        return self._extra[layer]

    def rows(self, rows: np.ndarray, layer: int | None = None) -> TextEmbeddings:
        """Embeddings of distinct-caption rows at `layer` (None: text.layer), trimmed to the
        longest of them."""
        return stored_rows(self.layer_tokens(layer), self.lengths, rows)

    def lookup(self, record_indices: np.ndarray, layer: int | None = None) -> TextEmbeddings:
        """Embeddings of prepared records (by their index in the prepared table)."""
        return self.rows(self.index[np.asarray(record_indices)], layer)
