"""Stored perceptual signatures (indexer/ingest/phash.py), one row per photo, so that finding duplicates decodes a
photo once, not on every run.

The table is additive and created on first use (not part of the versioned schema in schema.py): a catalog without
it is simply one where no signature was computed yet. A row is valid while the photo's content hash and the
signature version are the ones it was computed for; deleting a photo deletes its row (foreign key cascade).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from sqlalchemy import Column, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table, delete, insert, select

from clipsearch.indexer.ingest.phash import (
    COLOUR_DIM,
    DESCRIPTOR_DIM,
    N_HASHES,
    SIGNATURE_VERSION,
    PerceptualSignature,
    SignatureTable,
)
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.fts import create_once
from clipsearch.indexer.storage.schema import photos

log = logging.getLogger(__name__)

_CHUNK = 5000  # ids per IN (...) clause

_metadata = MetaData()
signatures = Table(
    "perceptual_signatures",
    _metadata,
    Column("photo_id", Integer, ForeignKey(photos.c.id, ondelete="CASCADE"), primary_key=True),
    Column("content_hash", String(64)),  # the content the row describes; another hash means the photo changed
    Column("version", Integer, nullable=False),  # SIGNATURE_VERSION that computed it
    Column("aspect", Float, nullable=False),
    Column("hashes", LargeBinary, nullable=False),  # N_HASHES uint64, little-endian
    Column("descriptor", LargeBinary, nullable=False),  # DESCRIPTOR_DIM float16, little-endian
    Column("colours", LargeBinary, nullable=False),  # COLOUR_DIM int8
)


class SignatureStore:
    """Reads and writes perceptual signatures of catalogued photos."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        create_once(catalog.engine, lambda conn: signatures.create(conn, checkfirst=True), "perceptual signature")

    def photos_needing(self, photo_ids: Iterable[int] | None = None) -> list[tuple[int, bytes]]:
        """(id, raw path) of indexed photos (all, or those given) with no valid signature: none stored, or one of
        other content or an older signature version."""
        q = (select(photos.c.id, photos.c.path_bytes)
             .outerjoin(signatures, signatures.c.photo_id == photos.c.id)
             .where(photos.c.status == PhotoStatus.INDEXED)
             .where((signatures.c.photo_id.is_(None)) | (signatures.c.version != SIGNATURE_VERSION)
                    | (signatures.c.content_hash.is_distinct_from(photos.c.content_hash))))
        with self.catalog.engine.connect() as conn:
            if photo_ids is None:
                return [(int(i), bytes(p)) for i, p in conn.execute(q.order_by(photos.c.id))]
            wanted = sorted(set(photo_ids))
            out: list[tuple[int, bytes]] = []
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                out += [(int(i), bytes(p)) for i, p in conn.execute(q.where(photos.c.id.in_(chunk)))]
            return sorted(out)

    def put(self, items: dict[int, PerceptualSignature]) -> None:
        """Store signatures (replacing older rows) for the photos' current content, in one transaction."""
        if not items:
            return
        ids = sorted(items)
        with self.catalog.engine.begin() as conn:
            hashes: dict[int, str | None] = {}
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                hashes.update((int(i), h) for i, h in conn.execute(
                    select(photos.c.id, photos.c.content_hash).where(photos.c.id.in_(chunk))))
                conn.execute(delete(signatures).where(signatures.c.photo_id.in_(chunk)))
            rows = [{"photo_id": i, "content_hash": hashes[i], "version": SIGNATURE_VERSION,
                     "aspect": float(items[i].aspect),
                     "hashes": np.asarray(items[i].hashes, dtype="<u8").tobytes(),
                     "descriptor": np.asarray(items[i].descriptor, dtype="<f2").tobytes(),
                     "colours": np.asarray(items[i].colours, dtype=np.int8).tobytes()}
                    for i in ids if i in hashes]  # a photo removed meanwhile gets no row
            if rows:
                conn.execute(insert(signatures), rows)

    def load(self, photo_ids: Iterable[int] | None = None) -> SignatureTable:
        """Valid signatures of indexed photos (all, or those given) as arrays."""
        q = (select(signatures.c.photo_id, signatures.c.aspect, signatures.c.hashes, signatures.c.descriptor,
                    signatures.c.colours)
             .join(photos, photos.c.id == signatures.c.photo_id)
             .where(photos.c.status == PhotoStatus.INDEXED, signatures.c.version == SIGNATURE_VERSION)
             .where(signatures.c.content_hash.is_not_distinct_from(photos.c.content_hash)))
        rows: list = []
        with self.catalog.engine.connect() as conn:
            if photo_ids is None:
                rows = conn.execute(q).all()
            else:
                wanted = sorted(set(photo_ids))
                for start in range(0, len(wanted), _CHUNK):
                    rows += conn.execute(q.where(signatures.c.photo_id.in_(wanted[start : start + _CHUNK]))).all()
        if not rows:
            return SignatureTable.empty()
        rows.sort(key=lambda r: r[0])
        n = len(rows)
        return SignatureTable(
            np.fromiter((r[0] for r in rows), np.int64, n),
            np.frombuffer(b"".join(bytes(r[2]) for r in rows), "<u8").reshape(n, N_HASHES).astype(np.uint64),
            np.frombuffer(b"".join(bytes(r[3]) for r in rows), "<f2").reshape(n, DESCRIPTOR_DIM).astype(np.float32),
            np.frombuffer(b"".join(bytes(r[4]) for r in rows), np.int8).reshape(n, COLOUR_DIM).copy(),
            np.fromiter((r[1] for r in rows), np.float32, n))
