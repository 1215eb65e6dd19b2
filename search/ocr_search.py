"""Searching text inside photos: `text:"invoice 2024"` terms, a hybrid ranking of CLIP and OCR matches, and the
`clipsearch ocr` pass over an existing library (indexer/ingest/ocr.py reads, indexer/storage/ocr_store.py keeps).

Hybrid: a plain query ranks by CLIP score and by OCR match together through reciprocal rank fusion (each list
contributes 1 / (c + rank)): it needs no calibration between cosine similarities and full-text scores, and a photo
whose text matches the query words rises without a photo that only looks right being pushed out.

In SearchService.search (so the API, the CLI and the server behave alike):

* `text:"invoice 2024"` alone: photos whose text holds the phrase, ranked by the full-text score (no model query);
* `text:"invoice" receipt`: only photos whose text matches, ranked by fusing CLIP("receipt") with the OCR match;
* a plain query on a library where OCR has run: the CLIP ranking fused with photos whose text holds all its words
  (exact words, any order). Without OCR text, or without a match, the ranking is the CLIP one, unchanged.

Hits found through their text carry an `OcrMatch` (the photo's text and the spans of the matched words).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.ocr import OcrEngine
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.ocr_store import FUZZY_MIN_LEN, OcrReport, OcrStore, has_texts, one_edit, words
from clipsearch.indexer.storage.ocr_store import read_and_store as _read_and_store

from .results import OcrMatch, SearchHit

log = logging.getLogger(__name__)

_TEXT_TERM = re.compile(r'\btext:(?:"([^"]*)"|(\S+))', re.IGNORECASE)
RRF_C = 60  # the usual reciprocal-rank-fusion constant: ranks beyond a few dozen count for little


@dataclass(frozen=True)
class TextQuery:
    """A query split into its `text:` part (matched against OCR text) and the rest (for CLIP)."""

    text: str | None  # words that must appear, in order, in the photo's text (None: no text: term)
    rest: str  # what is left for the CLIP query ('' when the query was only a text: term)


def split_text_query(query: str) -> TextQuery:
    """`text:"invoice 2024" receipt` -> TextQuery('invoice 2024', 'receipt'); several text: terms are joined."""
    parts = [m.group(1) if m.group(1) is not None else m.group(2) for m in _TEXT_TERM.finditer(query)]
    rest = " ".join(_TEXT_TERM.sub(" ", query).split())
    return TextQuery(" ".join(p.strip() for p in parts if p.strip()) or None, rest)


def fuse(clip: Sequence[tuple[int, float]], ocr: Sequence[tuple[int, float]], ocr_weight: float = 1.0,
         k: int = 20) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of a CLIP ranking and an OCR ranking (each best first): (photo id, fused score)."""
    fused: dict[int, float] = {}
    for rank, (pid, _) in enumerate(clip):
        fused[pid] = fused.get(pid, 0.0) + 1.0 / (RRF_C + rank + 1)
    for rank, (pid, _) in enumerate(ocr):
        fused[pid] = fused.get(pid, 0.0) + ocr_weight / (RRF_C + rank + 1)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def highlight(text: str, query: str, fuzzy: bool = False) -> list[tuple[int, int]]:
    """(start, end) character spans of the query's words in a photo's text, for the lightbox to highlight; with
    `fuzzy`, also words one misread character away from a query word of FUZZY_MIN_LEN or more letters (what the
    full-text fallback matched)."""
    terms = words(query)
    wanted = set(terms) | ({"".join(terms)} if len(terms) > 1 else set())  # words OCR read without the space
    near = {v for w in wanted if len(w) >= FUZZY_MIN_LEN for v in one_edit(w)} if fuzzy else set()
    return [(m.start(), m.end()) for m in re.finditer(r"\w+", text) if m.group(0).lower() in wanted | near]


def ocr_library(catalog: Catalog, retry_failed: bool = False, workers: int = 1, engine: OcrEngine | None = None,
                on_progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> OcrReport:
    """`clipsearch ocr`: read the text of every indexed photo not read yet for its current content (and the failed
    ones, with retry_failed), in `workers` processes; results are stored a part at a time, so an interrupted run
    keeps its work. A failure is a stored status with its reason; the photo's CLIP vector is never touched."""
    todo = OcrStore(catalog).photos_needing(retry_failed)
    return _read_and_store(catalog, todo, workers, engine, on_progress, should_stop)


def run_ocr(catalog: Catalog, engine: OcrEngine | None = None, retry_failed: bool = False, chunk: int = 16,
            on_progress: Callable[[int, int], None] | None = None, workers: int = 1) -> dict[str, int]:
    """`ocr_library` in this process (or `workers` processes) returning only the counts per status (ok, failed,
    timeout); kept for scripts and the benchmark. `chunk` is no longer used: parts are sized by read_many."""
    del chunk
    return ocr_library(catalog, retry_failed, workers, engine, on_progress).statuses


# --- the OCR side of a search ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OcrQuery:
    """What a search asks of the recognised text."""

    text: str  # the words matched against the photos' text
    required: bool  # a text: term: only photos whose text matches; a plain query: the match only lifts (fusion)
    phrase: bool  # the words in order, next to each other (text: terms); else all of them anywhere
    fuzzy: bool  # allow one misread character in words of FUZZY_MIN_LEN or more letters (text: terms)


def plan_query(query: str) -> tuple[str, OcrQuery | None]:
    """Split a search into what CLIP reads ('' when nothing) and its text: part (None without one). A `+` left
    dangling by taking a text: term out is dropped; a text: term without words is a one-line UsageError."""
    tq = split_text_query(query)
    if tq.text is None:
        if tq.rest != " ".join(query.split()):
            raise UsageError('text: needs the words to find in photos, e.g. text:"invoice 2024"')
        return query, None
    return tq.rest.strip(" +"), OcrQuery(tq.text, True, True, True)


def hybrid_query(text: str) -> OcrQuery:
    """The OCR side of a plain query: all its words anywhere in a photo's text, exactly (no fuzzy fallback, so a
    look-alike word never lifts a photo above what CLIP ranks)."""
    return OcrQuery(text, False, False, False)


class OcrSearch:
    """Matches, fusion and hit annotation over one catalog's OCR text (SearchService.search calls these)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._store: OcrStore | None = None

    def store(self) -> OcrStore | None:
        """The store once OCR has run on this catalog (asked again on every query until then); None before."""
        if self._store is None and has_texts(self.catalog):
            self._store = OcrStore(self.catalog)
        return self._store

    def matches(self, q: OcrQuery, n: int, allowed: np.ndarray | None = None,
                exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """(photo id, full-text score) of up to n matching photos, best first, within the filter's ids."""
        store = self.store()
        if store is None:
            return []
        found = store.search(q.text, n, q.phrase, q.fuzzy, None if allowed is None else allowed.tolist())
        return [(p, s) for p, s in found if not exclude or p not in exclude]

    def note(self) -> str | None:
        """What a text: query's page says when OCR never ran on this library (else None)."""
        return None if self.store() else "no text has been read from these photos yet: run clipsearch ocr"

    def fuse_into(self, q: OcrQuery, keep: list[tuple[int, float]], n: int, allowed: np.ndarray | None,
                  exclude: set[int] | None, clip_scores: Callable[[list[int]], dict[int, float]]
                  ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """`merge` with up to n matches found here: (candidates in fused order, the matches and their scores)."""
        found = self.matches(q, n, allowed, exclude)
        return self.merge(q, keep, found, clip_scores), found

    def merge(self, q: OcrQuery, keep: list[tuple[int, float]], found: list[tuple[int, float]],
              clip_scores: Callable[[list[int]], dict[int, float]]) -> list[tuple[int, float]]:
        """The candidates (id, CLIP score) in fused order: for a required text term only the matches, else the
        CLIP candidates and the matches together. `clip_scores` gives the cosine of photos CLIP did not rank;
        a match without a vector in this space is left out."""
        if not found:
            return [] if q.required else keep
        if q.required:
            clip = clip_scores([p for p, _ in found])
            ranked = sorted(clip.items(), key=lambda kv: (-round(kv[1], 6), kv[0]))
        else:
            clip = dict(keep)
            clip.update(clip_scores([p for p, _ in found if p not in clip]))
            ranked = keep
        fused = fuse(ranked, [(p, s) for p, s in found if p in clip], k=len(clip))
        return [(p, clip[p]) for p, _ in fused]

    def annotate(self, hits: list[SearchHit], q: OcrQuery, scores: dict[int, float]) -> list[SearchHit]:
        """Hits found through their text get an OcrMatch (text, spans of the matched words, full-text score)."""
        store = self.store()
        ids = [h.id for h in hits if h.id in scores]
        if store is None or not ids:
            return hits
        texts = store.texts_of(ids)
        out = []
        for h in hits:
            row = texts.get(h.id) if h.id in scores else None
            if row is not None:
                spans = tuple(highlight(row["text"], q.text, q.fuzzy))
                h = dataclasses.replace(h, ocr=OcrMatch(row["text"], spans, scores[h.id]))
            out.append(h)
        return out
