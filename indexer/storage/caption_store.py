"""Captions per photo with a full-text index, so a library can be searched by the words its captions use.

Additive and created on first use (outside the versioned schema in schema.py), like the OCR text. `caption_texts`
holds one row per photo and captioner (a library may keep the demo's captions and a CoCa model's side by side);
each row records the content hash it was made from, so a photo whose file changed is captioned again rather than
described by its old content, and is left out of searches until then. Rows go with their photo (`ON DELETE
CASCADE`, and on SQLite the index follows through triggers: indexer/storage/fts.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection

from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.fts import all_words, create_fts, create_once, fts_name, words
from clipsearch.indexer.storage.schema import photos

_metadata = MetaData()
caption_texts = Table(
    "caption_texts",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # the FTS5 rowid on SQLite
    Column("photo_id", Integer, ForeignKey(photos.c.id, ondelete="CASCADE"), nullable=False),
    Column("captioner", String(255), nullable=False),  # which captioner wrote it (search/captions.captioner_label)
    Column("content_hash", String(64)),  # the content the caption was made from
    Column("text", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("photo_id", "captioner", name="uq_caption_texts_photo_captioner"),
)
_CHUNK = 500  # ids per IN (...) list


class CaptionStore:
    """Writes captions and answers word queries over them; reads see only captions of a photo's current content."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.sqlite = catalog.engine.dialect.name == "sqlite"
        create_once(catalog.engine, self._create, "caption")

    @staticmethod
    def _create(conn: Connection) -> None:
        caption_texts.create(conn, checkfirst=True)
        create_fts(conn, caption_texts.name)

    def put(self, captions: dict[int, str], captioner: str) -> int:
        """Store captions in one transaction, replacing this captioner's earlier ones for the same photos; returns
        how many were stored (photos removed meanwhile are skipped). Either all are written or none."""
        if not captions:
            return 0
        ids = sorted(captions)
        now = datetime.now()
        with self.catalog.engine.begin() as conn:
            hashes: dict[int, str | None] = {}
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                hashes.update((i, h) for i, h in conn.execute(select(photos.c.id, photos.c.content_hash)
                                                              .where(photos.c.id.in_(chunk))))
                conn.execute(delete(caption_texts).where(caption_texts.c.captioner == captioner,
                                                         caption_texts.c.photo_id.in_(chunk)))
            rows = [{"photo_id": i, "captioner": captioner, "content_hash": hashes[i], "text": captions[i].strip(),
                     "created_at": now} for i in ids if i in hashes]
            if rows:
                conn.execute(insert(caption_texts), rows)
        return len(rows)

    def photos_needing(self, captioner: str, redo: bool = False) -> list[int]:
        """Ids of indexed photos with no caption from `captioner` for their current content (never captioned, or
        the file changed since), in id order; with `redo`, every indexed photo."""
        q = select(photos.c.id).where(photos.c.status == PhotoStatus.INDEXED).order_by(photos.c.id)
        if not redo:
            mine = (caption_texts.c.photo_id == photos.c.id) & (caption_texts.c.captioner == captioner)
            q = q.outerjoin(caption_texts, mine).where(
                caption_texts.c.id.is_(None) | caption_texts.c.content_hash.is_distinct_from(photos.c.content_hash))
        with self.catalog.engine.connect() as conn:
            return [int(i) for i in conn.execute(q).scalars()]

    def captions_of(self, ids: Iterable[int], captioner: str | None = None) -> dict[int, str]:
        """photo id -> its caption for its current content (the newest when several captioners wrote one, unless
        `captioner` picks one); photos without one are absent."""
        ids = list(ids)
        out: dict[int, str] = {}
        with self.catalog.engine.connect() as conn:
            for start in range(0, len(ids), _CHUNK):
                q = (select(caption_texts.c.photo_id, caption_texts.c.text)
                     .join(photos, photos.c.id == caption_texts.c.photo_id)
                     .where(caption_texts.c.photo_id.in_(ids[start : start + _CHUNK]))
                     .where(caption_texts.c.content_hash.is_not_distinct_from(photos.c.content_hash))
                     .order_by(caption_texts.c.created_at, caption_texts.c.id))
                if captioner is not None:
                    q = q.where(caption_texts.c.captioner == captioner)
                out.update((int(i), t) for i, t in conn.execute(q))
        return out

    def search(self, query: str, k: int | None = 20, captioner: str | None = None) -> list[tuple[int, float]]:
        """(photo id, score) of indexed photos whose current caption holds every word of `query` (any order), best
        first: -bm25 on SQLite, ts_rank on PostgreSQL (positive, higher is better; a photo captioned by several
        captioners counts once, by its best caption). `k` None: every match (for filtering afterwards)."""
        terms = words(query)
        if not terms:
            return []
        mine = "AND c.captioner = :captioner" if captioner is not None else ""
        if self.sqlite:
            fts = fts_name(caption_texts.name)
            inner = (f"SELECT c.photo_id AS pid, -bm25({fts}) AS s FROM {fts} f JOIN caption_texts c ON c.id = f.rowid "
                     f"JOIN photos p ON p.id = c.photo_id WHERE {fts} MATCH :m AND p.status = 'indexed' "
                     f"AND c.content_hash IS p.content_hash {mine}")
        else:
            inner = ("SELECT c.photo_id AS pid, ts_rank(c.tsv, q) AS s FROM caption_texts c JOIN photos p "
                     "ON p.id = c.photo_id, plainto_tsquery('simple', :m) q WHERE c.tsv @@ q AND p.status = 'indexed' "
                     f"AND c.content_hash IS NOT DISTINCT FROM p.content_hash {mine}")
        # materialised first: SQLite's bm25() cannot run inside a query flattened into the GROUP BY
        sql = (f"WITH hits AS MATERIALIZED ({inner}) "
               "SELECT pid, max(s) AS best FROM hits GROUP BY pid ORDER BY best DESC, pid")
        params: dict[str, object] = {"m": all_words(terms, self.sqlite), "captioner": captioner}
        if k is not None:
            sql += " LIMIT :k"
            params["k"] = int(k)
        with self.catalog.engine.connect() as conn:
            return [(int(i), float(s)) for i, s in conn.execute(text(sql), params)]

    def count(self, captioner: str | None = None) -> int:
        """How many photos have a caption for their current content (from `captioner`, or from any)."""
        q = (select(caption_texts.c.photo_id).distinct().join(photos, photos.c.id == caption_texts.c.photo_id)
             .where(caption_texts.c.content_hash.is_not_distinct_from(photos.c.content_hash)))
        if captioner is not None:
            q = q.where(caption_texts.c.captioner == captioner)
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(q.subquery())).scalar_one())
