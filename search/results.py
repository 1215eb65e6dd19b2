"""Typed results: frozen dataclasses, never raw FAISS arrays or its -1 padding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class OcrMatch:
    """How a hit matched through the text recognised in it (search/ocr_search.py): the UI highlights the spans."""

    text: str  # the photo's recognised text, one line per text line
    spans: tuple[tuple[int, int], ...]  # (start, end) character offsets of the matched words in `text`
    score: float  # full-text score of the match (positive, higher is better; comparable within one query)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: {"text", "spans": [[start, end], ...], "score"}."""
        return {"text": self.text, "spans": [list(s) for s in self.spans], "score": round(self.score, 6)}


@dataclass(frozen=True)
class StackInfo:
    """A hit standing for a stack of near-duplicates (search/stacks.py): the members found among the hits."""

    ids: tuple[int, ...]  # every member found in the ranking, in rank order (the shown hit first)
    group_size: int  # members of its duplicate group in the whole library (1: a photo without duplicates)

    @property
    def count(self) -> int:
        """Hits folded into this one (1: nothing folded)."""
        return len(self.ids)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: {"count", "ids", "group_size"}."""
        return {"count": self.count, "ids": list(self.ids), "group_size": self.group_size}


@dataclass(frozen=True)
class SearchHit:
    """One photo in a ranking. `score` is cosine similarity; `z` is how unusual it is for this query; `relevance`
    is the calibrated label (strong / possible / weak, search/relevance.py) for a text query, None for others."""

    id: int
    path: str
    score: float
    z: float  # standard score against the query's similarity to the library (calibrated relevance)
    date: datetime | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    tags: tuple[str, ...] = ()
    relevance: str | None = None  # "strong" | "possible" | "weak" for a text query; None for image queries
    confidence: float | None = None  # P(query | photo) against the query's contrasts, what `relevance` is cut from
    rank: int = 0  # 1-based position in the whole ranking (offset included)
    ocr: OcrMatch | None = None  # found through its recognised text (text: queries, hybrid ranking); else None
    stack: StackInfo | None = None  # stacked results (search --stack): the near-duplicates folded into this hit

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stable keys: id, path, score, z, date, width, height, format, tags, relevance,
        confidence, rank; plus "ocr" for a hit matched through its text and "stack" in stacked results, each only
        when set, so other hits keep their shape)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ocr", "stack")}
        d["date"] = self.date.isoformat() if self.date else None
        d["tags"], d["score"], d["z"] = list(self.tags), round(self.score, 6), round(self.z, 3)
        d["confidence"] = None if self.confidence is None else round(self.confidence, 4)
        if self.ocr is not None:
            d["ocr"] = self.ocr.as_dict()
        if self.stack is not None:
            d["stack"] = self.stack.as_dict()
        return d


@dataclass(frozen=True)
class SearchPage:
    """A page of hits plus what is needed to page on."""

    hits: list[SearchHit]
    offset: int
    limit: int
    has_more: bool
    strong_cutoff: float | None = None  # image queries: the score below which hits were dropped by --strong
    counts: dict[str, int] | None = None  # text queries: photos per relevance label (strong, possible, weak)
    counts_exact: bool = True  # False when the library was too large to label every candidate (counts are minima)
    note: str | None = None  # why the labels are limited (words the model does not know), for the user

    def as_list(self) -> list[dict[str, Any]]:
        """The hits as dicts (what `--json` prints)."""
        return [h.as_dict() for h in self.hits]


@dataclass(frozen=True)
class LabelScore:
    """A label (or caption) and its score: cosine for rankings, probability for classification."""

    label: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"label": self.label, "score": round(float(self.score), 6)}


@dataclass(frozen=True)
class Classification:
    """Zero-shot result for one image: top labels with probabilities; `chosen` passes the mode's rule."""

    source: str
    labels: list[LabelScore]
    chosen: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"source": self.source, "labels": [x.as_dict() for x in self.labels], "chosen": self.chosen}


@dataclass(frozen=True)
class TagPreview:
    """What a tagging run does (or would do, with dry_run): counts per label and example photo paths."""

    label_set: str
    photos_considered: int
    counts: dict[str, int]
    examples: dict[str, list[str]]
    written: int  # tags written (0 for a dry run)
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)
