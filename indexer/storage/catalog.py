"""The SQL catalog: photos, per-space embeddings and generations. The source of truth for everything else.

SQLite (default) runs in WAL mode with a busy timeout so that the UI reads while the indexer writes; any
SQLAlchemy URL works (PostgreSQL is tested against a real server).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import and_, create_engine, delete, event, false, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from clipsearch.indexer.errors import CatalogError
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.changes import Generations
from clipsearch.indexer.storage.schema import embeddings, ensure_schema, meta, photos, spaces, tags

log = logging.getLogger(__name__)

_CHUNK = 5000  # ids per IN (...) clause; keeps SQLite under its variable limit


def display_path(raw: bytes) -> str:
    """Text form of a raw path for display and prefix filters (undecodable bytes become U+FFFD)."""
    return raw.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class KnownFile:
    """What the catalog remembers of one path: enough to decide new/changed/unchanged without reading it."""

    id: int
    size: int
    mtime_ns: int
    status: str
    content_hash: str | None


@dataclass(frozen=True)
class PhotoRecord:
    """One photo row to insert or update (id None means new)."""

    path_bytes: bytes
    size: int
    mtime_ns: int
    status: str
    reason: str | None = None
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    format: str | None = None
    id: int | None = None

    def row(self) -> dict[str, Any]:
        """Column values for photos.insert()/update()."""
        path = display_path(self.path_bytes)
        return {
            "path_bytes": self.path_bytes,
            "path": path,
            "folder": display_path(os.path.dirname(self.path_bytes)),
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "content_hash": self.content_hash,
            "width": self.width,
            "height": self.height,
            "taken_at": self.taken_at,
            "date": self.taken_at or datetime.fromtimestamp(self.mtime_ns / 1e9),
            "camera_make": (self.camera_make or None) and self.camera_make[:128],
            "camera_model": (self.camera_model or None) and self.camera_model[:128],
            "format": self.format,
            "status": self.status,
            "reason": self.reason,
            "updated_at": datetime.now(),
        }


@dataclass(frozen=True)
class SpaceInfo:
    """A row of the spaces table with its current vector count."""

    id: int
    key: str
    label: str
    model_spec: str
    dim: int
    generation: int
    count: int
    diff_from: int = 0  # changes to its vectors are on record from this generation on (see changes.py)


def _chunks(items: list[Any], n: int = _CHUNK) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Catalog:
    """Typed access to the catalog tables. All writes of a batch go through one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        for attempt in range(3):
            try:
                self.engine: Engine = self._make_engine(url)
                with self.engine.begin() as conn:
                    ensure_schema(conn)
                return
            except SQLAlchemyError as e:
                # Another process (the indexer, or the UI) may be creating the same fresh catalog right now: the
                # tables it made between our check and our CREATE are there on the next try.
                racing = "already exists" in str(e) or isinstance(e, IntegrityError)  # the version row, written twice
                if attempt == 2 or not racing:
                    raise CatalogError(f"cannot open catalog {self._safe_url()}: {str(e).splitlines()[0]}") from e
                self.engine.dispose()
                time.sleep(0.2)

    def _safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "<catalog>"

    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA cache_size=-65536")  # 64 MiB: bulk writes (a tagging run) stay in memory
                cur.close()

            return engine
        return create_engine(url, pool_pre_ping=True)

    def dispose(self) -> None:
        """Close pooled connections (tests and the CLI call this at the end)."""
        self.engine.dispose()

    # --- meta ---------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A value from the meta table (e.g. the last model used to index)."""
        with self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        """Insert or replace a meta value."""
        with self.engine.begin() as conn:
            conn.execute(delete(meta).where(meta.c.key == key))
            conn.execute(insert(meta).values(key=key, value=value))

    # --- spaces -------------------------------------------------------------------------------------------------
    def ensure_space(self, key: str, label: str, model_spec: str, dim: int) -> int:
        """Id of the space with this key, creating it on first use."""
        with self.engine.begin() as conn:
            row = conn.execute(select(spaces.c.id, spaces.c.dim).where(spaces.c.key == key)).first()
            if row:
                if row.dim != dim:
                    raise CatalogError(f"embedding space {label} is recorded with dim {row.dim}, the model gives {dim}")
                return int(row.id)
            res = conn.execute(insert(spaces).values(key=key, label=label, model_spec=model_spec, dim=dim,
                                                     generation=0, created_at=datetime.now()))
            return int(res.inserted_primary_key[0])

    def spaces(self) -> list[SpaceInfo]:
        """All embedding spaces with their vector counts."""
        counts = select(embeddings.c.space_id, func.count().label("n")).group_by(embeddings.c.space_id).subquery()
        q = select(spaces, func.coalesce(counts.c.n, 0).label("n")).outerjoin(counts, counts.c.space_id == spaces.c.id)
        with self.engine.connect() as conn:
            return [
                SpaceInfo(r.id, r.key, r.label, r.model_spec, r.dim, int(r.generation), int(r.n), int(r.diff_from))
                for r in conn.execute(q.order_by(spaces.c.id))
            ]

    def space(self, space_id: int, with_count: bool = True) -> SpaceInfo:
        """One space by id. Counting scans the space's vectors: hot paths pass with_count=False (count is -1)
        and rely on `generation`, which changes with every change to the space's vectors."""
        if with_count:
            for s in self.spaces():
                if s.id == space_id:
                    return s
        else:
            with self.engine.connect() as conn:
                r = conn.execute(select(spaces).where(spaces.c.id == space_id)).first()
            if r is not None:
                return SpaceInfo(r.id, r.key, r.label, r.model_spec, r.dim, int(r.generation), -1, int(r.diff_from))
        raise CatalogError(f"no embedding space with id {space_id}")

    def has_vectors(self, space_id: int) -> bool:
        """Whether the space holds any vector (a LIMIT 1 probe, not a count)."""
        with self.engine.connect() as conn:
            q = select(embeddings.c.photo_id).where(embeddings.c.space_id == space_id).limit(1)
            return conn.execute(q).first() is not None

    def identity(self) -> str:
        """A random id given to this catalog when first asked: index manifests record it, so an index dir that
        belongs to another catalog (another --db-url with the same home) is never taken for this one's."""
        found = self.get_meta("catalog_id")
        if found is None:
            import uuid

            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(meta).values(key="catalog_id", value=uuid.uuid4().hex))
            except IntegrityError:
                pass  # another process gave it one first
            found = self.get_meta("catalog_id")
        return str(found)

    # --- scanning support ---------------------------------------------------------------------------------------
    def known_files(self, under: list[bytes] | None = None) -> dict[bytes, KnownFile]:
        """Catalogued paths with their size/mtime/status/hash (one query, for the scanner). `under` (folders, as
        bytes) limits them to those trees with range scans of the path index: planning a run over one folder of a
        million-photo library then reads its rows, not a million (6 s of a 9 s plan, bench/RESULTS.md issue 14)."""
        q = select(photos.c.id, photos.c.path_bytes, photos.c.size, photos.c.mtime_ns, photos.c.status,
                   photos.c.content_hash)
        if under is not None:  # b"/a/b/" <= path < b"/a/b0": every path in the tree ('0' follows '/')
            tops = [d.rstrip(b"/") + b"/" for d in under]
            q = q.where(or_(false(), *(and_(photos.c.path_bytes >= t, photos.c.path_bytes < t[:-1] + b"0")
                                       for t in tops)))
        with self.engine.connect() as conn:
            return {
                bytes(r.path_bytes): KnownFile(r.id, r.size, r.mtime_ns, r.status, r.content_hash)
                for r in conn.execute(q)
            }

    def embedded_ids(self, space_id: int, among: Iterable[int] | None = None) -> set[int]:
        """Photo ids that have a vector in this space (only those `among` the given ids, when given)."""
        q = select(embeddings.c.photo_id).where(embeddings.c.space_id == space_id)
        with self.engine.connect() as conn:
            if among is None:
                return set(conn.execute(q).scalars())
            return {i for chunk in _chunks(list(among)) for i in conn.execute(q.where(
                embeddings.c.photo_id.in_(chunk))).scalars()}

    def hashes_with_vectors(self, space_id: int) -> dict[str, int]:
        """content hash → a photo id holding a vector in this space (to reuse instead of re-embedding)."""
        q = (
            select(photos.c.content_hash, photos.c.id)
            .join(embeddings, embeddings.c.photo_id == photos.c.id)
            .where(embeddings.c.space_id == space_id, photos.c.content_hash.is_not(None))
        )
        with self.engine.connect() as conn:
            return {h: i for h, i in conn.execute(q)}

    # --- writes -------------------------------------------------------------------------------------------------
    def write_batch(
        self,
        space_id: int,
        records: list[PhotoRecord],
        vectors: dict[int, np.ndarray],
        moves: list[tuple[int, bytes, int, int]] | None = None,
        copies: list[tuple[int, PhotoRecord]] | None = None,
        extra_vectors: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Write one batch atomically: rows (new or changed), their vectors, moved and copied photos.

        `vectors` maps an index into `records` to its embedding. A changed photo loses its vectors in other
        spaces and its tags (they describe the old content). Moves (id, path, size, mtime) keep id, metadata,
        vectors and tags; copies get a new row and the source's vectors in every space; `extra_vectors` adds this
        space's vector to existing photos without touching anything else.
        """
        moves, copies, extra_vectors = moves or [], copies or [], extra_vectors or {}
        with self.engine.begin() as conn:
            gen = Generations(conn)
            pids = self._insert_new(conn, records)
            for i, rec in enumerate(records):
                if rec.id is not None:
                    pid = pids[i] = rec.id
                    conn.execute(update(photos).where(photos.c.id == pid).values(**rec.row()))
                    stale = conn.execute(select(embeddings.c.space_id).where(embeddings.c.photo_id == pid))
                    gen.removed((pid, sid) for sid in stale.scalars().all())
                    conn.execute(delete(embeddings).where(embeddings.c.photo_id == pid))
                    conn.execute(delete(tags).where(tags.c.photo_id == pid))
            rows = [{"photo_id": pids[i], "space_id": space_id, "seq": gen(space_id),
                     "vector": np.asarray(vec, dtype="<f4").tobytes()} for i, vec in vectors.items()]
            if rows:
                conn.execute(insert(embeddings), rows)  # one executemany, not a statement per photo
            for pid, path_bytes, size, mtime_ns in moves:
                conn.execute(update(photos).where(photos.c.id == pid).values(
                    path_bytes=path_bytes, path=display_path(path_bytes),
                    folder=display_path(os.path.dirname(path_bytes)), size=size, mtime_ns=mtime_ns,
                    updated_at=datetime.now()))
            for pid, vec in extra_vectors.items():
                conn.execute(insert(embeddings).values(photo_id=pid, space_id=space_id, seq=gen(space_id),
                                                       vector=np.asarray(vec, dtype="<f4").tobytes()))
            for src, rec in copies:
                new_id = conn.execute(insert(photos).values(**rec.row())).inserted_primary_key[0]
                rows = conn.execute(select(embeddings.c.space_id, embeddings.c.vector).where(
                    embeddings.c.photo_id == src)).all()
                for sid, vec in rows:
                    conn.execute(insert(embeddings).values(photo_id=new_id, space_id=sid, vector=vec, seq=gen(sid)))

    @staticmethod
    def _insert_new(conn: Any, records: list[PhotoRecord]) -> dict[int, int]:
        """Insert the batch's new rows in one statement; record index -> new photo id. RETURNING with
        `sort_by_parameter_order` gives the ids in record order (SQLite >= 3.35 and PostgreSQL): per-row INSERTs
        held the commit stage to ~3,500 photos/s, under one GPU's embedding rate (bench/RESULTS.md issue 16)."""
        new = [i for i, rec in enumerate(records) if rec.id is None]
        if not new:
            return {}
        ids = conn.execute(insert(photos).returning(photos.c.id, sort_by_parameter_order=True),
                           [records[i].row() for i in new]).scalars().all()
        return dict(zip(new, ids, strict=True))

    def remove_photos(self, ids: list[int]) -> int:
        """Delete photos (and, by cascade, their vectors and tags); returns how many went."""
        if not ids:
            return 0
        with self.engine.begin() as conn:
            gen = Generations(conn)
            for chunk in _chunks(ids):
                gen.removed(conn.execute(select(embeddings.c.photo_id, embeddings.c.space_id)
                                         .where(embeddings.c.photo_id.in_(chunk))).all())
                conn.execute(delete(embeddings).where(embeddings.c.photo_id.in_(chunk)))
                conn.execute(delete(tags).where(tags.c.photo_id.in_(chunk)))
                conn.execute(delete(photos).where(photos.c.id.in_(chunk)))
        return len(ids)

    # --- reads --------------------------------------------------------------------------------------------------
    def iter_vectors(self, space_id: int, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids int64, vectors float32 (n, D)) of a space in id order, for index (re)builds."""
        last = -1
        with self.engine.connect() as conn:
            while True:
                rows = conn.execute(
                    select(embeddings.c.photo_id, embeddings.c.vector)
                    .where(embeddings.c.space_id == space_id, embeddings.c.photo_id > last)
                    .order_by(embeddings.c.photo_id)
                    .limit(batch)
                ).all()
                if not rows:
                    return
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype="<f4").reshape(len(rows), -1)
                last = int(ids[-1])
                yield ids, vecs.astype(np.float32, copy=False)

    def vectors_for(self, space_id: int, ids: list[int]) -> dict[int, np.ndarray]:
        """Stored vectors of the given photos in a space (missing ids are absent)."""
        out: dict[int, np.ndarray] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(ids):
                q = select(embeddings.c.photo_id, embeddings.c.vector).where(
                    embeddings.c.space_id == space_id, embeddings.c.photo_id.in_(chunk)
                )
                for pid, vec in conn.execute(q):
                    out[int(pid)] = np.frombuffer(bytes(vec), dtype="<f4").astype(np.float32)
        return out

    def sample_vectors(self, space_id: int, n: int) -> np.ndarray:
        """Up to n random vectors of a space (relevance calibration), without reading the whole space."""
        q = (select(embeddings.c.vector).where(embeddings.c.space_id == space_id)
             .order_by(func.random()).limit(n))
        with self.engine.connect() as conn:
            blobs = [bytes(v) for v in conn.execute(q).scalars()]
        if not blobs:
            return np.zeros((0, 0), np.float32)
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1).astype(np.float32)

    def photos_by_id(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Photo rows (as dicts, without the raw path) for the given ids."""
        out: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(ids):
                for r in conn.execute(select(photos).where(photos.c.id.in_(chunk))):
                    out[int(r.id)] = dict(r._mapping)
        return out

    def counts_by_status(self) -> dict[str, int]:
        """Photo counts per status; every documented status is present (0 when none)."""
        out = {str(s): 0 for s in PhotoStatus}
        with self.engine.connect() as conn:
            for status, n in conn.execute(select(photos.c.status, func.count()).group_by(photos.c.status)):
                out[status] = int(n)
        return out

    def failures(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Files that could not be indexed, with their reasons."""
        q = (
            select(photos.c.id, photos.c.path, photos.c.status, photos.c.reason)
            .where(photos.c.status != PhotoStatus.INDEXED)
            .order_by(photos.c.path)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]
