"""The catalog's change record: which vectors of a space were written or removed since a given generation.

Every write transaction bumps the generation of each space it touches *first* (Generations), so each vector row
carries the generation that wrote it (``embeddings.seq``) and each removal leaves an ``embedding_removals`` row.
The vector store reads "what changed since the generation my files cover" from here and applies only that, instead
of rebuilding its index after every change.

Reading is safe beside a writer without a snapshot: the generation is read first and the changes after it, so a
change read "too early" belongs to a later generation and is simply applied again on the next catch-up (adding a
vector or removing one twice ends in the same state).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, func, insert, select, tuple_, update
from sqlalchemy.engine import Connection, Engine

from clipsearch.indexer.storage.schema import embedding_removals, embeddings, spaces


class Generations:
    """The new generation of each space one write transaction touches, bumped when first touched.

    Bumping first (not at commit) lets every vector row carry the generation that wrote it. The UPDATE holds the
    space row's write lock until commit, so on PostgreSQL too one space's generations commit in order: a reader
    that sees generation G also sees every row written at G or before.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn, self.new = conn, {}

    def __call__(self, space_id: int) -> int:
        if space_id not in self.new:
            self.conn.execute(update(spaces).where(spaces.c.id == space_id)
                              .values(generation=spaces.c.generation + 1))
            self.new[space_id] = int(self.conn.execute(
                select(spaces.c.generation).where(spaces.c.id == space_id)).scalar_one())
        return self.new[space_id]

    def removed(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Record (photo_id, space_id) vectors as removed, at their space's new generation."""
        rows = [{"space_id": int(sid), "generation": self(int(sid)), "photo_id": int(pid)} for pid, sid in pairs]
        if rows:
            self.conn.execute(insert(embedding_removals), rows)


@dataclass(frozen=True)
class ChangeSummary:
    """How much changed in a space between two generations (counts only: cheap to ask before reading)."""

    since: int  # the generation the caller covers
    generation: int  # the space's generation when read (the changes cover at least up to it)
    upserts: int  # vectors written after `since` that still exist
    removals: int  # removal records after `since` (a vector removed then written again counts in both)


def _generation(conn: Connection, space_id: int) -> tuple[int, int]:
    row = conn.execute(select(spaces.c.generation, spaces.c.diff_from).where(spaces.c.id == space_id)).one()
    return int(row.generation), int(row.diff_from)


def summarize(engine: Engine, space_id: int, since: int) -> ChangeSummary | None:
    """Counts of what changed after generation `since`; None when the record does not reach back that far (the
    space's history was pruned after `since`, or `since` predates schema v3): then only a rebuild is exact."""
    with engine.connect() as conn:
        generation, diff_from = _generation(conn, space_id)
        if since < diff_from or since > generation:
            return None
        ups = conn.execute(select(func.count()).select_from(embeddings).where(
            embeddings.c.space_id == space_id, embeddings.c.seq > since)).scalar_one()
        rem = conn.execute(select(func.count()).select_from(embedding_removals).where(
            embedding_removals.c.space_id == space_id, embedding_removals.c.generation > since)).scalar_one()
    return ChangeSummary(since, generation, int(ups), int(rem))


def removed_since(engine: Engine, space_id: int, since: int) -> np.ndarray:
    """Sorted unique ids of vectors removed from the space after generation `since`."""
    q = select(embedding_removals.c.photo_id).where(embedding_removals.c.space_id == space_id,
                                                    embedding_removals.c.generation > since)
    with engine.connect() as conn:
        return np.unique(np.fromiter(conn.execute(q).scalars(), dtype=np.int64))


def upserts_since(engine: Engine, space_id: int, since: int,
                  batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (ids, float32 vectors) written after generation `since` that still exist, in (seq, id) order, in
    chunks: a catch-up after a large import never holds every vector at once."""
    last = (since, -1)
    with engine.connect() as conn:
        while True:
            rows = conn.execute(
                select(embeddings.c.seq, embeddings.c.photo_id, embeddings.c.vector)
                .where(embeddings.c.space_id == space_id, embeddings.c.seq > since,
                       tuple_(embeddings.c.seq, embeddings.c.photo_id) > last)
                .order_by(embeddings.c.seq, embeddings.c.photo_id).limit(batch)).all()
            if not rows:
                return
            ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype="<f4").reshape(len(rows), -1)
            last = (int(rows[-1][0]), int(ids[-1]))
            yield ids, vecs.astype(np.float32, copy=False)


def vector_ids(engine: Engine, space_id: int) -> np.ndarray:
    """Every id holding a vector in the space, sorted (an index-only scan: no vector is read)."""
    q = select(embeddings.c.photo_id).where(embeddings.c.space_id == space_id).order_by(embeddings.c.photo_id)
    with engine.connect() as conn:
        return np.fromiter(conn.execute(q).scalars(), dtype=np.int64)


def vectors_of(engine: Engine, space_id: int, ids: np.ndarray, chunk: int = 5000) -> np.ndarray:
    """(len(ids), D) float32 vectors of the given ids, in their order (ids must exist)."""
    out: dict[int, bytes] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), chunk):
            part = [int(i) for i in ids[start : start + chunk]]
            q = select(embeddings.c.photo_id, embeddings.c.vector).where(
                embeddings.c.space_id == space_id, embeddings.c.photo_id.in_(part))
            out.update((int(pid), bytes(vec)) for pid, vec in conn.execute(q))
    blob = b"".join(out[int(i)] for i in ids)
    return np.frombuffer(blob, dtype="<f4").reshape(len(ids), -1).astype(np.float32)


def prune(engine: Engine, space_id: int, through: int) -> int:
    """Forget removal records up to generation `through` (an index covering `through` no longer needs them); an
    index older than that is rebuilt instead of caught up. Returns how many records went."""
    with engine.begin() as conn:
        generation, diff_from = _generation(conn, space_id)
        through = min(through, generation)
        if through <= diff_from:
            return 0
        n = conn.execute(delete(embedding_removals).where(embedding_removals.c.space_id == space_id,
                                                          embedding_removals.c.generation <= through)).rowcount
        conn.execute(update(spaces).where(spaces.c.id == space_id).values(diff_from=through))
    return int(n or 0)
