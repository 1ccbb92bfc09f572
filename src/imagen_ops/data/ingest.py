"""The validated writer: every source's records pass through `ingest`, one code path.

A record is either kept (decoded in full, converted to RGB, stored as `images/<id>.png` and
listed in `captions.parquet`) or counted under exactly one rejection reason, so nothing is
lost silently. Checks run cheapest first: a reason set by the source (`unsafe_path`), the
image bytes (`missing_image`, `zero_size`), the caption, `duplicate`, then the decode.

Ids are the first 16 hex digits of the sha256 of the raw input bytes, so ingest is
idempotent: a second run over the same records only finds duplicates (as is one picture
under the same caption in other bytes: re-encoded, its metadata stripped). Images are written
first, flushed to the disk together, and the table atomically last, so an interrupted run (or
a power cut) leaves the previous table valid;
image files it left behind are not in the table and are overwritten by the next run.
"""

from __future__ import annotations

import io
import json
import logging
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from imagen_ops.config import IngestConfig
from imagen_ops.files import (
    atomic_path,
    sha256_bytes,
    sync_filesystem,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "REASONS",
    "TABLE_SCHEMA",
    "IngestReport",
    "RawRecord",
    "Rejected",
    "decode_image",
    "ingest",
    "read_table",
    "to_rgb",
]

log = logging.getLogger(__name__)

TABLE = "captions.parquet"
IMAGES = "images"
ID_CHARS = 16

REASONS = (
    "invalid_row",  # a manifest line that is not a record (bad JSON)
    "unsafe_path",
    "not_regular_file",
    "too_large",
    "source_limit",
    "missing_image",
    "zero_size",
    "missing_caption",
    "empty_caption",
    "invalid_caption",
    "duplicate",
    "id_collision",
    "not_an_image",
    "corrupt_image",
    "too_many_pixels",
    "too_small",
    "unsupported_mode",  # pixels with no fixed range (float, 32-bit)
)

TABLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("source_sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("source", pa.string()),
        ("scene", pa.string()),
    ]
)

# Decoders Pillow may use on untrusted bytes (no EPS / PDF, which call external programs).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class RawRecord:
    """One image-text pair as a source found it, before any validation."""

    key: str  # where it came from (file path, tar member, row number), for reports
    data: bytes | None  # encoded image bytes as found (None: image missing)
    caption: Any  # as found: check_caption accepts text or UTF-8 bytes, rejects the rest
    source: str  # label stored in the table (the source file, or "synth")
    scene: dict[str, Any] | None = None  # synthetic scene spec (JSON-serialisable)
    reject: str | None = None  # a reason the source already knows (e.g. "unsafe_path")
    reject_detail: str = ""


class Rejected(Exception):  # noqa: N818 -- a verdict, not an error of the program
    """A record fails a check; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class IngestReport:
    """What one ingest run saw, kept and rejected (per reason, with a few examples)."""

    seen: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    rows: int = 0  # rows in the table after the run

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, key: str, err: Rejected, max_examples: int) -> None:
        self.rejected[err.reason] = self.rejected.get(err.reason, 0) + 1
        examples = self.examples.setdefault(err.reason, [])
        if len(examples) < max_examples:
            examples.append({"key": key, "detail": err.detail[:300]})

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "rejected_total": self.rejected_total,
            "rejected": dict(sorted(self.rejected.items())),
            "examples": dict(sorted(self.examples.items())),
            "rows": self.rows,
        }


# ----------------------------------------------------------------------------- checks


LINE_SPACE = "\t\n\x0b\x0c\r\x85"  # the control characters that are text's whitespace


def check_caption(
    caption: Any, max_chars: int, limit: str = "data.ingest.max_caption_chars"
) -> str:
    """The stripped caption, or `Rejected` (missing / empty / invalid): the one caption
    check, for every source (sources pass captions through as they find them). A UTF-8
    byte-order mark (which Windows editors write) is not part of the text. `limit` names
    the setting behind `max_chars` in the message."""
    if caption is None:
        raise Rejected("missing_caption", "no caption")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise Rejected("invalid_caption", f"not UTF-8: {err}") from None
    if not isinstance(caption, str):
        raise Rejected("invalid_caption", f"caption is a {type(caption).__name__}, not text")
    text = caption.removeprefix("\ufeff").strip()
    if not text:
        raise Rejected("empty_caption", "caption is empty or whitespace")
    for ch in text:
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in LINE_SPACE) or cat == "Cs":
            raise Rejected("invalid_caption", f"contains control character U+{ord(ch):04X}")
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in text):
        # zero-width spaces, bidi marks, lone accents: the tokenizer reads an empty caption
        raise Rejected("empty_caption", "caption has no visible character")
    if len(text) > max_chars:
        raise Rejected("invalid_caption", f"{len(text)} characters > {limit}={max_chars}")
    return text


@contextmanager
def pillow_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb limit set to `max_pixels` (warnings as errors), truncation strict.

    Both are Pillow globals, so they are restored on exit and never leak to other code.
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def decode_image(data: bytes, cfg: IngestConfig) -> Image.Image:
    """Open and fully decode `data`, checking size limits from the header before loading.

    Call inside `pillow_guard`. Raises `Rejected` for anything that is not a usable image.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected("too_many_pixels", f"over max_pixels={cfg.max_pixels}: {err}") from None
    except UnidentifiedImageError:
        if data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise Rejected("corrupt_image", "image header is unreadable") from None
        raise Rejected(
            "not_an_image", f"not a supported image format ({', '.join(FORMATS)})"
        ) from None
    except Exception as err:  # a broken header can raise anything: it is recorded, not dropped
        raise Rejected("corrupt_image", f"{type(err).__name__}: {err}") from None
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h} > max_pixels={cfg.max_pixels}")
    if w == 0 or h == 0:
        raise Rejected("zero_size", f"{w}x{h} image")
    if min(w, h) < cfg.min_side:
        raise Rejected("too_small", f"{w}x{h}: shorter side < min_side={cfg.min_side}")
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected("too_many_pixels", f"over max_pixels={cfg.max_pixels}: {err}") from None
    except Exception as err:  # truncated data, bad CRC, decoder errors
        raise Rejected("corrupt_image", f"{type(err).__name__}: {err}") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """EXIF orientation applied, alpha composited on white, 16-bit scaled, then RGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode == "F":
        raise Rejected(
            "unsupported_mode",
            "floating-point pixels (mode F) have no range to map onto 0..255: save 8 or 16 bit",
        )
    if im.mode in SIXTEEN_BIT:
        # 16-bit grey: scale 0..65535 onto 0..255 (Pillow's own convert would clip at 255).
        values = np.asarray(im).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):  # mode I: 32-bit
            raise Rejected(
                "unsupported_mode",
                f"pixels from {values.min():.0f} to {values.max():.0f} (mode {im.mode}), "
                "outside 16 bit's 0..65535: save 8 or 16 bit",
            )
        grey = values / 257.0
        if isinstance(im.info.get("transparency"), int):  # white, as alpha is composited
            grey[values == im.info["transparency"]] = 255.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ table


def read_table(out_dir: Path) -> pd.DataFrame:
    """The current `captions.parquet` of `out_dir` (empty with the right columns if none)."""
    path = Path(out_dir) / TABLE
    if not path.exists():
        return TABLE_SCHEMA.empty_table().to_pandas()
    table = pq.read_table(path)
    missing = [n for n in TABLE_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: not an ingest table, missing columns {missing} (has {table.column_names})"
        )
    return table.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA).to_pandas()


def write_table(out_dir: Path, old: pd.DataFrame, rows: list[dict[str, Any]]) -> int:
    """Append `rows` to `old` and replace the table atomically; returns the row count."""
    new = pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)
    table = pa.concat_tables(
        [pa.Table.from_pandas(old, schema=TABLE_SCHEMA, preserve_index=False), new]
    )
    out_dir.mkdir(parents=True, exist_ok=True)  # where every record was rejected
    sync_filesystem(out_dir)  # the images it names reach the disk first, in one flush
    with atomic_path(out_dir / TABLE) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


# ----------------------------------------------------------------------------- ingest


@dataclass
class _Seen:
    """What the table holds: each id's source bytes, and each (pixels, caption) pair's id:
    one picture saved twice in other bytes (re-encoded, metadata stripped) is the same
    record."""

    ids: dict[str, str]
    pairs: dict[tuple[str, str], str]

    @classmethod
    def of(cls, table: pd.DataFrame) -> _Seen:
        seen = cls(dict(zip(table["id"], table["source_sha256"], strict=True)), {})
        for image_id, pixels, caption in zip(
            table["id"], table["sha256"], table["caption"], strict=True
        ):
            seen.pairs.setdefault((pixels, caption), image_id)
        return seen


def _accept(rec: RawRecord, cfg: IngestConfig, out_dir: Path, seen: _Seen) -> dict[str, Any]:
    """Validate one record and store its image; returns its table row or raises Rejected."""
    if rec.reject is not None:
        raise Rejected(rec.reject, rec.reject_detail or "rejected by the source")
    if rec.data is None:
        raise Rejected("missing_image", rec.reject_detail or "no image data")
    if len(rec.data) == 0:
        raise Rejected("zero_size", "0-byte image")
    caption = check_caption(rec.caption, cfg.max_caption_chars)
    source_sha = sha256_bytes(rec.data)
    image_id = source_sha[:ID_CHARS]
    if image_id in seen.ids:
        if seen.ids[image_id] == source_sha:
            raise Rejected("duplicate", f"same bytes as id {image_id}")
        raise Rejected("id_collision", f"id {image_id} already names other bytes")
    im = decode_image(rec.data, cfg)
    try:
        rgb = to_rgb(im)
    except Rejected:
        raise
    except Exception as err:  # bad EXIF, a mode Pillow cannot convert
        raise Rejected("corrupt_image", f"cannot convert {im.mode} to RGB: {err}") from None
    png = encode_png(rgb)
    pixels = sha256_bytes(png)
    twin = seen.pairs.setdefault((pixels, caption), image_id)
    if twin != image_id:
        raise Rejected("duplicate", f"same pixels and caption as id {twin}, in other bytes")
    rel = f"{IMAGES}/{image_id}.png"
    write_bytes_atomic(out_dir / rel, png, fsync=False)  # flushed with the table
    seen.ids[image_id] = source_sha
    scene = (
        None if rec.scene is None else json.dumps(rec.scene, sort_keys=True, separators=(",", ":"))
    )
    return {
        "id": image_id,
        "path": rel,
        "caption": caption,
        "sha256": pixels,
        "source_sha256": source_sha,
        "width": rgb.width,
        "height": rgb.height,
        "source": rec.source,
        "scene": scene,
    }


def ingest(
    records: Iterable[RawRecord],
    out_dir: Path,
    cfg: IngestConfig,
    report_path: Path | None = None,
    progress: bool = True,
) -> IngestReport:
    """Validate `records` and append the kept ones to `out_dir` (images + captions.parquet).

    The report is returned always; `report_path` (a tracked file) describes the ingest that
    last changed `out_dir`, so a run that adds nothing leaves it byte for byte as it was."""
    out_dir = Path(out_dir)
    old = read_table(out_dir)
    seen = _Seen.of(old)
    report = IngestReport()
    rows: list[dict[str, Any]] = []
    bar = tqdm(records, desc="ingest", unit="img", disable=not progress)
    with pillow_guard(cfg.max_pixels):
        for rec in bar:
            report.seen += 1
            try:
                rows.append(_accept(rec, cfg, out_dir, seen))
            except Rejected as err:
                log.debug("rejected %s: %s", rec.key, err)
                report.reject(rec.key, err, cfg.examples_per_reason)
    report.kept = len(rows)
    if rows or not (out_dir / TABLE).exists():
        report.rows = write_table(out_dir, old, rows)
    else:  # untouched: the file's bytes name the pandas and pyarrow versions that wrote it
        report.rows = len(old)
    if report.seen != report.kept + report.rejected_total:  # nothing may be lost silently
        raise RuntimeError(
            f"ingest bookkeeping: {report.seen} seen but {report.kept} kept"
            f" + {report.rejected_total} rejected; please report this as a bug"
        )
    log.info(
        "ingest into %s: %d seen, %d kept, %d rejected %s; %d rows",
        out_dir,
        report.seen,
        report.kept,
        report.rejected_total,
        dict(sorted(report.rejected.items())),
        report.rows,
    )
    if report_path is not None and (report.kept or not Path(report_path).exists()):
        write_json_atomic(report_path, report.to_dict())
    return report
