"""File helpers: atomic writes leave files and folders as the umask says, like open(), and
reach the disk before their names do."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from imagen_ops.files import atomic_dir, write_text_atomic


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
)
def test_atomic_writes_respect_the_umask(tmp_path, umask, file_mode, dir_mode) -> None:
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "metrics.json", "{}")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "model" / "config.json").stat().st_mode) == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors via /proc")
def test_atomic_writes_flush_the_bytes_before_the_name_and_the_name_after(
    tmp_path, monkeypatch
) -> None:
    """A power cut must not leave a renamed-but-empty file: every file is fsynced while it
    still has its temporary name, and the folder holding the new name after the rename."""
    synced: list[tuple[str, bool]] = []  # (what was flushed, did the final name exist then)
    final = tmp_path / "metrics.json"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = Path(f"/proc/self/fd/{fd}").readlink().relative_to(tmp_path)
        synced.append((name.as_posix(), final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(final, "{}")
    (temporary, visible), *after = synced
    assert temporary.startswith(".metrics.json.") and not visible
    assert after == [(".", True)]

    synced.clear()
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text("{}")
    *inside, last = synced
    prefix = f"{tmp.name}/"
    assert sorted(n.removeprefix(prefix) for n, _ in inside) == [
        tmp.name,
        "unet",
        "unet/config.json",
    ]
    assert not any(visible for _, visible in inside), "all flushed before the name existed"
    assert last == (".", True)
