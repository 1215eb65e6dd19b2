"""Walk photo roots: bytes paths end to end (lossless for any file name), loop-safe, never into the app's home.

Only files with an image extension (case-insensitive) are candidates; whether they really are images is decided
from their content by the decoder. Every other regular file is counted by extension, so that `status` can account
for each file under a root ("412 .mov, 38 .xmp skipped") instead of letting them vanish.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.indexer.ingest.decode import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

_EXTS = {e.encode() for e in IMAGE_EXTENSIONS}
_EXT_SHAPE = re.compile(r"\.[a-z0-9_+~-]{1,10}")  # what counts as an extension: ".mov", not ".05 party shots"
SAMPLE_DIR_NAME = "sample-library"  # the demo's generated library: the one folder inside home that may be indexed


@dataclass(frozen=True)
class FoundFile:
    """A candidate photo on disk with the stat fields used for change detection."""

    path: bytes
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    """Everything a walk found, plus places it could not look into (with reasons)."""

    files: list[FoundFile] = field(default_factory=list)
    skipped: list[tuple[bytes, str]] = field(default_factory=list)
    # regular files that are not candidates, by lower-case extension with its dot ("" for none or a non-extension)
    skipped_by_ext: Counter[str] = field(default_factory=Counter)


def skipped_extension(name: bytes) -> str:
    """The key a non-photo file is counted under: ".mov", ".xmp", or "" (no extension, or a name like "v1.0 final")."""
    ext = os.path.splitext(name)[1].decode("utf-8", "backslashreplace").lower()
    return ext if _EXT_SHAPE.fullmatch(ext) else ""


def _is_within(path: bytes, parent: bytes) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep.encode()) + os.sep.encode())


def scan(roots: list[Path], home: Path, follow_symlinks: bool = False) -> ScanResult:
    """Find candidate photos under `roots`. Unreadable dirs are recorded in `skipped`, other files counted in
    `skipped_by_ext`; nothing raises."""
    result = ScanResult()
    home_b = os.fsencode(os.path.realpath(home))
    sample_b = os.fsencode(os.path.realpath(Path(home) / SAMPLE_DIR_NAME))
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[bytes] = set()
    stack = [os.fsencode(os.path.abspath(r)) for r in roots]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if _is_within(real, home_b) and not _is_within(real, sample_b):
            log.info("skipping the app's own data dir %s", os.fsdecode(d))
            continue
        try:
            st = os.stat(d)
        except OSError as e:
            result.skipped.append((d, f"unreadable: {e.strerror}"))
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # symlink loop or a dir reached twice
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            result.skipped.append((d, f"unreadable: {e.strerror}"))
            continue
        for entry in entries:
            try:
                if entry.is_symlink() and not follow_symlinks:
                    continue
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    stack.append(entry.path)
                    continue
                if os.path.splitext(entry.name)[1].lower() not in _EXTS:
                    if entry.is_file(follow_symlinks=follow_symlinks):
                        result.skipped_by_ext[skipped_extension(entry.name)] += 1
                    continue
                est = entry.stat(follow_symlinks=follow_symlinks)
                if not stat.S_ISREG(est.st_mode) or entry.path in seen_files:
                    continue
                seen_files.add(entry.path)
                result.files.append(FoundFile(entry.path, est.st_size, est.st_mtime_ns))
            except OSError as e:
                result.skipped.append((entry.path, f"unreadable: {e.strerror}"))
    result.files.sort(key=lambda f: f.path)
    return result
