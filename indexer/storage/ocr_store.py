"""Recognised text per photo with a full-text index: SQLite FTS5, or PostgreSQL tsvector + GIN.

Additive and created on first use (outside the versioned schema in schema.py): `ocr_texts` holds one row per photo
OCR has looked at, with its status and reason when it failed, so a failed photo keeps its CLIP vector and says why
it has no text. The full-text side uses the 'simple' configuration (PostgreSQL) and the unicode61 tokenizer
(SQLite): words as written, no stemming, any language. A row is valid for the content hash it was read from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    false,
    insert,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Connection

from clipsearch.indexer.ingest.ocr import ENGINE, OcrEngine, OcrResult, read_many
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.fts import create_fts, create_once, fts_name, words  # noqa: F401 - words: re-exported
from clipsearch.indexer.storage.schema import photos

log = logging.getLogger(__name__)
_metadata = MetaData()
ocr_texts = Table(
    "ocr_texts",
    _metadata,
    Column("photo_id", Integer, ForeignKey(photos.c.id, ondelete="CASCADE"), primary_key=True),
    Column("content_hash", String(64)),  # the content the text was read from
    Column("status", String(16), nullable=False),  # ok | failed | timeout
    Column("reason", Text),  # why it failed
    Column("engine", String(64), nullable=False),
    Column("text", Text, nullable=False, default=""),
    Column("lines", Text, nullable=False, default="[]"),  # JSON [[text, score, x, y, w, h], ...] in original pixels
    Column("seconds", Float),
    Column("updated_at", DateTime, nullable=False),
)

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
FUZZY_MIN_LEN = 5  # words at least this long may match with one character read wrong (OCR's usual slip)


def one_edit(word: str) -> list[str]:
    """The word and every string one deletion, substitution, insertion or swap away (a-z, 0-9): what an OCR
    engine that misread one character (l for I, g for q, a doubled letter dropped) stored instead."""
    out = {word}
    for i in range(len(word) + 1):
        head, tail = word[:i], word[i:]
        out.update(head + c + tail for c in _ALPHABET)
        if tail:
            out.add(head + tail[1:])
            out.update(head + c + tail[1:] for c in _ALPHABET)
        if len(tail) > 1:
            out.add(head + tail[1] + tail[0] + tail[2:])
    return sorted(out)


def has_texts(catalog: Catalog) -> bool:
    """Whether OCR ever ran on this catalog (its table exists), checked without creating anything: a search on a
    library without OCR never touches (or adds) the OCR tables."""
    return inspect(catalog.engine).has_table("ocr_texts")


class OcrStore:
    """Writes OCR results and answers full-text queries over them."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.sqlite = catalog.engine.dialect.name == "sqlite"
        create_once(catalog.engine, self._create, "OCR")

    def _create(self, conn: Connection) -> None:
        ocr_texts.create(conn, checkfirst=True)
        self._create_index(conn)

    def _create_index(self, conn: Connection) -> None:
        """The full-text index (fts.create_fts: it follows ocr_texts' rows, cascade deletes included). A catalog
        written before that kept a standalone SQLite table, `ocr_fts`, that kept removed photos' words: it is
        dropped and the new index built from ocr_texts once."""
        if not self.sqlite:
            create_fts(conn, ocr_texts.name, "text", key="photo_id")
            return
        fts = fts_name(ocr_texts.name)
        had = conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = ?", (fts,)).first() is not None
        create_fts(conn, ocr_texts.name, "text", key="photo_id")
        if not had:
            conn.exec_driver_sql("DROP TABLE IF EXISTS ocr_fts")
            conn.exec_driver_sql(f"INSERT INTO {fts}({fts}) VALUES ('rebuild')")

    def photos_needing(self, retry_failed: bool = False, under: list[bytes] | None = None) -> list[tuple[int, bytes]]:
        """(id, raw path) of indexed photos not read for their current content (and failed ones, when asked);
        `under` (folders as bytes) limits them to those trees (`index PATH --ocr` reads the photos under PATH)."""
        q = (select(photos.c.id, photos.c.path_bytes)
             .outerjoin(ocr_texts, ocr_texts.c.photo_id == photos.c.id)
             .where(photos.c.status == PhotoStatus.INDEXED)
             .where(ocr_texts.c.photo_id.is_(None)
                    | ocr_texts.c.content_hash.is_distinct_from(photos.c.content_hash)
                    | ((ocr_texts.c.status != "ok") if retry_failed else False))
             .order_by(photos.c.id))
        if under is not None:  # b"/a/b/" <= path < b"/a/b0": the tree, by range scans (as Catalog.known_files)
            tops = [d.rstrip(b"/") + b"/" for d in under]
            q = q.where(or_(false(), *(and_(photos.c.path_bytes >= t, photos.c.path_bytes < t[:-1] + b"0")
                                       for t in tops)))
        with self.catalog.engine.connect() as conn:
            return [(int(i), bytes(p)) for i, p in conn.execute(q)]

    def put(self, results: dict[int, OcrResult], engine: str) -> None:
        """Store results (replacing earlier ones) in one transaction; boxes go back to original pixels."""
        if not results:
            return
        ids = sorted(results)
        now = datetime.now()
        with self.catalog.engine.begin() as conn:
            hashes = dict(conn.execute(select(photos.c.id, photos.c.content_hash).where(photos.c.id.in_(ids))).all())
            ids = [i for i in ids if i in hashes]  # removed meanwhile
            conn.execute(delete(ocr_texts).where(ocr_texts.c.photo_id.in_(ids)))
            rows = []
            for i in ids:
                r = results[i]
                lines = [[ln.text, round(ln.score, 3), *(round(v / r.scale) for v in ln.box)] for ln in r.lines]
                rows.append({"photo_id": i, "content_hash": hashes[i], "status": r.status, "reason": r.reason,
                             "engine": engine, "text": r.text, "lines": json.dumps(lines), "seconds": r.seconds,
                             "updated_at": now})
            if rows:
                conn.execute(insert(ocr_texts), rows)

    def search(self, query: str, k: int = 20, phrase: bool = True, fuzzy: bool = True,
               photo_ids: Iterable[int] | None = None) -> list[tuple[int, float]]:
        """(photo id, score) of photos whose text matches the query's words, best first. `phrase`: the words in
        that order, next to each other (or written as one word: a space OCR missed); else all of them anywhere.
        When nothing matches exactly and `fuzzy`, words of FUZZY_MIN_LEN or more letters also match one misread
        character away (all words must match; order is not checked then). Scores are positive, higher is better;
        `photo_ids` filters the top k afterwards."""
        terms = words(query)
        if not terms:
            return []
        found = self._match([[t] for t in terms], k, phrase)
        if not found and phrase and len(terms) > 1:  # OCR often drops the space between words: "INVOICE2024"
            found = self._match([["".join(terms)]], k, phrase)
        if not found and fuzzy and any(len(t) >= FUZZY_MIN_LEN for t in terms):
            found = self._match([one_edit(t) if len(t) >= FUZZY_MIN_LEN else [t] for t in terms], k, False)
        if photo_ids is not None:
            allowed = set(photo_ids)
            found = [f for f in found if f[0] in allowed]
        return found

    def _match(self, groups: list[list[str]], k: int, phrase: bool) -> list[tuple[int, float]]:
        """Full-text query: every group must match (a group matches when any of its words does)."""
        if self.sqlite:
            if phrase and all(len(g) == 1 for g in groups):
                match = '"' + " ".join(g[0] for g in groups) + '"'
            else:
                match = " AND ".join("(" + " OR ".join(f'"{w}"' for w in g) + ")" for g in groups)
            fts = fts_name(ocr_texts.name)
            sql = (f"SELECT o.photo_id, -bm25({fts}) AS s FROM {fts} JOIN ocr_texts o ON o.photo_id = {fts}.rowid "
                   f"JOIN photos p ON p.id = o.photo_id WHERE {fts} MATCH :m AND p.status = 'indexed' "
                   "AND o.content_hash IS p.content_hash ORDER BY s DESC, o.photo_id LIMIT :k")
        else:
            if phrase and all(len(g) == 1 for g in groups):
                match = " <-> ".join(g[0] for g in groups)
            else:
                match = " & ".join("(" + " | ".join(g) + ")" for g in groups)
            sql = ("SELECT o.photo_id, ts_rank(o.tsv, q) AS s FROM ocr_texts o JOIN photos p ON p.id = o.photo_id, "
                   "to_tsquery('simple', :m) q WHERE o.tsv @@ q AND p.status = 'indexed' "
                   "AND o.content_hash IS NOT DISTINCT FROM p.content_hash ORDER BY s DESC, o.photo_id LIMIT :k")
        with self.catalog.engine.connect() as conn:
            return [(int(i), float(s)) for i, s in conn.execute(text(sql), {"m": match, "k": k})]

    def texts_of(self, ids: list[int]) -> dict[int, dict]:
        """photo id -> {status, reason, text, lines} for the lightbox (matched words are highlighted there)."""
        if not ids:
            return {}
        q = select(ocr_texts.c.photo_id, ocr_texts.c.status, ocr_texts.c.reason, ocr_texts.c.text,
                   ocr_texts.c.lines).where(ocr_texts.c.photo_id.in_(ids))
        with self.catalog.engine.connect() as conn:
            return {int(r[0]): {"status": r[1], "reason": r[2], "text": r[3], "lines": json.loads(r[4])}
                    for r in conn.execute(q)}

    def failures(self, limit: int = 1000) -> list[dict]:
        """Photos whose OCR failed or timed out, with the reason."""
        q = (select(ocr_texts.c.photo_id, photos.c.path, ocr_texts.c.status, ocr_texts.c.reason)
             .join(photos, photos.c.id == ocr_texts.c.photo_id).where(ocr_texts.c.status != "ok").limit(limit))
        with self.catalog.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]


@dataclass
class OcrReport:
    """What an OCR pass did: photos read, how many had text, and the failures (their CLIP vectors are untouched)."""

    statuses: dict[str, int] = field(default_factory=dict)  # ok | failed | timeout -> photos
    with_text: int = 0  # ok or timed-out photos in which some text was found
    failures: list[dict[str, Any]] = field(default_factory=list)  # {id, status, reason}, the first 1000
    seconds: float = 0.0
    interrupted: bool = False  # a stop was requested: the pass ended after a stored part; re-run to resume

    @property
    def read(self) -> int:
        """Photos looked at."""
        return sum(self.statuses.values())

    def summary(self) -> str:
        """One line for people: read, with text, failed, and the first failure's reason."""
        d = self.as_dict()
        line = f"text: read {d['read']} photos, {d['with_text']} with text, {d['failed']} failed in {d['seconds']:.1f}s"
        if self.failures:
            first = self.failures[0]
            line += f" (#{first['id']}: {first['reason']}; clipsearch ocr --retry-failed reads them again)"
        return line

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (what `clipsearch ocr --json` prints, and `index --ocr --json` under "ocr")."""
        failed = self.statuses.get("failed", 0) + self.statuses.get("timeout", 0)
        return {"read": self.read, "with_text": self.with_text, "failed": failed, "statuses": dict(self.statuses),
                "failures": self.failures, "seconds": round(self.seconds, 3), "interrupted": self.interrupted}


def read_and_store(catalog: Catalog, todo: list[tuple[int, bytes]], workers: int = 1,
                   engine: OcrEngine | None = None, on_progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> OcrReport:
    """OCR (id, path) pairs through `read_many` (worker processes when workers > 1) and store each part as it
    comes; `should_stop()` is asked between parts. The one loop behind `index --ocr` and `clipsearch ocr`."""
    t0 = time.perf_counter()
    store, report, done = OcrStore(catalog), OcrReport(), 0
    parts = read_many(todo, workers, engine=engine)
    try:
        for results in parts:
            store.put(results, ENGINE)
            for pid, r in results.items():
                report.statuses[r.status] = report.statuses.get(r.status, 0) + 1
                report.with_text += bool(r.lines)
                if r.status != "ok" and len(report.failures) < 1000:
                    report.failures.append({"id": pid, "status": r.status, "reason": r.reason})
            done += len(results)
            if on_progress:
                on_progress(done, len(todo))
            if should_stop is not None and done < len(todo) and should_stop():
                report.interrupted = True
                break
    finally:
        parts.close()  # ends the workers now
    report.seconds = time.perf_counter() - t0
    if report.failures:
        log.warning("OCR failed on %d photos (their CLIP vectors are unaffected): %s", len(report.failures),
                    report.failures[0]["reason"])
    return report
