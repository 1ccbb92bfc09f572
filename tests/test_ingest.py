"""Ingest: every source format, every rejection reason, idempotency and crash safety."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from imagen_ops.config import IngestConfig, SynthConfig
from imagen_ops.data import ingest as ingest_module
from imagen_ops.data.ingest import RawRecord, ingest, read_table
from imagen_ops.data.shapes import PHRASINGS, Scene, caption_for, synth_scenes
from imagen_ops.data.sources import open_source, synth_source
from imagen_ops.files import sha256_file

CFG = IngestConfig(min_side=16, max_pixels=50_000, max_caption_chars=100, examples_per_reason=2)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A distinct RGB image per seed (so images never collide as duplicates by accident)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def rotated_jpeg() -> bytes:
    """Stored 60x40, left half red; EXIF orientation 6 means "rotate 90 degrees clockwise"."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(a), "JPEG", exif=exif, quality=95)


def good_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, caption) for every mode that must be kept."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (0, 0, 0, 0)  # fully transparent -> white
    rgba[:, 16:] = (0, 200, 0, 255)
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))
    deep = np.zeros((32, 32), np.uint16)
    deep[:, :16] = 65535
    deep[:, 16:] = 32896  # 128 * 257
    return {
        "rgb.jpg": (encode(noise(1), "JPEG"), "an rgb jpeg"),
        "rgba.png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "an rgba png"),
        "pal.png": (encode(pal, "PNG", transparency=0), "a palette png"),
        "grey.png": (encode(noise(2).convert("L"), "PNG"), "a grey png"),
        "cmyk.jpg": (encode(noise(3).convert("CMYK"), "JPEG"), "a cmyk jpeg"),
        "deep.png": (encode(Image.fromarray(deep), "PNG"), "a 16-bit png"),
        "rotated.jpg": (rotated_jpeg(), "a rotated jpeg"),
        "spaces.png": (encode(noise(4), "PNG"), "  padded \t caption \n"),
        "sub/nested.webp": (encode(noise(5), "WEBP"), "a nested webp"),
    }


BAD_COUNTS = {
    "corrupt_image": 2,
    "not_an_image": 2,
    "zero_size": 1,
    "too_small": 1,
    "too_many_pixels": 2,
    "missing_caption": 1,
    "empty_caption": 1,
    "invalid_caption": 3,
    "duplicate": 1,
}


def make_folder(root: Path) -> Path:
    """Every good mode and at least one of every bad kind, as an image folder."""
    png = encode(noise(10), "PNG")
    jpg = encode(noise(11), "JPEG")
    files: dict[str, tuple[bytes, bytes | None]] = {
        name: (data, caption.encode()) for name, (data, caption) in good_images().items()
    }
    files |= {
        "bad/trunc.png": (png[: len(png) // 2], b"truncated png"),
        "bad/trunc.jpg": (jpg[: len(jpg) // 2], b"truncated jpeg"),
        "bad/random.png": (np.random.default_rng(12).bytes(3000), b"random bytes"),
        "bad/text.jpg": (b"this is not an image\n" * 20, b"a text file"),
        "bad/empty.png": (b"", b"zero bytes"),
        "bad/tiny.png": (encode(noise(13, (8, 40)), "PNG"), b"too small"),
        "bad/big.png": (encode(noise(14, (250, 250)), "PNG"), b"over max_pixels"),
        "bad/bomb.png": (encode(Image.new("L", (400, 400)), "PNG"), b"over 2 x max_pixels"),
        "bad/nocap.png": (encode(noise(15), "PNG"), None),
        "bad/blank.png": (encode(noise(16), "PNG"), b"  \n\t "),
        "bad/utf8.png": (encode(noise(17), "PNG"), b"caf\xe9 \xff"),
        "bad/nul.png": (encode(noise(18), "PNG"), b"a\x00b"),
        "bad/long.png": (encode(noise(19), "PNG"), b"x" * 101),
        "z_dup.jpg": (good_images()["rgb.jpg"][0], b"same bytes as rgb.jpg"),
    }
    for name, (data, caption) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if caption is not None:
            path.with_suffix(".txt").write_bytes(caption)
    return root


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def check_table(out: Path) -> None:
    """Every row's file exists, is RGB, and matches its recorded hash and size."""
    table = read_table(out)
    assert table["id"].is_unique
    for row in table.itertuples():
        assert row.id == row.source_sha256[:16]
        assert row.path == f"images/{row.id}.png"
        assert sha256_file(out / row.path) == row.sha256
        with Image.open(out / row.path) as im:
            assert im.mode == "RGB" and im.size == (row.width, row.height)


# ------------------------------------------------------------------------------ folder


def test_folder_keeps_good_and_counts_every_bad_reason(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "data"
    before = all_files(tmp_path)
    report = ingest(
        open_source(src, CFG), out, CFG, report_path=tmp_path / "r.json", progress=False
    )

    good = good_images()
    assert report.kept == len(good)
    assert report.rejected == BAD_COUNTS
    assert (
        report.seen
        == len(good) + sum(BAD_COUNTS.values())
        == report.kept + sum(report.rejected.values())
    )
    assert report.rows == len(good)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == report.to_dict()
    assert all(len(v) <= CFG.examples_per_reason for v in on_disk["examples"].values())
    assert {e["key"] for e in on_disk["examples"]["zero_size"]} == {str(src / "bad/empty.png")}

    # nothing written outside out_dir; only the report and out_dir are new
    new = all_files(tmp_path) - before
    assert all(p.is_relative_to(out) or p == tmp_path / "r.json" for p in new)

    table = read_table(out).set_index("caption")
    expected = {c.strip() for _, c in good.values()}
    assert set(table.index) == expected
    assert table.loc["padded \t caption", "source"] == str(src)
    check_table(out)

    def pixels(caption: str) -> np.ndarray:
        return np.asarray(Image.open(out / table.loc[caption, "path"]))

    rgba = pixels("an rgba png")
    assert (rgba[:, :16] == 255).all() and (rgba[:, 16:] == (0, 200, 0)).all()
    pal = pixels("a palette png")
    assert (pal[:, :16] == 255).all() and (pal[:, 16:] == (200, 0, 0)).all()
    deep = pixels("a 16-bit png")
    assert (deep[:, :16] == 255).all() and (deep[:, 16:] == 128).all()  # scaled, not clipped
    rotated = pixels("a rotated jpeg")
    assert rotated.shape == (60, 40, 3)  # 60x40 stored, rotated 90 degrees clockwise
    top, bottom = rotated[:25].mean(axis=(0, 1)), rotated[35:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red half moved to the top
    grey = pixels("a grey png")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_second_ingest_adds_nothing_and_new_source_appends(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "data"
    first = ingest(open_source(src, CFG), out, CFG, progress=False)
    table1, written = read_table(out), (out / "captions.parquet").stat()
    again = ingest(open_source(src, CFG), out, CFG, progress=False)
    assert again.kept == 0 and again.rows == first.rows
    assert again.rejected["duplicate"] == first.kept + first.rejected["duplicate"]
    assert read_table(out).equals(table1)
    # nothing new: the file is not rewritten (its bytes name the pandas / pyarrow versions,
    # so a rewrite after an upgrade would change data.dvc and retrain every stage)
    unchanged = (out / "captions.parquet").stat()
    assert (unchanged.st_ino, unchanged.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    synth = SynthConfig(n=5, resolution=32)
    more = ingest(synth_source(synth), out, CFG, progress=False)
    table2 = read_table(out)
    assert more.kept == 5 and more.rows == len(table2) == len(table1) + 5
    assert table2.iloc[: len(table1)].reset_index(drop=True).equals(table1)
    assert (table2["source"].iloc[len(table1) :] == "synth").all()
    check_table(out)


def test_crash_midway_leaves_previous_table_intact(tmp_path: Path) -> None:
    out = tmp_path / "data"
    ingest(synth_source(SynthConfig(n=4, resolution=32)), out, CFG, progress=False)
    digest, table = sha256_file(out / "captions.parquet"), read_table(out)

    def crashing():
        yield from synth_source(SynthConfig(n=6, seed=1, resolution=32))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        ingest(crashing(), out, CFG, progress=False)
    assert sha256_file(out / "captions.parquet") == digest
    assert read_table(out).equals(table)
    check_table(out)
    # the orphan images of the crashed run are reused: a rerun keeps all six
    report = ingest(synth_source(SynthConfig(n=6, seed=1, resolution=32)), out, CFG, progress=False)
    assert report.kept == 6 and report.rows == 10
    check_table(out)


def test_the_images_reach_the_disk_before_the_table_names_them(monkeypatch, tmp_path: Path) -> None:
    """One flush for a batch of images (not one per image), before the table that names
    them is written: a power cut cannot leave the table pointing at lost images."""
    out, flushes, fsyncs = tmp_path / "data", [], []
    real_sync, real_fsync = ingest_module.sync_filesystem, os.fsync

    def sync(path: Path) -> None:
        flushes.append((len(list((out / "images").glob("*.png"))), len(read_table(out))))
        real_sync(path)

    def fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(ingest_module, "sync_filesystem", sync)
    monkeypatch.setattr(os, "fsync", fsync)
    ingest(synth_source(SynthConfig(n=5, resolution=32)), out, CFG, progress=False)
    ingest(synth_source(SynthConfig(n=3, seed=1, resolution=32)), out, CFG, progress=False)
    assert flushes == [(5, 0), (8, 5)]  # every image on disk, the old table still in place
    # per ingest (no report file): the table's bytes and its folder, not each image
    assert len(fsyncs) == 2 * 2


def test_first_run_crash_leaves_no_table(tmp_path: Path) -> None:
    def crashing():
        yield RawRecord("k", encode(noise(1), "PNG"), "c", "test")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(crashing(), tmp_path / "data", CFG, progress=False)
    assert not (tmp_path / "data" / "captions.parquet").exists()
    assert read_table(tmp_path / "data").empty


def test_pillow_globals_are_restored_and_truncation_is_caught(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    limit = Image.MAX_IMAGE_PIXELS
    png = encode(noise(3), "PNG")
    records = [RawRecord("trunc", png[: len(png) // 2], "c", "test")]
    report = ingest(records, tmp_path, CFG, progress=False)
    assert report.rejected == {"corrupt_image": 1}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert limit == Image.MAX_IMAGE_PIXELS


def test_record_level_reasons(tmp_path: Path) -> None:
    png = encode(noise(1), "PNG")
    records = [
        RawRecord("ok", png, b"fine", "test", scene={"b": 1, "a": [2]}),
        RawRecord("none", None, "c", "test"),
        RawRecord("pre", None, None, "test", reject="unsafe_path", reject_detail="symlink"),
        RawRecord("surrogate", encode(noise(2), "PNG"), "bad \udcff", "test"),
        RawRecord("bell", encode(noise(3), "PNG"), "ring \x07", "test"),
        RawRecord("invisible", encode(noise(4), "PNG"), "\u200b\u200c", "test"),
        RawRecord("tabbed", encode(noise(5), "PNG"), "a\tred\r\ncircle \U0001f534", "test"),
        RawRecord("punctuation", encode(noise(6), "PNG"), "...?", "test"),
    ]
    report = ingest(records, tmp_path, CFG, progress=False)
    assert report.kept == 3  # tabs and line breaks are whitespace; emoji, punctuation visible
    assert report.rejected == {
        "missing_image": 1,
        "unsafe_path": 1,
        "invalid_caption": 2,
        "empty_caption": 1,
    }
    assert report.examples["empty_caption"][0]["detail"] == "caption has no visible character"
    assert report.examples["unsafe_path"] == [{"key": "pre", "detail": "symlink"}]
    assert read_table(tmp_path)["scene"].tolist()[0] == '{"a":[2],"b":1}'


def test_a_byte_order_mark_is_not_part_of_the_caption(tmp_path: Path) -> None:
    """Windows editors start UTF-8 text files with U+FEFF: invisible, and not a word."""
    records = [RawRecord("bom", encode(noise(1), "PNG"), "\ufeffa red square\n".encode(), "t")]
    assert ingest(records, tmp_path, CFG, progress=False).kept == 1
    assert read_table(tmp_path)["caption"].tolist() == ["a red square"]


# ------------------------------------------------------------------------------ manifests


def manifest_fixture(tmp_path: Path) -> tuple[Path, list[tuple[str | None, str | None]]]:
    """Images under m/img (one listed by its absolute path), one outside m/ reached by
    '..' and one absolute outside m/ (both must be refused); the rows to list."""
    (tmp_path / "m" / "img").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "m" / "img" / "a.png").write_bytes(encode(noise(1), "PNG"))
    (tmp_path / "m" / "img" / "c.png").write_bytes(encode(noise(4), "PNG"))
    (tmp_path / "outside" / "b.jpg").write_bytes(encode(noise(2), "JPEG"))
    (tmp_path / "abs.png").write_bytes(encode(noise(3), "PNG"))
    rows = [
        ("img/a.png", 'a "quoted", comma caption'),
        (str(tmp_path / "m" / "img" / "c.png"), "absolute, inside"),
        ("../outside/b.jpg", "through dot-dot"),
        (str(tmp_path / "abs.png"), "absolute, outside"),
        ("img/missing.png", "missing file"),
        ("img/a.png", None),  # missing caption
        ("", "no image path"),
    ]
    return tmp_path / "m", rows


EXPECTED_MANIFEST = {"missing_image": 2, "missing_caption": 1, "unsafe_path": 2}


def test_jsonl_manifest(tmp_path: Path) -> None:
    folder, rows = manifest_fixture(tmp_path)
    path = folder / "data.jsonl"
    lines = [json.dumps({"image": i, "caption": c, "extra": 1}) for i, c in rows]
    text = "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n"
    path.write_bytes(text.encode() + b'{"image": "img/a.png", "caption": "caf\xe9"}\n')
    report = ingest(open_source(path, CFG), tmp_path / "out", CFG, progress=False)
    assert report.kept == 2
    assert report.rejected == {**EXPECTED_MANIFEST, "invalid_caption": 1}
    assert read_table(tmp_path / "out")["caption"].tolist() == [c for _, c in rows[:2]]
    assert "outside the manifest's folder" in report.examples["unsafe_path"][0]["detail"]
    assert (read_table(tmp_path / "out")["source"] == str(path)).all()


def test_a_bad_jsonl_line_is_a_rejected_row_not_a_failed_ingest(tmp_path: Path) -> None:
    folder, rows = manifest_fixture(tmp_path)
    path = folder / "data.jsonl"
    good = json.dumps({"image": rows[0][0], "caption": rows[0][1]})
    also = json.dumps({"image": rows[1][0], "caption": rows[1][1]})
    path.write_text(f'{good}\n{{"image": "img/a.png", "capt\n[1, 2]\n{also}\n')
    report = ingest(open_source(path, CFG), tmp_path / "out", CFG, progress=False)
    assert report.kept == 2 and report.rejected == {"invalid_row": 2}
    details = [e["detail"] for e in report.examples["invalid_row"]]
    assert details[0].startswith("not valid JSON") and "JSON object" in details[1]
    assert [e["key"] for e in report.examples["invalid_row"]] == [f"{path}:2", f"{path}:3"]
    path.write_text(f"not json\n{good}\n")  # a bad first line: no JSONL manifest at all
    with pytest.raises(ValueError, match=r"data\.jsonl:1: not valid JSON"):
        list(open_source(path, CFG))


def test_csv_manifest(tmp_path: Path) -> None:
    folder, rows = manifest_fixture(tmp_path)
    path = folder / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "text"])
        writer.writerows(rows)
    with path.open("ab") as f:
        f.write(b"img/a.png,caf\xe9\n")  # not UTF-8
    cfg = CFG.model_copy(update={"image_column": "file", "caption_column": "text"})
    report = ingest(open_source(path, cfg), tmp_path / "out", cfg, progress=False)
    # csv has no null: the missing caption is an empty cell
    assert report.kept == 2
    assert report.rejected == {
        "missing_image": 2,
        "empty_caption": 1,
        "invalid_caption": 1,
        "unsafe_path": 2,
    }
    assert read_table(tmp_path / "out")["caption"].tolist() == [c for _, c in rows[:2]]


def test_a_csv_row_the_reader_cannot_read_is_named_with_its_line(tmp_path: Path) -> None:
    """A field over the csv module's 131,072-character limit failed with an error naming
    no file or row. It names both; reading on is no option: the field may be a quoted one
    over several lines, whose lines would be read as rows ("q.png,evil" below)."""
    folder, rows = manifest_fixture(tmp_path)
    path = folder / "data.csv"
    long = "x" * 200_000 + "\nq.png,evil\ntail"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], rows[0], ["img/b.png", long], rows[1]])
    with pytest.raises(ValueError, match=r"data\.csv:3: not a readable CSV row: field larger"):
        list(open_source(path, CFG))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_manifest_column_is_named(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text(json.dumps({"file": "a.png", "caption": "c"}) + "\n")
    elif fmt == "csv":
        path.write_text("file,caption\na.png,c\n")
    else:
        pq.write_table(pa.table({"file": ["a.png"], "caption": ["c"]}), path)
    with pytest.raises(ValueError, match=r"data\.\w+: missing column 'image'.*'file'"):
        open_source(path, CFG)


# ----------------------------------------------------------------------------- webdataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def write_shard(path: Path, start: int, n: int) -> list[str]:
    """n good samples (even: txt caption, odd: json caption); returns their captions."""
    captions = []
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            caption = f"sample {i}"
            if i % 2 == 0:
                add_member(tar, f"{i:04d}.jpg", encode(noise(100 + i), "JPEG"))
                add_member(tar, f"{i:04d}.txt", caption.encode())
            else:
                add_member(tar, f"{i:04d}.png", encode(noise(100 + i), "PNG"))
                add_member(tar, f"{i:04d}.json", json.dumps({"text": caption}).encode())
            captions.append(caption)
    return captions


def test_a_shard_cut_between_members_is_refused_not_read_short(tmp_path: Path) -> None:
    """tarfile ends at a cut or missing header as if at the archive's end: a shard cut
    short between members (an unfinished download) read as a shorter, valid one."""
    full = tmp_path / "full.tar"
    write_shard(full, 0, 10)
    assert len(list(open_source(full, CFG))) == 10
    with tarfile.open(full) as tar:
        sixth = tar.getmembers()[10].offset  # the header of sample 5's image
    data = full.read_bytes()
    for end in (sixth, sixth + 100):  # at a header, inside one
        cut = tmp_path / "cut" / f"{end}.tar"
        cut.parent.mkdir(exist_ok=True)
        cut.write_bytes(data[:end])
        with pytest.raises(ValueError, match=r"not a readable tar archive: .*cut short"):
            list(open_source(cut, CFG))
        cut.unlink()


def test_webdataset_unsafe_members_are_never_extracted(tmp_path: Path) -> None:
    tar_path = tmp_path / "shard.tar"
    img = encode(noise(1), "PNG")
    with tarfile.open(tar_path, "w") as tar:
        add_member(tar, "./dir/s0.jpg", encode(noise(2), "JPEG"))
        add_member(tar, "./dir/s0.txt", b"good txt")
        add_member(tar, "dir/s1.png", img)
        add_member(tar, "dir/s1.seg.png", encode(noise(3), "PNG"))  # ignored extra member
        add_member(tar, "dir/s1.json", json.dumps({"caption": "good json", "text": "x"}).encode())
        add_member(tar, "../evil.png", img)
        add_member(tar, "../evil.txt", b"evil")
        add_member(tar, "/tmp/abs_evil.png", img)
        add_member(tar, "dir/s2.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "dir/s2.txt", b"symlinked")
        add_member(tar, "dir/s3.png", type=tarfile.LNKTYPE, linkname="dir/s1.png")
        add_member(tar, "dir/s4.png", type=tarfile.CHRTYPE)
        add_member(tar, "dir/s5.txt", b"caption without image")
    before = all_files(tmp_path)
    out = tmp_path / "out"
    report = ingest(open_source(tar_path, CFG), out, CFG, progress=False)
    assert report.kept == 2
    assert report.rejected == {"unsafe_path": 6, "missing_image": 1}
    assert read_table(out)["caption"].tolist() == ["good txt", "good json"]
    assert all(p.is_relative_to(out) for p in all_files(tmp_path) - before)
    assert not list(tmp_path.parent.rglob("*evil*"))
    assert not Path("/tmp/abs_evil.png").exists()


def test_webdataset_sparse_member_is_rejected_unread(tmp_path: Path) -> None:
    """A ~10 KiB tar whose member claims 1 GiB (a sparse file): rejected by its header size,
    never read into memory; the other samples still come through."""
    if shutil.which("tar") is None:
        pytest.skip("needs the tar program to write a GNU sparse member")
    work = tmp_path / "w"
    work.mkdir()
    with (work / "big.png").open("wb") as f:
        f.truncate(2**30)  # 1 GiB of holes
    (work / "big.txt").write_text("huge")
    (work / "ok.png").write_bytes(encode(noise(1), "PNG"))
    (work / "ok.txt").write_text("fine")
    shard = tmp_path / "sparse.tar"
    names = ["big.png", "big.txt", "ok.png", "ok.txt"]
    subprocess.run(["tar", "--sparse", "-cf", str(shard), *names], cwd=work, check=True)
    assert shard.stat().st_size < 2**20
    report = ingest(open_source(shard, CFG), tmp_path / "out", CFG, progress=False)
    assert report.kept == 1 and report.rejected == {"too_large": 1}
    assert "max_file_bytes" in report.examples["too_large"][0]["detail"]


def test_source_byte_budget_rejects_the_rest_with_a_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sizes = []
    for i in range(4):
        data = encode(noise(i), "PNG")
        (src / f"{i}.png").write_bytes(data)
        (src / f"{i}.txt").write_text(f"image {i}")
        sizes.append(len(data) + len(f"image {i}"))
    cfg = CFG.model_copy(update={"max_source_bytes": sizes[0] + sizes[1]})
    report = ingest(open_source(src, cfg), tmp_path / "out", cfg, progress=False)
    assert report.kept == 2 and report.rejected == {"source_limit": 2}
    small = CFG.model_copy(update={"max_file_bytes": min(sizes) // 2})
    report = ingest(open_source(src, small), tmp_path / "out2", small, progress=False)
    assert report.rejected == {"too_large": 4}


def test_one_byte_budget_per_source_and_a_caption_file_s_own_reason(tmp_path: Path) -> None:
    """max_source_bytes spans a source's shards, not each shard; a caption file that may
    not be read is rejected for that, not as a missing caption; every format ingest
    decodes is an image member of a WebDataset sample."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a.tar", 0, 2)
    write_shard(shards / "b.tar", 2, 1)  # smaller than a.tar: a budget per shard lets it in
    with tarfile.open(shards / "a.tar") as tar:
        budget = sum(member.size for member in tar)
    cfg = CFG.model_copy(update={"max_source_bytes": budget})
    report = ingest(open_source(shards, cfg), tmp_path / "out", cfg, progress=False)
    assert report.kept == 2 and report.rejected == {"source_limit": 1}

    src = tmp_path / "src"
    src.mkdir()
    (src / "x.png").write_bytes(encode(Image.new("RGB", (16, 16), "red"), "PNG"))
    (src / "x.txt").write_text("a red square " * 30)
    small = CFG.model_copy(update={"max_file_bytes": 300})
    report = ingest(open_source(src, small), tmp_path / "out2", small, progress=False)
    assert report.rejected == {"too_large": 1}
    assert report.examples["too_large"][0]["detail"].startswith("caption ")

    with tarfile.open(tmp_path / "gif.tar", "w") as tar:
        add_member(tar, "g.gif", encode(noise(3), "GIF"))
        add_member(tar, "g.txt", b"a noisy gif")
    report = ingest(open_source(tmp_path / "gif.tar", CFG), tmp_path / "out3", CFG, progress=False)
    assert report.kept == 1, report.rejected


def test_folder_fifo_and_device_link_are_rejected_never_opened(tmp_path: Path) -> None:
    """Opening either would block or read forever: the ingest finishing is the proof."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(encode(noise(1), "PNG"))
    (src / "ok.txt").write_text("fine")
    os.mkfifo(src / "pipe.png")
    (src / "pipe.txt").write_text("a fifo")
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "zero.txt").write_text("a device")
    report = ingest(open_source(src, CFG), tmp_path / "out", CFG, progress=False)
    assert report.kept == 1 and report.rejected == {"not_regular_file": 2}


def test_folder_caption_in_upper_case_suffix(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.png").write_bytes(encode(noise(1), "PNG"))
    (src / "x.TXT").write_text("a caption saved by a Windows tool")
    report = ingest(open_source(src, CFG), tmp_path / "out", CFG, progress=False)
    assert report.kept == 1, report.rejected
    assert read_table(tmp_path / "out")["caption"].tolist() == ["a caption saved by a Windows tool"]


def test_folder_caption_files_no_image_reads_are_counted(tmp_path: Path) -> None:
    """A caption whose image is missing (or misnamed) is a rejected record with its reason,
    not a file the ingest passes over without a word; JSON sidecars are not captions."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.png").write_bytes(encode(noise(1), "PNG"))
    (src / "x.txt").write_text("a kept caption")
    if (src / "x.TXT").exists():  # a case-insensitive file system: one name, one file
        pytest.skip("needs a case-sensitive file system")
    (src / "x.TXT").write_text("the same stem in upper case: x.txt is the one read")
    (src / "m.png").write_bytes(encode(noise(2), "PNG"))
    (src / "m.Txt").write_text("neither .txt nor .TXT: not its caption")
    (src / "sub" / "lost.txt").write_text("its image was never copied")
    (src / "sub" / "meta.json").write_text("{}")
    (src / ".hidden.txt").write_text("dot-files are skipped")
    cfg = CFG.model_copy(update={"examples_per_reason": 5})
    report = ingest(open_source(src, cfg), tmp_path / "out", cfg, progress=False)
    assert report.kept == 1 and report.rejected == {"missing_image": 3, "missing_caption": 1}
    assert report.seen == 5  # nothing lost: seen = kept + rejected
    why = {e["key"]: e["detail"] for e in report.examples["missing_image"]}
    assert why == {
        str(src / "x.TXT"): "a caption file no image reads: the image of its stem reads x.txt",
        str(src / "m.Txt"): "a caption file no image reads: "
        "the image of its stem reads m.txt or m.TXT only",
        str(src / "sub" / "lost.txt"): "a caption file no image reads: "
        "no image of the same stem beside it",
    }


def test_webdataset_shard_directory_and_json_caption_column(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    captions = write_shard(shards / "b-00001.tar", 3, 3)
    captions = write_shard(shards / "a-00000.tar", 0, 3) + captions  # sorted by name
    report = ingest(open_source(shards, CFG), tmp_path / "out", CFG, progress=False)
    table = read_table(tmp_path / "out")
    assert report.kept == 6 and table["caption"].tolist() == captions
    assert (
        table["source"].tolist()
        == [str(shards / "a-00000.tar")] * 3 + [str(shards / "b-00001.tar")] * 3
    )

    with tarfile.open(tmp_path / "custom.tar", "w") as tar:
        add_member(tar, "k.jpg", encode(noise(9), "JPEG"))
        add_member(tar, "k.json", json.dumps({"alt": "custom field", "caption": "no"}).encode())
    cfg = CFG.model_copy(update={"caption_column": "alt"})
    ingest(open_source(tmp_path / "custom.tar", cfg), tmp_path / "out2", cfg, progress=False)
    assert read_table(tmp_path / "out2")["caption"].tolist() == ["custom field"]


def test_corrupt_tar_is_an_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ValueError, match=r"bad\.tar"):
        list(open_source(bad, CFG))
    write_shard(tmp_path / "cut.tar", 0, 4)
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.tar"):
        list(open_source(tmp_path / "cut.tar", CFG))


# -------------------------------------------------------------------------------- parquet


def test_parquet_bytes_and_hf_struct_columns(tmp_path: Path) -> None:
    imgs = [encode(noise(i), "PNG") for i in range(5)]
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "side.png").write_bytes(imgs[4])
    pq.write_table(
        pa.table({"image": [*imgs[:2], None], "caption": ["b0", "b1", "no image"]}),
        tmp_path / "pq" / "0-bytes.parquet",
    )
    struct = [
        {"bytes": imgs[2], "path": "x.png"},
        {"bytes": imgs[3], "path": None},
        {"bytes": None, "path": "side.png"},
        {"bytes": None, "path": "gone.png"},
    ]
    pq.write_table(
        pa.table({"image": struct, "caption": ["s0", "s1", "s2", "s3"]}),
        tmp_path / "pq" / "1-struct.parquet",
        row_group_size=2,
    )
    (tmp_path / "pq" / "other.png").write_bytes(encode(noise(5), "PNG"))
    pq.write_table(  # empty bytes: the struct's path where it has one, else a 0-byte image
        pa.table(
            {
                "image": [{"bytes": b"", "path": "other.png"}, {"bytes": b"", "path": None}],
                "caption": ["e0", "e1"],
            }
        ),
        tmp_path / "pq" / "2-empty.parquet",
    )
    pq.write_table(pa.table({"image": [b""], "caption": ["empty"]}), tmp_path / "pq" / "3.parquet")
    report = ingest(open_source(tmp_path / "pq", CFG), tmp_path / "out", CFG, progress=False)
    assert report.kept == 6 and report.rejected == {"missing_image": 2, "zero_size": 2}
    assert read_table(tmp_path / "out")["caption"].tolist() == ["b0", "b1", "s0", "s1", "s2", "e0"]

    single = ingest(
        open_source(tmp_path / "pq" / "1-struct.parquet", CFG),
        tmp_path / "out",
        CFG,
        progress=False,
    )
    assert single.rejected == {"duplicate": 3, "missing_image": 1}


# ---------------------------------------------------------------------------- synth, auto


def test_synth_source_captions_match_scenes(tmp_path: Path) -> None:
    cfg = SynthConfig(n=10, seed=3, resolution=32)
    records = list(synth_source(cfg))
    assert [r.key for r in records] == [f"synth:3:{i}" for i in range(10)]
    report = ingest(records, tmp_path, CFG, progress=False)
    table = read_table(tmp_path)
    assert report.kept == 10 and (table["source"] == "synth").all()
    assert (table["width"] == 32).all() and (table["height"] == 32).all()
    for row in table.itertuples():
        assert row.caption == caption_for(Scene.from_dict(json.loads(row.scene)))


def test_caption_variety_changes_the_words_only() -> None:
    """`caption_variety` keeps every scene and image of the template data and captions a
    share of them in another phrasing, each still its scene's exact caption; every
    phrasing of every category occurs."""
    plain = list(synth_scenes(SynthConfig(n=400, resolution=32)))
    varied = list(synth_scenes(SynthConfig(n=400, resolution=32, caption_variety=0.5)))
    seen, changed = set(), 0
    for a, b in zip(plain, varied, strict=True):
        scene = Scene.from_dict(b.scene)
        assert b.png == a.png
        assert replace(scene, phrasing=0).to_dict() == a.scene  # template specs: no key
        assert b.caption == caption_for(scene)
        assert (b.caption == a.caption) == (scene.phrasing == 0)
        seen.add((scene.category, scene.phrasing))
        changed += scene.phrasing > 0
    assert 160 <= changed <= 240
    assert seen == {(c, k) for c, n in PHRASINGS.items() for k in range(n)}


def test_format_detection_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "data.xyz").write_text("?")
    with pytest.raises(ValueError, match=r"data\.xyz.*format"):
        open_source(tmp_path / "data.xyz", CFG)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_shard(mixed / "a.tar", 0, 1)
    pq.write_table(pa.table({"image": [b""], "caption": ["c"]}), mixed / "b.parquet")
    with pytest.raises(ValueError, match="mixed"):
        open_source(mixed, CFG)
    # images beside a shard: reading either would leave the other out without a word
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40)).save(photos / "a.png")
    (photos / "a.txt").write_text("a black square")
    write_shard(photos / "old_backup.tar", 0, 2)
    with pytest.raises(ValueError, match=r"photos: .*both \.tar and image files"):
        open_source(photos, CFG)
    assert len(list(open_source(photos, CFG.model_copy(update={"format": "folder"})))) == 2
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(tmp_path / "nope", CFG)
    with pytest.raises(ValueError, match="expects a directory"):
        open_source(tmp_path / "data.xyz", CFG.model_copy(update={"format": "folder"}))


def test_pixels_without_a_fixed_range_are_refused_and_16_bit_transparency_is_white(tmp_path):
    """Float and 32-bit pixels have no range to scale to 0..255 (they came out black or
    white): refused with the reason. A 16-bit grey PNG's transparent value is composited on
    white like any other transparency."""
    grey = np.full((40, 48), 40000, np.uint16)
    grey[:8] = 0  # the transparent value
    records = [
        RawRecord(
            "float", encode(Image.fromarray(np.full((40, 48), 0.5, np.float32)), "TIFF"), "f", "t"
        ),
        RawRecord(
            "int32", encode(Image.fromarray(np.full((40, 48), 10**5, np.int32)), "TIFF"), "i", "t"
        ),
        RawRecord("grey16", encode(Image.fromarray(grey), "PNG", transparency=0), "g", "t"),
    ]
    report = ingest(records, tmp_path, CFG, progress=False)
    assert report.kept == 1 and report.rejected == {"unsupported_mode": 2}
    details = [e["detail"] for e in report.examples["unsupported_mode"]]
    assert "floating-point" in details[0] and "100000" in details[1]
    (row,) = read_table(tmp_path).itertuples()
    pixels = np.asarray(Image.open(tmp_path / row.path))
    assert (pixels[:8] == 255).all() and (pixels[8:] == round(40000 / 257)).all()
