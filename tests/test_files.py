"""File helpers: atomic writes leave files and folders as the umask says, like open()."""

from __future__ import annotations

import os
import stat

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
