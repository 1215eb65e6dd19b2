"""Searching photos by the words of their stored captions: `caption:"red circle"` or `caption:dog`.

A caption query is answered from the catalog's full-text index alone (indexer/storage/caption_store.py): no model
is loaded and no vector is compared. Every word must be in a photo's caption (any order, any captioner that wrote
one for its current content); photos rank by bm25 on SQLite, ts_rank on PostgreSQL. `caption_hits` gives the
(id, score) pairs, `caption_page` the same as a SearchPage (filters, date order and paging as a CLIP search has
them), and `captions_of` the caption the UI shows under a photo.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.storage.caption_store import CaptionStore
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.filters import PhotoFilter, filter_ids

from .results import SearchHit, SearchPage

_CAPTION_TERM = re.compile(r'(?<!\S)caption:(?:"([^"]*)"|(\S+))', re.IGNORECASE)


@dataclass(frozen=True)
class CaptionQuery:
    """A query split into its `caption:` words and the rest."""

    words: str | None  # words every matching caption holds (None: the query has no caption: term)
    rest: str  # what is left ('' when the query was only caption: terms)


def split_caption_query(query: str) -> CaptionQuery:
    """`caption:"red circle" caption:grass` -> CaptionQuery('red circle grass', ''); no term -> words None."""
    found = list(_CAPTION_TERM.finditer(query or ""))
    if not found:
        return CaptionQuery(None, (query or "").strip())
    parts = [m.group(1) if m.group(1) is not None else m.group(2) for m in found]
    rest = " ".join(_CAPTION_TERM.sub(" ", query).split())
    return CaptionQuery(" ".join(p.strip() for p in parts if p.strip()), rest)


def _words(query: str) -> str | None:
    """The caption words of a caption-only query; None for other queries; one-line errors for a bad one."""
    from clipsearch.indexer.storage.fts import words

    q = split_caption_query(query)
    if q.words is None:
        return None
    if q.rest:
        raise UsageError(f"a caption: query matches caption words only; search '{q.rest}' separately (or put it "
                         "inside the caption: quotes)")
    if not words(q.words):
        raise UsageError('caption: needs words, e.g. caption:"red circle"')
    return q.words


def caption_hits(catalog: Catalog, query: str, k: int | None = 20) -> list[tuple[int, float]] | None:
    """(photo id, score) of photos whose caption holds every word of a `caption:` query, best first (k None: all);
    None when `query` has no caption: term, so the caller goes on with its CLIP search."""
    words = _words(query)
    if words is None:
        return None
    return CaptionStore(catalog).search(words, k)


def caption_page(catalog: Catalog, query: str, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
                 space_id: int | None = None, sort: str = "relevance", tags: Any = None) -> SearchPage | None:
    """A `caption:` query as a SearchPage (None for other queries). `filters` need the space (`space_id`) their
    photos must have a vector in; `sort` is "relevance" (the full-text score) or "date"; `tags` (a TagStore) fills
    each hit's tags. A hit's `score` is the full-text score and its `z` 0 (no calibration: every hit holds every
    word of the query); `relevance` stays None, as for image queries."""
    words = _words(query)
    if words is None:
        return None
    if sort not in ("relevance", "date"):
        raise UsageError("sort must be 'relevance' or 'date'")
    allowed = None if filters.is_empty() or space_id is None else set(filter_ids(catalog, space_id, filters).tolist())
    whole = allowed is not None or sort == "date"
    found = CaptionStore(catalog).search(words, None if whole else offset + k + 1)
    if allowed is not None:
        found = [p for p in found if p[0] in allowed]
    rows = catalog.photos_by_id([i for i, _ in found]) if sort == "date" else {}
    if sort == "date":
        found.sort(key=lambda p: (rows[p[0]]["date"] is not None, rows[p[0]]["date"]), reverse=True)
    page = found[offset : offset + k]
    rows = catalog.photos_by_id([i for i, _ in page])
    tag_map = tags.tags_of([i for i, _ in page]) if tags is not None else {}
    hits = [SearchHit(id=i, path=rows[i]["path"], score=s, z=0.0, date=rows[i]["date"], width=rows[i]["width"],
                      height=rows[i]["height"], format=rows[i]["format"], tags=tuple(tag_map.get(i, ())),
                      rank=offset + n + 1)
            for n, (i, s) in enumerate(page) if i in rows]
    return SearchPage(hits, offset, k, len(found) > offset + k)


def captions_of(catalog: Catalog, ids: Iterable[int]) -> dict[int, str]:
    """photo id -> its stored caption for its current content (the newest, when several captioners wrote one);
    photos without one are absent. For the UI's lightbox and result captions."""
    return CaptionStore(catalog).captions_of(ids)
