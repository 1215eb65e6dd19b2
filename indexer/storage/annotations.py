"""Tags and text collections in the catalog: what zero-shot tagging writes and what image→text ranks against."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import Exists

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.schema import photos, tag_labels, tags, text_collections, text_entries


@dataclass(frozen=True)
class TagRow:
    """One tag on one photo, as exported."""

    photo_id: int
    path: str
    label_set: str
    label: str
    score: float


class TagStore:
    """Writes and reads zero-shot tags; a label set is replaced as a whole, so tagging is idempotent."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def replace_set(self, label_set: str, space_id: int, photo_ids: np.ndarray, label_index: np.ndarray,
                    scores: np.ndarray, names: list[str]) -> int:
        """Replace every tag of `label_set` in one transaction (parallel arrays; labels index into `names`)."""
        with self.writer(label_set, space_id, names) as w:
            w.add(photo_ids, label_index, scores)
        return w.written

    def writer(self, label_set: str, space_id: int, names: list[str]) -> TagSetWriter:
        """A streaming replacement of `label_set`: add tags chunk by chunk while the next chunk is computed."""
        return TagSetWriter(self.catalog, label_set, space_id, names)

    def remove_set(self, label_set: str) -> int:
        """Undo a tagging run: delete every tag of the label set (and its labels); returns how many tags went."""
        with self.catalog.engine.begin() as conn:
            return _delete_set(conn, label_set)

    def label_sets(self) -> dict[str, int]:
        """Label set name → number of tags."""
        with self.catalog.engine.connect() as conn:
            q = (select(tag_labels.c.label_set, func.count()).join(tags, tags.c.label_id == tag_labels.c.id)
                 .group_by(tag_labels.c.label_set).order_by(tag_labels.c.label_set))
            return {s: int(n) for s, n in conn.execute(q)}

    def labels(self) -> list[str]:
        """Every distinct label that some photo carries (for filter widgets)."""
        with self.catalog.engine.connect() as conn:
            q = select(tag_labels.c.label).where(_in_use()).distinct().order_by(tag_labels.c.label)
            return list(conn.execute(q).scalars())

    def tags_of(self, photo_ids: list[int]) -> dict[int, list[str]]:
        """Photo id → its tag labels (all sets)."""
        out: dict[int, list[str]] = {}
        if not photo_ids:
            return out
        with self.catalog.engine.connect() as conn:
            q = (select(tags.c.photo_id, tag_labels.c.label).join(tag_labels, tag_labels.c.id == tags.c.label_id)
                 .where(tags.c.photo_id.in_(photo_ids)).order_by(tag_labels.c.label))
            for pid, label in conn.execute(q):
                out.setdefault(int(pid), []).append(label)
        return out

    def rows(self, label_set: str | None = None) -> list[TagRow]:
        """All tags (optionally of one set) with photo paths, for export."""
        q = (select(tags.c.photo_id, photos.c.path, tag_labels.c.label_set, tag_labels.c.label, tags.c.score)
             .join(photos, photos.c.id == tags.c.photo_id).join(tag_labels, tag_labels.c.id == tags.c.label_id))
        if label_set:
            q = q.where(tag_labels.c.label_set == label_set)
        with self.catalog.engine.connect() as conn:
            return [TagRow(int(a), b, c, d, float(e)) for a, b, c, d, e in
                    conn.execute(q.order_by(photos.c.path, tag_labels.c.label))]


def _in_use() -> Exists:
    """Condition on tag_labels rows: some photo carries the label."""
    return select(tags.c.label_id).where(tags.c.label_id == tag_labels.c.id).exists()


def _delete_set(conn: Connection, label_set: str) -> int:
    """Delete a label set's tags and labels inside the caller's transaction; returns how many tags went."""
    ids = select(tag_labels.c.id).where(tag_labels.c.label_set == label_set).scalar_subquery()
    n = int(conn.execute(delete(tags).where(tags.c.label_id.in_(ids))).rowcount or 0)
    conn.execute(delete(tag_labels).where(tag_labels.c.label_set == label_set))
    return n


class TagSetWriter:
    """Replaces one label set in one transaction, writing on a background thread while the caller computes.

    Tagging a million photos writes a million rows; the database driver releases the GIL while SQLite works, so
    the inserts overlap the next chunk's matrix product instead of following it. Use as a context manager: a
    clean exit commits (the old set is replaced atomically); an exception rolls back and keeps the old set.
    Rows go through the driver's executemany with plain tuples: at a million tags, building SQLAlchemy parameter
    dicts per row would cost more than the insert.
    """

    _QUEUE_CHUNKS = 4  # chunks waiting for the writer at most: bounds memory when the database is the slower side

    def __init__(self, catalog: Catalog, label_set: str, space_id: int, names: list[str]) -> None:
        self.catalog, self.label_set, self.space_id, self.names = catalog, label_set, space_id, names
        self.written = 0
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = queue.Queue(self._QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._commit = False
        self._thread = threading.Thread(target=self._run, name="tag-writer", daemon=True)

    def __enter__(self) -> TagSetWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._commit = exc_type is None
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_type is None:
            raise self._error

    def add(self, photo_ids: np.ndarray, label_index: np.ndarray, scores: np.ndarray) -> None:
        """Queue tags (parallel arrays; labels as indexes into `names`); blocks while the writer is behind."""
        if self._error is not None:
            raise self._error
        if len(photo_ids):
            self._queue.put((np.asarray(photo_ids), np.asarray(label_index), np.asarray(scores)))

    def _rows(self, label_ids: np.ndarray, photo_ids: np.ndarray, label_index: np.ndarray,
              scores: np.ndarray) -> list[tuple]:
        order = np.lexsort((photo_ids, label_index))  # the key's order: each label's rows go in as one run
        return list(zip(photo_ids[order].tolist(), label_ids[label_index[order]].tolist(),
                        scores[order].astype(float).tolist(), strict=True))

    def _labels(self, conn: Connection) -> np.ndarray:
        """Replace the set's labels and tags; returns the new label ids, in the order of `names`."""
        _delete_set(conn, self.label_set)
        if not self.names:
            return np.zeros(0, np.int64)
        conn.execute(insert(tag_labels), [{"label_set": self.label_set, "label": n, "space_id": self.space_id}
                                          for n in self.names])
        got = dict(conn.execute(select(tag_labels.c.label, tag_labels.c.id)
                                .where(tag_labels.c.label_set == self.label_set)).all())
        return np.array([got[n] for n in self.names], np.int64)

    def _run(self) -> None:
        finished = False  # whether the exit sentinel has been taken off the queue
        try:
            with self.catalog.engine.connect() as conn, conn.begin() as trans:
                label_ids = self._labels(conn)
                ph = "?" if conn.dialect.paramstyle == "qmark" else "%s"
                sql = f"INSERT INTO tags (photo_id, label_id, score) VALUES ({ph}, {ph}, {ph})"
                while (item := self._queue.get()) is not None:
                    rows = self._rows(label_ids, *item)
                    conn.exec_driver_sql(sql, rows)
                    self.written += len(rows)
                finished = True
                # labels no photo passed leave no row behind: the filter widgets list only labels in use
                conn.execute(delete(tag_labels).where(tag_labels.c.label_set == self.label_set, ~_in_use()))
                if not self._commit:
                    trans.rollback()  # the caller failed: keep the previous run of this label set
        except BaseException as e:  # reported to the caller by add() or on exit
            self._error = e
            while not finished:  # drain, so a blocked add() and the exit sentinel go through
                finished = self._queue.get() is None


class TextCollections:
    """Named caption collections embedded once per space (catalog rows; the search side builds their index)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def replace(self, name: str, space_id: int, texts: list[str], vectors: np.ndarray) -> int:
        """Create or replace collection `name` in a space with these texts and their vectors."""
        if not texts:
            raise UsageError(f"text collection '{name}' would be empty")
        with self.catalog.engine.begin() as conn:
            cid = conn.execute(select(text_collections.c.id).where(
                text_collections.c.name == name, text_collections.c.space_id == space_id)).scalar()
            if cid is None:
                cid = conn.execute(insert(text_collections).values(name=name, space_id=space_id, generation=1)
                                   ).inserted_primary_key[0]
            else:
                conn.execute(delete(text_entries).where(text_entries.c.collection_id == cid))
                conn.execute(update(text_collections).where(text_collections.c.id == cid).values(
                    generation=text_collections.c.generation + 1))
            rows = [{"collection_id": cid, "text": t, "vector": np.asarray(v, "<f4").tobytes()}
                    for t, v in zip(texts, vectors, strict=True)]
            for i in range(0, len(rows), 20_000):
                conn.execute(insert(text_entries), rows[i : i + 20_000])
        return len(rows)

    def names(self, space_id: int) -> list[str]:
        """Collection names available in a space."""
        with self.catalog.engine.connect() as conn:
            q = select(text_collections.c.name).where(text_collections.c.space_id == space_id)
            return list(conn.execute(q.order_by(text_collections.c.name)).scalars())

    def load(self, name: str, space_id: int) -> tuple[int, list[str], np.ndarray]:
        """(generation, texts, vectors) of a collection; UsageError when it does not exist in this space."""
        with self.catalog.engine.connect() as conn:
            row = conn.execute(select(text_collections.c.id, text_collections.c.generation).where(
                text_collections.c.name == name, text_collections.c.space_id == space_id)).first()
            if row is None:
                raise UsageError(f"no text collection '{name}' for this model; add it with `clipsearch texts add`")
            rows = conn.execute(select(text_entries.c.text, text_entries.c.vector).where(
                text_entries.c.collection_id == row.id).order_by(text_entries.c.id)).all()
        vecs = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype="<f4").reshape(len(rows), -1)
        return int(row.generation), [r[0] for r in rows], vecs.astype(np.float32)
