"""The `prepare` stage: `data/` -> per-resolution uint8 arrays + caption table + split.

Each image is center-cropped to a square and resized to every cascade resolution (a box
filter when downsampling, which is exact for the box-supersampled synthetic renders; BICUBIC
when upsampling), packed into memory-mapped `images_<res>/shard_<k>.npy` (N, H, W, 3) arrays.
The train/val split hashes each id with a salt, so a record keeps its split when data is
appended. The output directory is replaced as a whole, and the same data + params give
byte-identical files.

Layout of `out_dir`:
    manifest.json           resolutions, counts, shard sizes, split counts, source sha256
    captions.parquet        index, id, caption, split, scene (row i is image i)
    images_<res>/shard_<k>.npy
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from imagen_ops.config import PrepareConfig
from imagen_ops.data.ingest import TABLE, read_table
from imagen_ops.files import atomic_dir, atomic_path, sha256_file, write_json_atomic

__all__ = ["PreparedData", "PreparedImages", "prepare", "split_of", "square_resize"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PREPARED_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("scene", pa.string()),
    ]
)


def split_of(image_id: str, cfg: PrepareConfig) -> str:
    """ "val" iff sha256(salt:id) / 2**256 < val_fraction: stable under appends. `prepare`
    passes each row the id of the table's first row with its pixels, so a picture under
    two captions (or re-encoded) never sits in both splits."""
    digest = hashlib.sha256(f"{cfg.split_salt}:{image_id}".encode()).hexdigest()
    return "val" if int(digest, 16) / 2**256 < cfg.val_fraction else "train"


def square_resize(im: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then resize to `size` (BOX down, BICUBIC up).

    Integer downsampling factors use `Image.reduce`: the same box mean as BOX resize, but
    exactly rounded (resize's fixed-point weights can be off by one level), and the same
    operation the synthetic renderer uses, so prepared synthetic images match renders.
    """
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = im.crop((left, top, left + side, top + side))
    if side == size:
        return square
    if side % size == 0:  # the BOX filter at an integer factor, rounded exactly
        return square.reduce(side // size)
    method = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
    return square.resize((size, size), method)


def _shard_name(k: int) -> str:
    return f"shard_{k}.npy"


def _check_resolutions(resolutions: list[int]) -> list[int]:
    if not resolutions or any(not isinstance(r, int) or r < 1 for r in resolutions):
        raise ValueError(f"resolutions must be positive integers, got {resolutions}")
    return sorted(set(resolutions))


def _load(data_dir: Path, row: Any) -> Image.Image:
    path = data_dir / row.path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: listed in {data_dir / TABLE} but missing: `dvc checkout data.dvc` "
            "restores data/ as data.dvc records it (`dvc pull` first without the cache; "
            "ingest adds only new content and does not restore a file)"
        )
    if sha256_file(path) != row.sha256:
        raise ValueError(f"{path}: sha256 differs from {data_dir / TABLE} (modified or corrupt)")
    with Image.open(path) as im:
        return im.convert("RGB")


def _write_shard(
    data_dir: Path, rows: pd.DataFrame, out_dir: Path, k: int, resolutions: list[int], bar: tqdm
) -> None:
    """Pack `rows` into shard `k` of every resolution (each file renamed into place)."""
    with ExitStack() as stack:
        tmps = {
            r: stack.enter_context(atomic_path(out_dir / f"images_{r}" / _shard_name(k)))
            for r in resolutions
        }
        arrays = {
            r: np.lib.format.open_memmap(
                tmps[r], mode="w+", dtype=np.uint8, shape=(len(rows), r, r, 3)
            )
            for r in resolutions
        }
        for j, row in enumerate(rows.itertuples(index=False)):
            im = _load(data_dir, row)
            for r in resolutions:
                arrays[r][j] = np.asarray(square_resize(im, r), dtype=np.uint8)
            bar.update()
        for r in resolutions:
            arrays[r].flush()
        arrays.clear()  # unmap before the renames


def prepare(
    data_dir: Path, out_dir: Path, resolutions: list[int], cfg: PrepareConfig, progress: bool = True
) -> dict[str, Any]:
    """Pack `data_dir` (an ingest output) into `out_dir`; returns the manifest."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    resolutions = _check_resolutions(resolutions)
    if not (data_dir / TABLE).is_file():
        raise FileNotFoundError(
            f"{data_dir / TABLE}: no ingest table "
            "(run `imagen-ops data ingest` or `data synth` first)"
        )
    if data_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"out_dir {out_dir} would replace data_dir {data_dir}; pick another")
    source_sha256 = sha256_file(data_dir / TABLE)
    table = read_table(data_dir)
    if table.empty:
        raise ValueError(f"{data_dir / TABLE}: no images to prepare")
    n = len(table)
    # one picture under several captions keeps to one split: the split of its first row
    first: dict[str, str] = {}
    keys = [first.setdefault(px, i) for i, px in zip(table["id"], table["sha256"], strict=True)]
    splits = [split_of(key, cfg) for key in keys]
    shard_sizes = [min(cfg.shard_size, n - start) for start in range(0, n, cfg.shard_size)]
    bar = tqdm(total=n, desc="prepare", unit="img", disable=not progress)
    with bar, atomic_dir(out_dir) as tmp:
        for k, start in enumerate(range(0, n, cfg.shard_size)):
            rows = table.iloc[start : start + cfg.shard_size]
            _write_shard(data_dir, rows, tmp, k, resolutions, bar)
        prepared = pa.table(
            {
                "index": np.arange(n, dtype=np.int64),
                "id": table["id"],
                "caption": table["caption"],
                "split": splits,
                "scene": table["scene"],
            },
            schema=PREPARED_SCHEMA,
        )
        pq.write_table(prepared, tmp / TABLE)
        manifest = {
            "count": n,
            "resolutions": resolutions,
            "shard_size": cfg.shard_size,
            "shard_sizes": shard_sizes,
            "splits": {s: splits.count(s) for s in SPLITS},
            "val_fraction": cfg.val_fraction,
            "split_salt": cfg.split_salt,
            "source_table_sha256": source_sha256,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    log.info("prepared %d images at %s into %s (%s)", n, resolutions, out_dir, manifest["splits"])
    return manifest


# ------------------------------------------------------------------------------ reader


class PreparedImages:
    """The (N, H, W, 3) uint8 images of one resolution, gathered across memory-mapped shards.

    Pickles as its file paths (each process maps the shards itself), so it can cross into
    DataLoader workers without copying the data.
    """

    def __init__(self, paths: list[Path], resolution: int) -> None:
        self.paths = list(paths)
        self.resolution = resolution
        self._open()

    def _open(self) -> None:
        self._shards = [np.load(p, mmap_mode="r") for p in self.paths]
        for p, shard in zip(self.paths, self._shards, strict=True):
            r = self.resolution
            if shard.dtype != np.uint8 or shard.shape[1:] != (r, r, 3):
                raise ValueError(
                    f"{p}: expected uint8 (N, {r}, {r}, 3), got {shard.dtype} {shard.shape}"
                )
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "resolution": self.resolution}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self.resolution = state["paths"], state["resolution"]
        self._open()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, idx: int | np.ndarray) -> np.ndarray:
        """Image `idx` (H, W, 3), or images at an integer index array (*idx.shape, H, W, 3)."""
        n = len(self)
        flat = np.asarray(idx)
        if flat.dtype.kind not in "iu":
            raise TypeError(f"index images with integers, got {flat.dtype}")
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        flat = flat.reshape(-1) % max(n, 1)
        shard_of = np.searchsorted(self._offsets, flat, side="right") - 1
        r = self.resolution
        out = np.empty((flat.size, r, r, 3), dtype=np.uint8)
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self._shards[s][flat[mask] - self._offsets[s]]
        return out.reshape(*np.shape(idx), r, r, 3)


@dataclass(eq=False)
class PreparedData:
    """Reader of a `prepare` output: the caption table, the split and the image arrays."""

    root: Path
    table: pd.DataFrame
    manifest: dict[str, Any]

    @classmethod
    def open(cls, out_dir: Path) -> PreparedData:
        root = Path(out_dir)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"{root / MANIFEST}: no prepared data (run the prepare stage)")
        manifest = json.loads((root / MANIFEST).read_text())
        table = pq.read_table(root / TABLE).to_pandas()
        if len(table) != manifest["count"]:
            raise ValueError(
                f"{root / TABLE}: {len(table)} rows, manifest says {manifest['count']}"
            )
        return cls(root, table, manifest)

    @property
    def resolutions(self) -> list[int]:
        return list(self.manifest["resolutions"])

    def __len__(self) -> int:
        return len(self.table)

    def images(self, resolution: int) -> PreparedImages:
        if resolution not in self.resolutions:
            raise ValueError(
                f"{self.root}: no images at {resolution} px (prepared: {self.resolutions})"
            )
        shards = len(self.manifest["shard_sizes"])
        paths = [self.root / f"images_{resolution}" / _shard_name(k) for k in range(shards)]
        images = PreparedImages(paths, resolution)
        if len(images) != len(self):
            raise ValueError(
                f"{self.root}/images_{resolution}: {len(images)} images, table has {len(self)}"
            )
        return images

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.table["index"].to_numpy()[self.table["split"].to_numpy() == split]
