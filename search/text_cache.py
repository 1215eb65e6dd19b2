"""Text embeddings kept per process and, optionally, on disk: a query's relevance check embeds dozens of contrast
texts ("a red dog" → "a red cat", "a red car", ...), and related queries share most of them ("a red cat" is
contrasted with "a red dog"). Embedding only the texts not seen before turns the second query of a session from
~0.7 s of text encoding (ViT-B-32, 2 CPU cores; bench/RESULTS.md issue 13) into a few milliseconds, and a repeated
query (the UI re-runs its query on every interaction) into none.

A CLI process starts with an empty memory, so a cold `clipsearch search` would pay for its contrasts every time;
the disk store (one SQLite file per embedding space beside the label cache, shared by every library and process on
the machine) keeps them across processes. It is a cache: a locked, full or unreadable file only costs the encoding.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DISK_MAX_TEXTS = 20_000  # ~40 MB of 512-d vectors; the oldest rows go first past this


class DiskTexts:
    """Text → vector rows of one embedding space in SQLite (WAL, short busy timeout, every error swallowed)."""

    def __init__(self, folder: Path, space_key: str, dim: int, max_texts: int = DISK_MAX_TEXTS) -> None:
        self.path, self.dim, self.max_texts = folder / f"texts-{space_key}.sqlite3", dim, max_texts
        self._db: sqlite3.Connection | None = None
        self._broken = False

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=0.5, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS texts (text TEXT PRIMARY KEY, vec BLOB NOT NULL)")
                self._db = db
            except (OSError, sqlite3.Error) as e:
                log.debug("text cache %s unusable: %s", self.path, e)
                self._broken = True
        return self._db

    def get(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors among `texts` (rows of another width are ignored)."""
        db, found = self._conn(), {}
        if db is None or not texts:
            return found
        try:
            for i in range(0, len(texts), 500):  # SQLite's bound-parameter limit
                part = texts[i : i + 500]
                rows = db.execute(f"SELECT text, vec FROM texts WHERE text IN ({','.join('?' * len(part))})", part)
                for text, blob in rows:
                    vec = np.frombuffer(blob, np.float32)
                    if vec.shape == (self.dim,):
                        found[text] = vec
        except sqlite3.Error as e:
            log.debug("text cache read failed: %s", e)
        return found

    def put(self, texts: list[str], vecs: np.ndarray) -> None:
        """Store new rows, then drop the oldest past max_texts."""
        db = self._conn()
        if db is None or not texts:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            rows = [(t, np.ascontiguousarray(v, np.float32).tobytes()) for t, v in zip(texts, vecs, strict=True)]
            db.executemany("INSERT OR IGNORE INTO texts (text, vec) VALUES (?, ?)", rows)
            db.execute("DELETE FROM texts WHERE rowid <= (SELECT MAX(rowid) FROM texts) - ?", (self.max_texts,))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            log.debug("text cache write failed: %s", e)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


class TextVectors:
    """`encoder.encode_texts` with a least-recently-used cache of single texts (thread-safe; the server shares one),
    backed by a DiskTexts store in `disk_dir` when one is given."""

    def __init__(self, encoder: Any, max_texts: int = 100_000, disk_dir: Path | None = None) -> None:
        self.encoder, self.max_texts = encoder, max_texts
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # texts sent to the encoder (for tests and benchmarks)
        self.disk = DiskTexts(disk_dir, encoder.space.key, int(encoder.space.dim)) if disk_dir else None

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) unit vectors, equal to `encoder.encode_texts(texts)`; only unseen texts are encoded.
        One call at a time: the encoder already uses every core, and a text two callers both miss is encoded once."""
        if not texts:
            return np.zeros((0, int(self.encoder.space.dim)), np.float32)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing and self.disk is not None:
                stored = self.disk.get(missing)
                self._cache.update(stored)
                missing = [t for t in missing if t not in stored]
            if missing:
                vecs = np.asarray(self.encoder.encode_texts(missing), dtype=np.float32)
                self.encoded += len(missing)
                self._cache.update(zip(missing, vecs, strict=True))
                if self.disk is not None:
                    self.disk.put(missing, vecs)
            out = np.stack([self._cache[t] for t in texts])
            for t in texts:
                self._cache.move_to_end(t)
            while len(self._cache) > self.max_texts:
                self._cache.popitem(last=False)
        return out
