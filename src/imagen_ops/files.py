"""Small file helpers: atomic, durable writes (temp file, fsync, rename) and content hashes."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "LockedError",
    "atomic_dir",
    "atomic_path",
    "exclusive_lock",
    "sha256_bytes",
    "sha256_file",
    "sha256_files",
    "sha256_tree",
    "sync_filesystem",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# what fsync on a folder returns where the file system cannot flush one (some FUSE and
# network mounts): skipped there, as PostgreSQL does; a file's flush must not fail
_NO_FOLDER_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def _fsync(path: Path) -> None:
    """Flush `path` to the disk: a file's bytes, or a folder's entries (names, renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_FOLDER_FSYNC or not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Any:
    """Linux's syncfs(2) from the C library, None where there is none."""
    return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)


def sync_filesystem(path: str | Path) -> None:
    """Flush every pending write on the file system that holds `path`: one flush for many
    files written with `fsync=False`. Linux's syncfs; elsewhere `os.sync()`, the machine's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = _syncfs()
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the old file in place. The
    bytes reach the disk before the name points at them, and the rename before the block
    returns: a power cut after a write cannot leave an empty file under the new name.
    (A folder that `mkdir` creates here is not flushed into its own parent.) `fsync=False`
    leaves the flush to a caller writing many files, with one `sync_filesystem` before the
    write that names them (ingest's images, then its table).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; teammates read what open() would
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            _fsync(tmp_path)
        tmp_path.replace(path)
        if fsync:
            _fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` as a whole when the block succeeds
    (its files and folders flushed to the disk first, as in `atomic_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the umask decides, as for mkdir
    try:
        yield tmp
        for entry in [*tmp.rglob("*"), tmp]:
            kind = entry.lstat().st_mode
            if stat.S_ISREG(kind) or stat.S_ISDIR(kind):  # not links, FIFOs (open would block)
                _fsync(entry)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.replace(old)
        tmp.replace(path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Mapping[str, Path]) -> str:
    """sha256 over labelled files' digests, in the mapping's order: the identity of a
    model made of several files (a cascade, a scorer)."""
    h = hashlib.sha256()
    for label, path in files.items():
        h.update(f"{label}:{sha256_file(path)}\n".encode())
    return h.hexdigest()


def sha256_tree(root: str | Path, pattern: str = "*") -> str:
    """sha256 over the files under `root` matching `pattern`, labelled by their relative
    paths: a folder's content identity, wherever it lies."""
    root = Path(root)
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    return sha256_files({p.relative_to(root).as_posix(): p for p in files})


class LockedError(RuntimeError):
    """Another process holds the lock."""


@contextmanager
def exclusive_lock(path: str | Path, wait: float = 0.0) -> Iterator[int]:
    """Hold an exclusive lock on `path` for the block; fail naming the holder if it is not
    free within `wait` seconds (0: at once). Yields the lock file's descriptor.

    Two retraining runs must never write the same data and model directories; the second
    one stops with a message instead of waiting or corrupting the first. The lock is an
    OS-level flock, released when the holder exits, even on a crash. A child process given
    the descriptor (`subprocess.Popen(..., pass_fds=[fd])`) holds it too: the lock lasts
    until the last of them exits, so a killed or cancelled holder's running commands keep
    it. So the block's end only closes the descriptor: an explicit unlock would free the
    lock for every process sharing it, the children still writing included.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    with path.open("a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise LockedError(
                    f"{path} is held by another run ({holder}); wait for it to finish"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield f.fileno()  # the note stays: it names the run whose commands may still hold it
