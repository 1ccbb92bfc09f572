"""Prepare: per-resolution packing, hash-based split, byte-identical reruns, shard reader."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen_ops.config import IngestConfig, PrepareConfig, SynthConfig
from imagen_ops.data.ingest import ingest, read_table
from imagen_ops.data.prepare import PreparedData, prepare, split_of, square_resize
from imagen_ops.data.sources import synth_source
from imagen_ops.files import sha256_file

CFG = PrepareConfig(val_fraction=0.3, shard_size=7)
N = 40


def synth_data(data_dir: Path, n: int, seed: int = 0) -> None:
    ingest(
        synth_source(SynthConfig(n=n, seed=seed, resolution=32)),
        data_dir,
        IngestConfig(),
        progress=False,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data")
    synth_data(path, N)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_shapes_dtypes_and_resampling(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    manifest = prepare(data_dir, out, [48, 16, 32], CFG, progress=False)
    assert manifest["resolutions"] == [16, 32, 48]
    assert manifest["count"] == N and manifest["shard_sizes"] == [7] * 5 + [5]
    assert manifest["source_table_sha256"] == sha256_file(data_dir / "captions.parquet")

    data = PreparedData.open(out)
    assert data.resolutions == [16, 32, 48] and len(data) == N
    assert data.table.columns.tolist() == ["index", "id", "caption", "split", "scene"]
    assert data.table["index"].tolist() == list(range(N))
    source = read_table(data_dir)
    assert data.table["id"].tolist() == source["id"].tolist()
    assert data.table["caption"].tolist() == source["caption"].tolist()
    assert data.table["scene"].tolist() == source["scene"].tolist()
    assert manifest["splits"] == data.table["split"].value_counts().to_dict()

    for r in data.resolutions:
        images = data.images(r)
        batch = images[np.arange(N)]
        assert images.resolution == r and len(images) == N
        assert batch.shape == (N, r, r, 3) and batch.dtype == np.uint8
        assert sorted(p.name for p in (out / f"images_{r}").iterdir()) == sorted(
            f"shard_{k}.npy" for k in range(6)
        )

    # 32 px is the stored size (copied exactly); 16 px is BOX: 2x2 means, rounded
    original = np.stack([np.asarray(Image.open(data_dir / p)) for p in source["path"]])
    assert np.array_equal(data.images(32)[np.arange(N)], original)
    means = original.reshape(N, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    assert np.abs(data.images(16)[np.arange(N)] - means).max() <= 0.5
    with pytest.raises(ValueError, match="24"):
        data.images(24)


def test_reader_gathers_across_shards(data_dir: Path, tmp_path: Path) -> None:
    prepare(data_dir, tmp_path / "prep", [16], CFG, progress=False)
    images = PreparedData.open(tmp_path / "prep").images(16)
    full = np.concatenate(
        [np.load(tmp_path / "prep" / "images_16" / f"shard_{k}.npy") for k in range(6)]
    )
    idx = np.random.default_rng(0).permutation(N)[:25]
    assert np.array_equal(images[idx], full[idx])
    assert np.array_equal(images[idx.reshape(5, 5)], full[idx].reshape(5, 5, 16, 16, 3))
    assert np.array_equal(images[13], full[13]) and np.array_equal(images[-1], full[-1])
    assert images[np.array([], dtype=np.int64)].shape == (0, 16, 16, 3)
    with pytest.raises(IndexError):
        images[np.array([0, N])]
    with pytest.raises(TypeError):
        images[np.array([0.5])]
    clone = pickle.loads(pickle.dumps(images))
    assert len(pickle.dumps(images)) < 1000  # paths, not pixels
    assert np.array_equal(clone[idx], full[idx])


def test_rerun_is_byte_identical(data_dir: Path, tmp_path: Path) -> None:
    a = prepare(data_dir, tmp_path / "a", [16, 32], CFG, progress=False)
    b = prepare(data_dir, tmp_path / "b", [16, 32], CFG, progress=False)
    assert a == b
    digest = tree_digest(tmp_path / "a")
    assert digest == tree_digest(tmp_path / "b")
    assert "manifest.json" in digest and "captions.parquet" in digest
    prepare(data_dir, tmp_path / "a", [16, 32], CFG, progress=False)  # replaces in place
    assert tree_digest(tmp_path / "a") == digest
    assert {p.name for p in tmp_path.iterdir()} == {"a", "b"}  # no temp dirs left behind


def test_split_is_stable_when_data_is_appended(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    synth_data(data_dir, 30)
    prepare(data_dir, tmp_path / "p1", [16], CFG, progress=False)
    before = PreparedData.open(tmp_path / "p1").table
    synth_data(data_dir, 20, seed=1)
    prepare(data_dir, tmp_path / "p2", [16], CFG, progress=False)
    after = PreparedData.open(tmp_path / "p2")
    assert len(after) == 50
    old = after.table.iloc[:30]
    assert old["id"].tolist() == before["id"].tolist()
    assert old["split"].tolist() == before["split"].tolist()
    train, val = after.indices("train"), after.indices("val")
    assert len(val) > 0 and len(train) > 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(50))
    assert (after.table["split"].to_numpy()[val] == "val").all()
    with pytest.raises(ValueError, match="test"):
        after.indices("test")


def test_split_fraction_and_salt() -> None:
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(500)]
    cfg = PrepareConfig(val_fraction=0.2)
    splits = [split_of(i, cfg) for i in ids]
    assert 70 <= splits.count("val") <= 130  # 100 +- 3.4 sigma
    assert [split_of(i, cfg) for i in ids] == splits  # a pure function of id + salt
    salted = [split_of(i, cfg.model_copy(update={"split_salt": "other"})) for i in ids]
    assert salted != splits
    assert {split_of(i, PrepareConfig(val_fraction=0.0)) for i in ids} == {"train"}
    # growing val_fraction only moves records train -> val
    more = [split_of(i, PrepareConfig(val_fraction=0.4)) for i in ids]
    assert all(m == "val" for s, m in zip(splits, more, strict=True) if s == "val")


def test_one_picture_re_encoded_or_recaptioned_never_straddles_the_splits(tmp_path) -> None:
    """The same pixels in other bytes (a PNG comment, a BMP) with the same caption are a
    duplicate; under another caption they are a new record that takes its picture's split."""
    import io

    from PIL import PngImagePlugin

    from imagen_ops.data.ingest import RawRecord

    def png(comment: str) -> bytes:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", comment)
        buf = io.BytesIO()
        picture.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    bmp = io.BytesIO()
    picture.save(bmp, format="BMP")
    same = [RawRecord(f"c{k}", png(f"copy {k}"), "a noisy square", "t") for k in range(40)]
    cfg = IngestConfig(min_side=8)
    report = ingest(
        [*same, RawRecord("bmp", bmp.getvalue(), "a noisy square", "t")],
        tmp_path / "d",
        cfg,
        progress=False,
    )
    assert report.kept == 1 and report.rejected == {"duplicate": 40}
    assert "same pixels and caption as id" in report.examples["duplicate"][0]["detail"]
    # 40 captions of one picture: kept, all in the first row's split (at a 0.5 val fraction
    # their own ids would scatter over both)
    captions = [RawRecord(f"r{k}", png(f"caption {k}"), f"caption {k}", "t") for k in range(40)]
    assert ingest(captions, tmp_path / "d", cfg, progress=False).kept == 40
    manifest = prepare(tmp_path / "d", tmp_path / "p", [32], PrepareConfig(val_fraction=0.5))
    splits = PreparedData.open(tmp_path / "p").table["split"].tolist()
    assert len(splits) == 41 and len(set(splits)) == 1, manifest["splits"]
    ids = read_table(tmp_path / "d")["id"]
    assert len({split_of(i, PrepareConfig(val_fraction=0.5)) for i in ids}) == 2


def test_square_resize_crops_the_center() -> None:
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:50] = (0, 255, 0)
    a[:, 50:] = (0, 0, 255)
    im = Image.fromarray(a)
    for size in (20, 30, 40, 80):  # down (integer, other factor), same, up
        out = np.asarray(square_resize(im, size))
        assert out.shape == (size, size, 3)
        assert (out == (0, 255, 0)).all()
    tall = Image.fromarray(a.transpose(1, 0, 2))  # 40 wide, 60 high
    assert (np.asarray(square_resize(tall, 40)) == (0, 255, 0)).all()


def test_errors_are_clear(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ingest"):
        prepare(tmp_path / "empty", tmp_path / "out", [16], CFG, progress=False)
    with pytest.raises(ValueError, match="resolutions"):
        prepare(data_dir, tmp_path / "out", [0], CFG, progress=False)
    with pytest.raises(ValueError, match="would replace"):
        prepare(data_dir, data_dir.parent, [16], CFG, progress=False)
    with pytest.raises(FileNotFoundError, match="prepare"):
        PreparedData.open(tmp_path / "nothing")

    tampered = tmp_path / "tampered"
    synth_data(tampered, 3)
    victim = tampered / read_table(tampered)["path"].iloc[1]
    Image.new("RGB", (32, 32)).save(victim)
    with pytest.raises(ValueError, match=victim.name):
        prepare(tampered, tmp_path / "out", [16], CFG, progress=False)
    assert not (tmp_path / "out").exists()  # a failed run leaves nothing half-written
