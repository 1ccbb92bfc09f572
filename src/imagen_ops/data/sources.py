"""Readers that turn a data source into `RawRecord`s for `ingest`, in a deterministic order.

Formats: an image folder with same-stem `.txt` captions, a JSONL or CSV manifest, WebDataset
`.tar` shards, Hugging Face style parquet (image bytes or {"bytes", "path"} structs), and
the built-in synthetic shapes. Readers only read; every check of the content is `ingest`'s,
except those only a reader can make: tar members that are links, devices or whose names
escape the archive root are never read and arrive pre-rejected as `unsafe_path`, and a
folder's caption files that no image reads arrive as `missing_image`.

`open_source` validates what it can up front (the path exists, the format is known, the
manifest has its columns) and raises `ValueError` / `FileNotFoundError` naming the file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagen_ops.config import IngestConfig, SynthConfig
from imagen_ops.data.ingest import RawRecord, read_table
from imagen_ops.data.shapes import synth_scenes

__all__ = ["detect_format", "open_source", "synth_source"]

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".json")
# every format ingest decodes (ingest.FORMATS), in preference order within one sample
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
IMAGE_SUFFIXES = {f".{ext}" for ext in WDS_IMAGE_EXTS}
"""Files that make a folder of WebDataset shards ambiguous: it could be a folder source."""
SYNTH = "synth"  # the source label of synthetic records
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


SYNTH_CHECKED = 64  # scenes a later run renders again to check data/ against the settings


def synth_count(data_dir: Path, cfg: SynthConfig) -> int:
    """How many synthetic scenes `data_dir` already holds, once its first scenes are found
    to be the ones `cfg` renders: a later run only appends, so scenes rendered under other
    `data.synth` settings (a seed, a mix, `caption_variety`) would stay, silently."""
    held = read_table(data_dir)
    held = held[held["source"] == SYNTH]
    sizes = sorted({*held["width"], *held["height"]})
    if sizes and sizes != [cfg.resolution]:
        raise ValueError(
            f"{data_dir} holds synthetic scenes of {sizes} px, data.synth.resolution is "
            f"{cfg.resolution}: restore the resolution it was made with, or move {data_dir} "
            "away to render it afresh"
        )
    check = cfg.model_copy(update={"n": min(len(held), SYNTH_CHECKED)})
    for rec, (caption, scene) in zip(
        synth_scenes(check), zip(held["caption"], held["scene"], strict=True), strict=False
    ):
        if caption != rec.caption or json.loads(scene) != rec.scene:
            raise ValueError(
                f"{data_dir} holds synthetic scenes rendered under other data.synth settings "
                f"(scene {rec.index} is {caption!r}; these settings make {rec.caption!r}): "
                f"restore the settings it was made with, or move {data_dir} away to render it "
                "afresh"
            )
    return len(held)


def synth_source(cfg: SynthConfig, workers: int = 0, have: int = 0) -> Iterator[RawRecord]:
    """The synthetic shapes as records (source "synth", the scene spec attached).

    With `have` scenes already ingested, only the new ones are rendered: scenes 0..n-1 on
    the first run, then `new_per_run` more per run (scene i depends on (seed, i) only, so
    the growing data set is the same whatever the run it was rendered in)."""
    target = max(cfg.n, have + cfg.new_per_run) if have else cfg.n
    for rec in synth_scenes(cfg.model_copy(update={"n": target}), workers, start=have):
        yield RawRecord(
            key=f"synth:{cfg.seed}:{rec.index}",
            data=rec.png,
            caption=rec.caption,
            source=SYNTH,
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
    suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file() and p.name[0] != "."}
    kinds = suffixes & {".tar", ".parquet"}
    images = kinds == {".tar"} and suffixes & IMAGE_SUFFIXES  # parquet may name side files
    if len(kinds) > 1 or images:
        found = " and ".join(sorted(kinds | ({"image"} if images else set())))
        raise ValueError(
            f"{path}: cannot tell the source format: it holds both {found} files (the "
            "others would be left out); set data.ingest.format"
        )
    if kinds:
        return by_suffix[kinds.pop()]
    return "folder"


def _expect_kind(path: Path, is_dir: bool, fmt: str) -> None:
    if path.is_dir() != is_dir:
        kind = "a directory" if is_dir else "a file"
        raise ValueError(f"{path}: format {fmt!r} expects {kind}")


class Budget:
    """The bytes a source may hand to ingest, per file and in all, checked before reading."""

    def __init__(self, cfg: IngestConfig):
        self.per_file, self.left = cfg.max_file_bytes, cfg.max_source_bytes

    def take(self, size: int) -> tuple[str, str] | None:
        """None if `size` bytes may be read (and counts them), else (reason, detail)."""
        if size > self.per_file:
            return "too_large", f"{size} bytes > data.ingest.max_file_bytes={self.per_file}"
        if size > self.left:
            return "source_limit", "the source passed data.ingest.max_source_bytes"
        self.left -= size
        return None


def _read_file(path: Path, budget: Budget) -> tuple[bytes | None, str | None, str]:
    """(data, reject reason, detail) of one file: only regular files are opened (a link is
    followed, to a regular file only), within the budget; a missing file is (None, None, ...)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, None, f"{path}: no such file"
    except OSError as err:
        return None, "not_regular_file", f"{path}: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not_regular_file", f"{path}: a fifo, device, socket or directory"
    over = budget.take(st.st_size)
    if over is not None:
        return None, *over
    return path.read_bytes(), None, ""


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
    directories are skipped), captioned by the same-stem `.txt` beside it. A `.txt` that no
    image reads (its image missing or misnamed) is a record too, rejected as
    `missing_image`: a caption is never dropped uncounted."""
    _expect_kind(root, True, "folder")
    return _folder_records(root, Budget(cfg))


def _folder_records(root: Path, budget: Budget) -> Iterator[RawRecord]:
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if Path(dirpath, d).is_symlink():
                log.warning("%s: symlinked directory not followed", Path(dirpath, d))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(n for n in filenames if not n.startswith("."))
        listed = set(names)
        chosen: dict[str, str] = {}  # image stem -> the caption file name it reads
        for name in names:
            path = Path(dirpath) / name
            if path.suffix.lower() in CAPTION_SUFFIXES:
                continue
            data, reason, detail = _read_file(path, budget)
            # the same-stem .txt caption beside it: a caption file that cannot be read (too
            # large, over the source's budget, not a regular file) is that, not "no caption"
            chosen[path.stem] = _caption_name(path.stem, listed)
            caption, why, problem = _read_file(path.with_name(chosen[path.stem]), budget)
            if reason is None and why is not None:
                reason, detail = why, f"caption {problem}"
            yield RawRecord(
                key=str(path),
                data=data,
                caption=caption,
                source=str(root),
                reject=reason,
                reject_detail=detail,
            )
        for name in names:
            stem = Path(name).stem
            if Path(name).suffix.lower() != ".txt" or chosen.get(stem) == name:
                continue
            if stem not in chosen:
                why = "no image of the same stem beside it"
            elif chosen[stem] in listed:
                why = f"the image of its stem reads {chosen[stem]}"
            else:
                why = f"the image of its stem reads {stem}.txt or {stem}.TXT only"
            yield RawRecord(
                key=str(Path(dirpath) / name),
                data=None,
                caption=None,
                source=str(root),
                reject="missing_image",
                reject_detail=f"a caption file no image reads: {why}",
            )


def _caption_name(stem: str, listed: set[str]) -> str:
    """The name of an image's caption among its directory's files: `<stem>.txt`, else
    `<stem>.TXT` (as Windows tools name it). Chosen from the listing, not by `exists()`,
    which a case-insensitive file system (macOS, Windows) answers for either spelling."""
    upper = f"{stem}.TXT"
    return upper if f"{stem}.txt" not in listed and upper in listed else f"{stem}.txt"


# -------------------------------------------------------------------------- manifests


def _missing_columns(path: Path, present: list[str], cfg: IngestConfig) -> None:
    for column in (cfg.image_column, cfg.caption_column):
        if column not in present:
            raise ValueError(
                f"{path}: missing column {column!r} (columns present: {present}); "
                "set data.ingest.image_column / caption_column"
            )


def _manifest_record(
    manifest: Path, key: str, image: Any, caption: Any, budget: Budget
) -> RawRecord:
    """One manifest row: the image path, relative or absolute, must lie inside the
    manifest's folder (a manifest cannot make ingest read files elsewhere)."""
    source = str(manifest)
    if not isinstance(image, str) or not image:
        return RawRecord(key, None, caption, source, reject_detail=f"no image path ({image!r})")
    where = f"{key} ({image})"
    folder = manifest.parent.resolve()
    path = (manifest.parent / image).resolve()  # an absolute `image` replaces the folder
    if not path.is_relative_to(folder):
        detail = f"{image} is outside the manifest's folder {folder}"
        return RawRecord(where, None, caption, source, reject="unsafe_path", reject_detail=detail)
    data, reason, detail = _read_file(path, budget)
    return RawRecord(where, data, caption, source, reject=reason, reject_detail=detail)


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
    """A line that is not a JSON object is a rejected row (the first one, the header,
    fails the file: that is no JSONL manifest)."""
    budget = Budget(cfg)
    for line_no, row in _jsonl_rows(path, strict=False):
        key = f"{path}:{line_no}"
        if isinstance(row, str):
            yield RawRecord(key, None, None, str(path), reject="invalid_row", reject_detail=row)
            continue
        image, caption = row.get(cfg.image_column), row.get(cfg.caption_column)
        yield _manifest_record(path, key, image, caption, budget)


def _jsonl_rows(path: Path, strict: bool = True) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, object) of each non-blank line; invalid UTF-8 survives as surrogates.
    A line that is not a JSON object raises, or with `strict` off comes as its problem."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else "expected a JSON object per line"
            except json.JSONDecodeError as err:
                problem = f"not valid JSON: {err}"
            if problem is not None and strict:
                raise ValueError(f"{path}:{line_no}: {problem}")
            yield line_no, row if problem is None else problem


def _csv(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    _expect_kind(path, False, "csv")
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), [])
    _missing_columns(path, header, cfg)
    return _csv_records(path, cfg)


def _csv_records(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    """A row the csv module cannot read (a field over its 131,072-character limit) stops
    the ingest naming the file and line: the reader could not go on at the next row (a
    quoted field may span lines, and its lines would be read as rows)."""
    budget = Budget(cfg)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                line = reader.line_num + 1  # the line it failed in is not counted yet
                raise ValueError(f"{path}:{line}: not a readable CSV row: {err}") from None
            yield _manifest_record(
                path,
                f"{path}:{reader.line_num}",
                row.get(cfg.image_column),
                row.get(cfg.caption_column),
                budget,
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
    shards, budget = _files(path, ".tar"), Budget(cfg)  # one budget for the whole source
    return (rec for shard in shards for rec in _tar_records(shard, cfg, budget))


def _tar_records(shard: Path, cfg: IngestConfig, budget: Budget) -> Iterator[RawRecord]:
    """Samples of one shard: consecutive members sharing a key, as WebDataset groups them."""
    key: str | None = None
    group: dict[str, bytes] = {}
    unsafe: tuple[str, str] | None = None  # (reason, detail) that rejects the whole sample
    _check_complete(shard)
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
                    unsafe = unsafe or ("unsafe_path", f"{member.name}: {bad_type}")
                    continue
                over = budget.take(member.size)  # the header's size: nothing read yet
                if over is not None:
                    unsafe = unsafe or (over[0], f"{member.name}: {over[1]}")
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    group[ext] = f.read()
            if key is not None:
                yield _sample(shard, key, group, unsafe, cfg)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{shard}: not a readable tar archive: {err}") from err


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
"""gzip, bzip2, xz, zstd: the tail check below does not apply."""


def _check_complete(shard: Path) -> None:
    """Refuse an uncompressed shard that does not end as a tar archive does (whole 512-byte
    blocks, the last two zero): tarfile ends at a cut or missing header as if at the end,
    so a download cut between members would read as a shorter, valid shard. Not checked:
    a cut just after a member whose data ends in 1,024 zero bytes, and compressed shards
    (a cut gzip or xz stream also ends quietly at some cut points)."""
    with shard.open("rb") as f:
        if f.read(6).startswith(COMPRESSED_MAGIC):
            return
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1024))
        complete = size % 512 == 0 and size >= 1024 and f.read(1024) == bytes(1024)
    if not complete:
        raise ValueError(
            f"{shard}: not a readable tar archive: it does not end with the archive's end "
            f"marker ({size:,} bytes; cut short, e.g. an unfinished download)"
        )


def _sample(
    shard: Path,
    key: str,
    group: dict[str, bytes],
    unsafe: tuple[str, str] | None,
    cfg: IngestConfig,
) -> RawRecord:
    where = f"{shard}:{key}"
    if unsafe is not None:
        return RawRecord(where, None, None, str(shard), reject=unsafe[0], reject_detail=unsafe[1])
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
    budget = Budget(cfg)  # one budget for the whole source
    return (rec for file in files for rec in _parquet_records(file, cfg, budget))


def _parquet_image(value: Any) -> bytes | str | None:
    """A cell's image: raw bytes (empty ones are that: zero_size), a {"bytes", "path"}
    struct (the path where the bytes are empty), or a path string."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = path if not data and path else data
    return value if isinstance(value, bytes | str) else None


def _parquet_records(file: Path, cfg: IngestConfig, budget: Budget) -> Iterator[RawRecord]:
    columns = [cfg.image_column, cfg.caption_column]
    row = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        images = batch.column(cfg.image_column).to_pylist()
        captions = batch.column(cfg.caption_column).to_pylist()
        for value, caption in zip(images, captions, strict=True):
            key = f"{file}:{row}"
            row += 1
            image = _parquet_image(value)
            if isinstance(image, str):  # a path: the manifest rules (inside the folder)
                yield _manifest_record(file, key, image, caption, budget)
                continue
            over = None if image is None else budget.take(len(image))
            if over is not None:
                yield RawRecord(
                    key, None, caption, str(file), reject=over[0], reject_detail=over[1]
                )
                continue
            detail = "" if image is not None else "no image bytes or path"
            yield RawRecord(key, image, caption, str(file), reject_detail=detail)
