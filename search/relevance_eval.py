"""`clipsearch eval` for the relevance labels: precision and recall of "strong" on queries about what a folder
holds, and the strong hits of queries about things it does not hold.

Queries come from the folder itself, so the same code measures the demo library and any ImageFolder with
captions: for each class C, "a C" and "a photo of a C" (its images are the matches); for each word W written just
before C in a caption, "a W C"; for each phrase P written after "C on" in a caption, "a C on P" (the matches are
the images of class C whose caption has that phrase). Absent queries are a fixed list of 20 things no such folder
shows (or the caller's own list). Every photo of the folder is labelled, as `--strong` would over a library.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .relevance import STRONG, WEAK, Relevance

ABSENT_QUERIES = (
    "xkq zvbt", "qwrtp lmnb", "zzzz zzzz", "a giraffe", "a cathedral at night", "a harbour at night",
    "a red sports car", "a brown dog", "a dolphin", "a blue truck", "a bowl of soup", "a wedding cake",
    "a snowy mountain", "a city skyline at dusk", "a person riding a bicycle", "a pink flamingo",
    "a laptop on a desk", "a green apple", "fireworks over a river", "a yellow taxi",
)


@dataclass(frozen=True)
class RelevanceQuery:
    """A query, its kind (for the per-kind figures) and the indices of the images that match it."""

    text: str
    kind: str
    matches: frozenset[int]


def present_queries(classes: dict[str, list[Path]], captions: dict[Path, list[str]],
                    index: dict[Path, int]) -> list[RelevanceQuery]:
    """Queries naming a class of the folder, alone and with the words its captions put around it."""
    out: list[RelevanceQuery] = []
    for name, paths in classes.items():
        members = [index[p] for p in paths]
        out.append(RelevanceQuery(f"a {name}", "a C", frozenset(members)))
        out.append(RelevanceQuery(f"a photo of a {name}", "a photo of a C", frozenset(members)))
        before: dict[str, set[int]] = {}
        after: dict[str, set[int]] = {}
        for p in paths:
            for cap in captions.get(p, []):
                for m in re.finditer(rf"(\w+) {re.escape(name)}\b", cap.lower()):
                    before.setdefault(m.group(1), set()).add(index[p])
                for m in re.finditer(rf"\b{re.escape(name)} on (.+?)[.,]?$", cap.lower()):
                    after.setdefault(m.group(1).strip(), set()).add(index[p])
        out += [RelevanceQuery(f"a {w} {name}", "a W C", frozenset(s)) for w, s in sorted(before.items())
                if w not in ("a", "an", "the")]
        out += [RelevanceQuery(f"a {name} on {w}", "a C on P", frozenset(s)) for w, s in sorted(after.items())]
    return out


def _precision_recall(rows: list[tuple[set[int], frozenset[int]]]) -> dict[str, float]:
    tp = sum(len(s & m) for s, m in rows)
    fp = sum(len(s - m) for s, m in rows)
    fn = sum(len(m - s) for s, m in rows)
    return {"precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn), "strong": tp + fp,
            "matches": tp + fn, "queries": len(rows)}


def relevance_report(relevance: Relevance, encode_texts: Callable[[list[str]], np.ndarray], images: np.ndarray,
                     queries: list[RelevanceQuery], absent: tuple[str, ...] = ABSENT_QUERIES) -> dict[str, Any]:
    """Strong-hit precision and recall over present queries (pooled, and per kind), strong hits of absent ones."""
    def strong_set(text: str, qvec: np.ndarray) -> tuple[set[int], list[str]]:
        order = np.argsort(-(images @ qvec), kind="stable")
        _, _, labels = relevance.label_photos(text, qvec, images[order])
        return {int(order[i]) for i, lab in enumerate(labels) if lab == STRONG}, labels

    qvecs = encode_texts([q.text for q in queries]) if queries else np.zeros((0, images.shape[1]), np.float32)
    rows, kinds = [], {}
    for q, v in zip(queries, qvecs, strict=True):
        rows.append((strong_set(q.text, v)[0], q.matches))
        kinds.setdefault(q.kind, []).append(rows[-1])
    absent_hits, not_weak = {}, 0
    for text, v in zip(absent, encode_texts(list(absent)), strict=True):
        found, labels = strong_set(text, v)
        absent_hits[text] = len(found)
        not_weak += sum(lab != WEAK for lab in labels)
    return {"present": _precision_recall(rows), "by_kind": {k: _precision_recall(r) for k, r in kinds.items()},
            "absent": {"queries": len(absent), "strong": sum(absent_hits.values()), "possible": not_weak
                       - sum(absent_hits.values()), "per_query": {k: v for k, v in absent_hits.items() if v}},
            "vocabulary": relevance.vocab.source, "images": len(images)}
