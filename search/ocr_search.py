"""Searching text inside photos: `text:"invoice 2024"` terms, a hybrid ranking of CLIP and OCR matches, and the
`clipsearch ocr` pass over an existing library (indexer/ingest/ocr.py reads, indexer/storage/ocr_store.py keeps).

Hybrid: a plain query ranks by CLIP score and by OCR match together through reciprocal rank fusion (each list
contributes 1 / (c + rank)): it needs no calibration between cosine similarities and full-text scores, and a photo
whose text matches the query words rises without a photo that only looks right being pushed out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clipsearch.indexer.ingest.ocr import ENGINE, OcrEngine, OcrResult
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.ocr_store import OcrStore

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


def highlight(text: str, query: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the query's words in a photo's text, for the lightbox to highlight."""
    from clipsearch.indexer.storage.ocr_store import words

    wanted = set(words(query))
    return [(m.start(), m.end()) for m in re.finditer(r"\w+", text) if m.group(0).lower() in wanted]


def run_ocr(catalog: Catalog, engine: OcrEngine | None = None, retry_failed: bool = False, chunk: int = 16,
            on_progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Read the text of every indexed photo not read yet (`clipsearch ocr`, and `index --ocr` after its commit);
    returns counts per status. Results are stored a chunk at a time, so an interrupted run keeps its work."""
    store = OcrStore(catalog)
    engine = engine or OcrEngine()
    todo = store.photos_needing(retry_failed)
    counts: dict[str, int] = {}
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        results: dict[int, OcrResult] = {pid: engine.read_file(path) for pid, path in part}
        store.put(results, ENGINE)
        for r in results.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        if on_progress:
            on_progress(start + len(part), len(todo))
    if counts.get("failed") or counts.get("timeout"):
        log.warning("OCR failed on %d photos (their CLIP vectors are unaffected); see the reasons with "
                    "OcrStore.failures()", counts.get("failed", 0) + counts.get("timeout", 0))
    return counts
