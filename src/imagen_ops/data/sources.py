"""Readers that turn a data source into `RawRecord`s for `ingest`, in a deterministic order.

Formats: an image folder with same-stem `.txt` captions, a JSONL or CSV manifest, WebDataset
`.tar` shards, Hugging Face style parquet (image bytes or {"bytes", "path"} structs), and
the built-in synthetic shapes. Readers only read; every check of the content is `ingest`'s,
except one only a reader can make: tar members that are links, devices or whose names
escape the archive root are never read and arrive pre-rejected as `unsafe_path`.

`open_source` validates what it can up front (the path exists, the format is known, the
manifest has its columns) and raises `ValueError` / `FileNotFoundError` naming the file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagen_ops.config import IngestConfig, SynthConfig
from imagen_ops.data.ingest import RawRecord
from imagen_ops.data.shapes import synth_scenes

__all__ = ["detect_format", "open_source", "synth_source"]

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".json")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order within one sample
WDS_CAPTION_KEYS = ("caption", "text")  # json fallbacks after cfg.caption_column
PARQUET_BATCH_ROWS = 64


def open_source(source: str | Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    """Records of `source` in `cfg.format` ("auto": detected from the path)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    readers: dict[str, Callable[[Path, IngestConfig], Iterator[RawRecord]]] = {
        "folder": _folder,
        "jsonl": _jsonl,
        "csv": _csv,
        "webdataset": _webdataset,
        "parquet": _parquet,
    }
    log.info("reading %s as %s", path, fmt)
    return readers[fmt](path, cfg)


def synth_source(cfg: SynthConfig, workers: int = 0) -> Iterator[RawRecord]:
    """The synthetic shapes as records (source "synth", the scene spec attached)."""
    for rec in synth_scenes(cfg, workers):
        yield RawRecord(
            key=f"synth:{cfg.seed}:{rec.index}",
            data=rec.png,
            caption=rec.caption,
            source="synth",
            scene=rec.scene,
        )


def detect_format(path: Path) -> str:
    """Guess a source's format from its path; a clear error when it cannot tell.

    A file by its suffix; a directory is WebDataset if it directly holds .tar files,
    parquet if it holds .parquet files, else an image folder.
    """
    by_suffix = {".jsonl": "jsonl", ".csv": "csv", ".tar": "webdataset", ".parquet": "parquet"}
    if path.is_file():
        if path.suffix.lower() in by_suffix:
            return by_suffix[path.suffix.lower()]
        raise ValueError(
            f"{path}: cannot tell the source format from the suffix "
            f"{path.suffix!r}; expected one of {sorted(by_suffix)} or a directory "
            "(set data.ingest.format)"
        )
    kinds = {p.suffix.lower() for p in path.iterdir() if p.is_file()} & {".tar", ".parquet"}
    if len(kinds) > 1:
        raise ValueError(
            f"{path}: cannot tell the source format: it holds both .tar and .parquet files; "
            "set data.ingest.format"
        )
    if kinds:
        return by_suffix[kinds.pop()]
    return "folder"


def _expect_kind(path: Path, is_dir: bool, fmt: str) -> None:
    if path.is_dir() != is_dir:
        kind = "a directory" if is_dir else "a file"
        raise ValueError(f"{path}: format {fmt!r} expects {kind}")


def _read_optional(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _files(path: Path, suffix: str) -> list[Path]:
    """`path` itself, or the sorted `*suffix` files directly inside the directory `path`."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == suffix)
    if not files:
        raise ValueError(f"{path}: no {suffix} files in this directory")
    return files


# ----------------------------------------------------------------------------- folder


def _folder(root: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    """Every non-caption file under `root` (recursive, sorted; dot-files and symlinked
    directories are skipped), captioned by the same-stem `.txt` beside it."""
    _expect_kind(root, True, "folder")
    return _folder_records(root)


def _folder_records(root: Path) -> Iterator[RawRecord]:
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if Path(dirpath, d).is_symlink():
                log.warning("%s: symlinked directory not followed", Path(dirpath, d))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() in CAPTION_SUFFIXES:
                continue
            yield RawRecord(
                key=str(path),
                data=path.read_bytes(),
                caption=_read_optional(path.with_suffix(".txt")),
                source=str(root),
            )


# -------------------------------------------------------------------------- manifests


def _missing_columns(path: Path, present: list[str], cfg: IngestConfig) -> None:
    for column in (cfg.image_column, cfg.caption_column):
        if column not in present:
            raise ValueError(
                f"{path}: missing column {column!r} (columns present: {present}); "
                "set data.ingest.image_column / caption_column"
            )


def _manifest_record(manifest: Path, key: str, image: Any, caption: Any) -> RawRecord:
    """One manifest row: the image path is relative to the manifest's folder or absolute."""
    source = str(manifest)
    if not isinstance(image, str) or not image:
        return RawRecord(key, None, caption, source, reject_detail=f"no image path ({image!r})")
    path = Path(image) if Path(image).is_absolute() else manifest.parent / image
    data = _read_optional(path)
    detail = "" if data is not None else f"{path}: no such file"
    return RawRecord(f"{key} ({image})", data, caption, source, reject_detail=detail)


def _jsonl(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    """The first object serves as the header: it must have both columns."""
    _expect_kind(path, False, "jsonl")
    rows = _jsonl_rows(path)
    first = next(rows, None)
    rows.close()
    if first is not None:
        _missing_columns(path, list(first[1]), cfg)
    return _jsonl_records(path, cfg)


def _jsonl_records(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    for line_no, row in _jsonl_rows(path):
        yield _manifest_record(
            path, f"{path}:{line_no}", row.get(cfg.image_column), row.get(cfg.caption_column)
        )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; invalid UTF-8 survives as surrogates."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object per line")
            yield line_no, row


def _csv(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    _expect_kind(path, False, "csv")
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), [])
    _missing_columns(path, header, cfg)
    return _csv_records(path, cfg)


def _csv_records(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield _manifest_record(
                path,
                f"{path}:{reader.line_num}",
                row.get(cfg.image_column),
                row.get(cfg.caption_column),
            )


# -------------------------------------------------------------------------- webdataset


def _unsafe_name(name: str) -> str | None:
    """Why a tar member name escapes the archive root, or None if it does not."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts or ".." in name.split("\\"):
        return "'..' component"
    return None


def _unsafe_type(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"symlink -> {member.linkname}"
    if member.islnk():
        return f"hardlink -> {member.linkname}"
    if not member.isreg():
        return "device, fifo or other special member"
    return None


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset key and extension: the basename splits at its first dot."""
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p != "."]
    base = parts[-1] if parts else ""
    stem, _, ext = base.partition(".")
    return "/".join([*parts[:-1], stem]), ext.lower()


def _webdataset(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    shards = _files(path, ".tar")
    return (rec for shard in shards for rec in _tar_records(shard, cfg))


def _tar_records(shard: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    """Samples of one shard: consecutive members sharing a key, as WebDataset groups them."""
    key: str | None = None
    group: dict[str, bytes] = {}
    unsafe: str | None = None
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                where = f"{shard}:{member.name}"
                bad_name = _unsafe_name(member.name)
                if bad_name is not None:
                    yield RawRecord(
                        where, None, None, str(shard), reject="unsafe_path", reject_detail=bad_name
                    )
                    continue
                member_key, ext = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield _sample(shard, key, group, unsafe, cfg)
                    key, group, unsafe = member_key, {}, None
                bad_type = _unsafe_type(member)
                if bad_type is not None:
                    unsafe = unsafe or f"{member.name}: {bad_type}"
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    group[ext] = f.read()
            if key is not None:
                yield _sample(shard, key, group, unsafe, cfg)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{shard}: not a readable tar archive: {err}") from err


def _sample(
    shard: Path, key: str, group: dict[str, bytes], unsafe: str | None, cfg: IngestConfig
) -> RawRecord:
    where = f"{shard}:{key}"
    if unsafe is not None:
        return RawRecord(where, None, None, str(shard), reject="unsafe_path", reject_detail=unsafe)
    image = next((group[e] for e in WDS_IMAGE_EXTS if e in group), None)
    detail = "" if image is not None else f"no {'/'.join(WDS_IMAGE_EXTS)} member"
    if "txt" in group:
        return RawRecord(where, image, group["txt"], str(shard), reject_detail=detail)
    if "json" not in group:
        return RawRecord(where, image, None, str(shard), reject_detail=detail)

    def invalid(reason: str) -> RawRecord:
        return RawRecord(
            where, image, None, str(shard), reject="invalid_caption", reject_detail=reason
        )

    try:
        meta = json.loads(group["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return invalid(f"{key}.json is not valid JSON: {err}")
    caption = None
    if isinstance(meta, dict):
        for name in (cfg.caption_column, *WDS_CAPTION_KEYS):
            if meta.get(name) is not None:
                caption = meta[name]
                break
    return RawRecord(where, image, caption, str(shard), reject_detail=detail)


# ----------------------------------------------------------------------------- parquet


def _parquet(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    files = _files(path, ".parquet")
    for file in files:
        try:
            names = pq.read_schema(file).names
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{file}: not a readable parquet file: {err}") from err
        _missing_columns(file, names, cfg)
    return (rec for file in files for rec in _parquet_records(file, cfg))


def _parquet_image(file: Path, value: Any) -> tuple[bytes | None, str]:
    """Image bytes of a cell: raw bytes, a {"bytes", "path"} struct, or a path string."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"], ""
        value = value.get("path")
    if isinstance(value, bytes):
        return value, ""
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else file.parent / value
        data = _read_optional(path)
        return data, "" if data is not None else f"{path}: no such file"
    return None, "no image bytes or path"


def _parquet_records(file: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    columns = [cfg.image_column, cfg.caption_column]
    row = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        images = batch.column(cfg.image_column).to_pylist()
        captions = batch.column(cfg.caption_column).to_pylist()
        for image, caption in zip(images, captions, strict=True):
            key = f"{file}:{row}"
            row += 1
            data, detail = _parquet_image(file, image)
            yield RawRecord(key, data, caption, str(file), reject_detail=detail)
