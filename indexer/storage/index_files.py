"""The vector store's files: atomic writes, the manifest (the commit point), fingerprints, the writer lock, garbage.

Every data file is written once under a fresh name and never modified, so a reader that maps it keeps a valid
view whatever a writer does next; the manifest names the current set and is replaced atomically, last. A crash
leaves either the old manifest (and some unreferenced files, collected by the next writer) or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_VERSION = 2  # v2: base + delta files with the catalog generation each covers; v1 had one file


def manifest_path(index_dir: Path, key: str) -> Path:
    """Where the manifest of the space with this key lives."""
    return index_dir / f"{key}.manifest.json"


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest as written, or None when absent or unreadable."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def fresh_name(key: str, role: str, generation: int, suffix: str) -> str:
    """A file name no other write uses (the random part keeps two writers of one generation apart)."""
    return f"{key}.{role}-{generation}-{secrets.token_hex(4)}.{suffix}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, write: Callable[[str], None]) -> None:
    """Have `write(tmp_path)` write the content, then flush it to disk and rename it into place.

    Why: readers must see the old file or the new one, never a half-written one (the rename is atomic), and after
    a power cut the name must not point to blocks that never reached the disk (the fsyncs).
    """
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically: the moment the new file set becomes the current one."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)

    write_atomic(path, write)


def fingerprint(path: Path) -> dict[str, Any]:
    """Size and a hash of the first and last 64 KiB: catches a truncated file or another space's file put in its
    place without reading gigabytes on every open."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(65536))
        if size > 65536:
            f.seek(max(65536, size - 65536))
            h.update(f.read(65536))
    return {"size": size, "hash": h.hexdigest()}


def fingerprint_problem(path: Path, want: dict[str, Any] | None) -> str | None:
    """Why the file is not the one the manifest recorded, or None when it is."""
    try:
        if want is None:
            return f"{path.name} has no fingerprint on record"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path.name} holds {size} bytes, the manifest recorded {want.get('size')}"
        if fingerprint(path) != want:
            return f"{path.name} is not the file the manifest recorded (content differs)"
    except OSError as e:
        return f"{path.name}: {e.strerror or e}"
    return None


def size_problem(path: Path, size: int) -> str | None:
    """Why a raw array file cannot hold `size` bytes as recorded, or None."""
    try:
        have = path.stat().st_size
    except OSError as e:
        return f"{path.name}: {e.strerror or e}"
    return None if have == size else f"{path.name} holds {have} bytes, the manifest recorded {size}"


def write_array(path: Path, arr: np.ndarray) -> None:
    """Write an array as raw little-endian bytes (memory-mapped back with its shape from the manifest)."""
    write_atomic(path, lambda tmp: np.ascontiguousarray(arr).tofile(tmp))


def map_array(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of a raw array file (an empty array for zero rows: mmap cannot map 0 bytes)."""
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


_lock_guard = threading.Lock()
_thread_locks: dict[str, threading.RLock] = {}
_held: dict[str, tuple[Any, int]] = {}  # lock path -> (open file holding the flock, nesting depth)


@contextlib.contextmanager
def writer_lock(index_dir: Path, key: str) -> Iterator[None]:
    """One writer per space at a time, across processes (flock) and threads; re-entrant in the holding thread
    (a catch-up that turns into a rebuild keeps the lock it has).

    Readers never take it: they read immutable files named by an atomically replaced manifest.
    """
    import fcntl

    index_dir.mkdir(parents=True, exist_ok=True)
    path = str(index_dir / f"{key}.lock")
    with _lock_guard:
        rlock = _thread_locks.setdefault(path, threading.RLock())
    with rlock:
        f, depth = _held.get(path, (None, 0))
        if depth == 0:
            f = open(path, "a+")  # noqa: SIM115 - held across the yield, closed below
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except OSError:  # a file system without flock: one writer per library is still the indexer's lock
                pass
        _held[path] = (f, depth + 1)
        try:
            yield
        finally:
            f, depth = _held.pop(path)
            if depth > 1:
                _held[path] = (f, depth - 1)
            else:
                f.close()  # closing drops the flock


def read_through(path: Path) -> None:
    """Read a file start to end so that its pages sit in the OS page cache (a hint; never fails).

    Why not rely on the memory map or posix_fadvise: faulting a cold mapped index in page by page ran at ~25 MB/s
    on the project's VM (73 s for the 2 GB index of a million photos), and WILLNEED barely helped, while one
    sequential read of the same file takes 2.5 s.
    """
    buf = bytearray(16 << 20)
    try:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    except OSError:
        pass


def collect_garbage(index_dir: Path, key: str, keep: set[str]) -> int:
    """Delete this space's files that the manifest no longer names, and temp files of killed writes.

    Called under the writer lock, so no other writer has a file in flight. A reader still mapping a deleted file
    keeps its pages (POSIX); one that read the previous manifest and opens its files late retries with the new one.
    """
    gone = 0
    for path in [*index_dir.glob(f"{key}.*"), *index_dir.glob(f".{key}.*.tmp")]:
        if path.name in keep or path.name.endswith((".manifest.json", ".lock")):
            continue
        path.unlink(missing_ok=True)
        gone += 1
    return gone


class StreamFile:
    """A file written in pieces under a temp name and renamed into place by `commit` (same guarantees as
    write_atomic, for arrays too large to hold at once: the float16 re-rank vectors of millions of photos)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        fd, self.tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        self.bytes = 0

    def write(self, arr: np.ndarray) -> None:
        """Append an array's raw bytes."""
        data = np.ascontiguousarray(arr).tobytes()
        self.file.write(data)
        self.bytes += len(data)

    def commit(self) -> None:
        """Flush to disk and rename into place."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def abort(self) -> None:
        """Drop the temp file (a failed build)."""
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


class RowFile:
    """A raw (n, d) array file whose rows are read on demand with pread; indexable like the array it holds
    (`rows[int_array]`, `rows[start:stop]`).

    Why not a memory map: a mapped page counts toward the process's RSS once touched, and the kernel maps up to
    64 KiB around every page fault. Re-ranking 200 random float16 rows per query of a 10 GB file grew a query
    process by ~150 MB a query (2.4 GB after 50 queries at 10M photos). Read with pread, the rows still come from
    the OS page cache when warm, but nothing stays in the process.
    """

    def __init__(self, path: Path, dtype: str, shape: tuple[int, int]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.row_bytes = self.dtype.itemsize * shape[1]
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            data = os.pread(self._fd, max(0, stop - start) * self.row_bytes, start * self.row_bytes)
            return np.frombuffer(data, self.dtype).reshape(-1, self.shape[1])
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for i, row in enumerate(rows.tolist()):
            if os.preadv(self._fd, [out[i]], row * self.row_bytes) != self.row_bytes:
                raise ValueError(f"{self.path.name} ends before row {row}")
        return out

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
