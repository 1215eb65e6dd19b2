"""Extra vectors for regions of photos: a few crops per photo (a grid), each pointing back to its photo and box, so
that a small thing in a big photo can be found by a region query (search/region.py).

Opt-in and additive: the table is created on first use, outside the versioned schema, and holds float16 vectors
(half the bytes; a cosine moves by ~1e-3). Rows are valid for the content hash they were computed from; deleting a
photo deletes its rows (foreign key cascade).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sqlalchemy import Column, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, delete, insert, select

from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.fts import create_once
from clipsearch.indexer.storage.schema import embeddings, photos

_metadata = MetaData()
regions = Table(
    "region_vectors",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("photo_id", Integer, ForeignKey(photos.c.id, ondelete="CASCADE"), nullable=False),
    Column("space_id", Integer, nullable=False),
    Column("content_hash", String(64)),  # the content the crops were cut from
    Column("x", Integer, nullable=False),  # box in upright full-resolution pixels
    Column("y", Integer, nullable=False),
    Column("w", Integer, nullable=False),
    Column("h", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float16 little-endian, L2-normalised before rounding
    Index("ix_region_vectors_space_photo", "space_id", "photo_id"),
)


class RegionStore:
    """Reads and writes the region vectors of one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        create_once(catalog.engine, lambda conn: regions.create(conn, checkfirst=True), "region vector")

    def photos_needing(self, space_id: int) -> list[tuple[int, bytes]]:
        """(id, raw path) of photos with a vector in the space but no region vectors for their current content."""
        done = (select(regions.c.photo_id).where(regions.c.space_id == space_id,
                                                  regions.c.photo_id == photos.c.id,
                                                  regions.c.content_hash.is_not_distinct_from(photos.c.content_hash)))
        q = (select(photos.c.id, photos.c.path_bytes)
             .join(embeddings, (embeddings.c.photo_id == photos.c.id) & (embeddings.c.space_id == space_id))
             .where(photos.c.status == PhotoStatus.INDEXED, ~done.exists()).order_by(photos.c.id))
        with self.catalog.engine.connect() as conn:
            return [(int(i), bytes(p)) for i, p in conn.execute(q)]

    def put(self, space_id: int, items: dict[int, tuple[list[tuple[int, int, int, int]], np.ndarray]]) -> None:
        """Replace the region vectors of photos: photo id -> (boxes, vectors (n, D)), in one transaction."""
        if not items:
            return
        ids = sorted(items)
        with self.catalog.engine.begin() as conn:
            hashes = dict(conn.execute(select(photos.c.id, photos.c.content_hash).where(photos.c.id.in_(ids))).all())
            conn.execute(delete(regions).where(regions.c.space_id == space_id, regions.c.photo_id.in_(ids)))
            rows = [{"photo_id": pid, "space_id": space_id, "content_hash": hashes[pid], "x": b[0], "y": b[1],
                     "w": b[2], "h": b[3], "vector": np.asarray(v, dtype="<f2").tobytes()}
                    for pid in ids if pid in hashes for b, v in zip(*items[pid], strict=True)]
            if rows:
                conn.execute(insert(regions), rows)

    def load(self, space_id: int, photo_ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
        """(photo ids (n,), boxes (n, 4), vectors float32 (n, D)) of the valid region vectors of a space."""
        q = (select(regions.c.photo_id, regions.c.x, regions.c.y, regions.c.w, regions.c.h, regions.c.vector)
             .join(photos, photos.c.id == regions.c.photo_id)
             .where(regions.c.space_id == space_id, photos.c.status == PhotoStatus.INDEXED,
                    regions.c.content_hash.is_not_distinct_from(photos.c.content_hash))
             .order_by(regions.c.id))
        if photo_ids is not None:
            q = q.where(regions.c.photo_id.in_(sorted(set(photo_ids))))
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(q).all()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, 4), np.int32), np.zeros((0, 0), np.float32)
        vecs = np.frombuffer(b"".join(bytes(r[5]) for r in rows), "<f2").reshape(len(rows), -1).astype(np.float32)
        return (np.array([r[0] for r in rows], np.int64), np.array([r[1:5] for r in rows], np.int32), vecs)
