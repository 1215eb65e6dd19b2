"""Zero-shot classification of images and batch tagging of the library from stored embeddings.

Tagging is one matrix product per chunk of stored vectors against the ensembled label embeddings; no photo is
decoded. A label set is written as a whole (replacing its previous run), so re-running is idempotent and
`remove` undoes it.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import UsageError
from indexer.filters import PhotoFilter, filter_ids

from .results import Classification, LabelScore, TagPreview
from .zeroshot import load_templates, multi_label_probs, parse_labels, single_label_probs, thresholds

if TYPE_CHECKING:
    from .service import ImageRef, SearchService

DEFAULT_SET = "zeroshot"


def _probs(svc: SearchService, vecs: np.ndarray, labels: np.ndarray, multi: bool, tmpl: list[str]) -> np.ndarray:
    scale = float(svc.encoder.logit_scale)
    if multi:
        return multi_label_probs(vecs, labels, svc.neutral_vector(tmpl), scale)
    return single_label_probs(vecs, labels, scale)


def classify(svc: SearchService, images: list[ImageRef], labels: str | list[str], templates: str | None = None,
             multi_label: bool = False, threshold: float | None = None, k: int = 5) -> list[Classification]:
    """Zero-shot classify images (files, bytes or indexed ids): top-k labels with probabilities each."""
    if not images:
        raise UsageError("no images to classify")
    labs = parse_labels(labels)
    names = [lab.name for lab in labs]
    tmpl = load_templates(templates, svc.default_templates())
    lvec = svc.label_vectors(names, tmpl)
    vecs = np.stack([svc.image_vector(ref) for ref in images])
    probs = _probs(svc, vecs, lvec, multi_label, tmpl)
    thr = thresholds(labs, threshold if threshold is not None else (0.5 if multi_label else 0.0))
    out = []
    for ref, p in zip(images, probs, strict=True):
        order = np.argsort(-p)
        top = [LabelScore(names[i], float(p[i])) for i in order[: max(1, k)]]
        if multi_label:
            chosen = [names[i] for i in order if p[i] >= thr[i]]
        else:
            chosen = [names[order[0]]] if p[order[0]] >= thr[order[0]] else []
        source = f"#{ref}" if isinstance(ref, int) else ("<upload>" if isinstance(ref, bytes) else str(ref))
        out.append(Classification(source, top, chosen))
    return out


def tag_library(svc: SearchService, labels: str | list[str], name: str | None = None,
                threshold: float | None = None, multi_label: bool = False, filters: PhotoFilter = PhotoFilter(),
                dry_run: bool = False, templates: str | None = None, examples: int = 3,
                on_progress: Any = None) -> TagPreview:
    """Tag every indexed photo (or the filtered ones) with the labels that pass; preview with dry_run."""
    labs = parse_labels(labels)
    names = [lab.name for lab in labs]
    label_set = (name or DEFAULT_SET).strip()
    if not label_set:
        raise UsageError("the label set name is empty")
    tmpl = load_templates(templates, svc.default_templates())
    space = svc.space()
    lvec = svc.label_vectors(names, tmpl)
    thr = thresholds(labs, threshold if threshold is not None else 0.5)
    allowed = filter_ids(svc.catalog, space.id, filters)
    total = len(allowed) if allowed is not None else svc.catalog.space(space.id).count  # once per run
    rows: list[tuple[int, str, float]] = []
    counts: Counter = Counter()
    first: dict[str, list[int]] = {}
    considered = 0
    for ids, vecs in svc.catalog.iter_vectors(space.id):
        if allowed is not None:
            mask = np.isin(ids, allowed)
            ids, vecs = ids[mask], vecs[mask]
        considered += len(ids)
        if on_progress:
            on_progress(considered, total)
        probs = _probs(svc, vecs, lvec, multi_label, tmpl)
        if multi_label:
            r, c = np.nonzero(probs >= thr[None, :])
        else:
            c = probs.argmax(axis=1)
            r = np.nonzero(probs[np.arange(len(c)), c] >= thr[c])[0]
            c = c[r]
        for pid, li, p in zip(ids[r].tolist(), c.tolist(), probs[r, c].tolist(), strict=True):
            rows.append((pid, names[li], p))
            counts[names[li]] += 1
            if len(first.setdefault(names[li], [])) < examples:
                first[names[li]].append(pid)
    paths = svc.catalog.photos_by_id([p for ids in first.values() for p in ids])
    example_paths = {label: [paths[p]["path"] for p in ids] for label, ids in first.items()}
    written = 0 if dry_run else svc.tags.replace_set(label_set, space.id, iter(rows))
    return TagPreview(label_set, considered, {n: counts.get(n, 0) for n in names}, example_paths, written, dry_run)


def export_tags(svc: SearchService, path: str, label_set: str | None = None) -> int:
    """Write tags to CSV or JSON (by extension); returns the number of rows."""
    rows = svc.tags.rows(label_set)
    if path.lower().endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1, ensure_ascii=False)
    elif path.lower().endswith(".csv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["photo_id", "path", "label_set", "label", "score"])
            for r in rows:
                w.writerow([r.photo_id, r.path, r.label_set, r.label, f"{r.score:.6f}"])
    else:
        raise UsageError("export to a .csv or .json file")
    return len(rows)
