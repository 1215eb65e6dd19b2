"""Zero-shot classification of images and batch tagging of the library from stored embeddings.

Tagging is one matrix product per chunk of stored vectors against the ensembled label embeddings; no photo is
decoded. A label set is written as a whole (replacing its previous run), so re-running is idempotent and
`remove` undoes it.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.storage.filters import PhotoFilter, filter_ids

from .results import Classification, LabelScore, TagPreview
from .zeroshot import load_templates, multi_label_probs, parse_labels, single_label_probs, thresholds

if TYPE_CHECKING:
    from .service import ImageRef, SearchService

DEFAULT_SET = "zeroshot"
_BLOCK = 4096  # image rows per scoring block: 4096 x 1,000 labels of float32 is 16 MB


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
    """Tag every indexed photo (or the filtered ones) with the labels that pass; preview with dry_run.

    Vectors come from the space's memory-mapped index (validated against the catalog), are scored against the label
    embeddings in chunks, and only the passing (photo, label, score) triples are kept, as arrays, and streamed to
    the catalog while the next chunk is scored; examples are each label's strongest matches.
    """
    labs = parse_labels(labels)
    names = [lab.name for lab in labs]
    label_set = (name or DEFAULT_SET).strip()
    if not label_set:
        raise UsageError("the label set name is empty")
    tmpl = load_templates(templates, svc.default_templates())
    space = svc.space()
    svc.store.prefetch(space)  # the index comes off the disk while the labels encode
    lvec = svc.label_vectors(names, tmpl)
    thr = thresholds(labs, threshold if threshold is not None else 0.5)
    neutral = svc.neutral_vector(tmpl) if multi_label else None
    allowed = filter_ids(svc.catalog, space.id, filters)
    total = len(allowed) if allowed is not None else int(svc.store.index_for(space).ntotal)
    scale = float(svc.encoder.logit_scale)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    considered = 0
    # The catalog write streams beside the matrix products (a background writer, one transaction) rather than
    # after them; a dry run only previews.
    with (contextlib.nullcontext() if dry_run else svc.tags.writer(label_set, space.id, names) as writer,
          threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(usable_cores(), thread_name_prefix="tag") as pool):
        for ids, vecs in svc.store.iter_vectors(space, reuse=True):  # consumed before the next chunk
            if allowed is not None:
                mask = np.isin(ids, allowed)
                ids, vecs = ids[mask], vecs[mask]
            if len(ids):
                rows, cols, probs = _score_blocks(pool.map, vecs, lvec, thr, scale, neutral)
                parts.append((ids[rows], cols, probs))
                if writer is not None:
                    writer.add(*parts[-1])
            considered += len(ids)
            if on_progress:
                on_progress(considered, total)
    pids, cols, probs = _concat(parts)
    counts = np.bincount(cols, minlength=len(names))
    example_ids = _strongest(pids, cols, probs, len(names), examples)
    paths = svc.catalog.photos_by_id([p for ids in example_ids.values() for p in ids])
    example_paths = {names[c]: [paths[p]["path"] for p in ids] for c, ids in example_ids.items()}
    written = 0 if writer is None else writer.written
    return TagPreview(label_set, considered, {n: int(counts[i]) for i, n in enumerate(names)}, example_paths,
                      written, dry_run)


def _score_blocks(map_fn: Callable[..., Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]], vecs: np.ndarray,
                  labels: np.ndarray, thr: np.ndarray, scale: float,
                  neutral: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_passing_block over a chunk's blocks through `map_fn` (builtin map, or a thread pool's map), rows offset.

    Tagging passes a pool with a thread per core, BLAS single-threaded meanwhile. Why not one multi-threaded matrix
    product: BLAS splits it evenly across the cores, so while the tag writer holds one core, every product waits
    for its slower half (measured: 12 -> 21 s per million rows on 2 cores); blocks taken from a queue keep every
    core busy, and the softmax passes run in parallel too.
    """
    starts = range(0, len(vecs), _BLOCK)
    parts = map_fn(lambda s: _passing_block(vecs[s : s + _BLOCK], labels, thr, scale, neutral), starts)
    return _concat([(rows + s, cols, prob) for s, (rows, cols, prob) in zip(starts, parts, strict=True)])


def passing_labels(vecs: np.ndarray, labels: np.ndarray, thr: np.ndarray, scale: float,
                   neutral: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, label, probability) of every label that passes its threshold, for a chunk of image vectors.

    Single-label (neutral None): the best label per image with its softmax probability, computed without
    materialising the probability matrix. Multi-label: the threshold on sigmoid(scale * (s - s_neutral)) becomes a
    cut on the cosine gap, so only passing entries get a probability. Serial; tagging runs the same blocks on a
    thread pool.
    """
    return _score_blocks(map, vecs, labels, thr, scale, neutral)


def _passing_block(vecs: np.ndarray, labels: np.ndarray, thr: np.ndarray, scale: float,
                   neutral: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """passing_labels for one block: its (rows x labels) logits stay in the CPU cache through the passes below."""
    logits = vecs @ (labels * np.float32(scale)).T  # (n, L): scaled cosines, scale folded into the small side
    if neutral is None:
        best = logits.argmax(axis=1)
        top = logits[np.arange(len(best)), best]
        logits -= top[:, None]
        np.exp(logits, out=logits)
        prob = (1.0 / logits.sum(axis=1)).astype(np.float32)
        rows = np.nonzero(prob >= thr[best])[0]
        return rows, best[rows].astype(np.int64), prob[rows]
    logits -= (vecs @ neutral.reshape(-1) * np.float32(scale))[:, None]
    with np.errstate(divide="ignore"):
        cut = np.log(thr) - np.log1p(-thr)  # logit(thr): -inf for 0, +inf for 1
    rows, cols = np.nonzero(logits >= cut[None, :])
    prob = (1.0 / (1.0 + np.exp(-logits[rows, cols]))).astype(np.float32)
    return rows, cols.astype(np.int64), prob


def _concat(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _strongest(pids: np.ndarray, cols: np.ndarray, probs: np.ndarray, n_labels: int, k: int) -> dict[int, list[int]]:
    """label index → up to k photo ids with the highest probability for it (ties: lower id first)."""
    if k <= 0 or len(pids) == 0:
        return {}
    order = np.lexsort((pids, -probs, cols))
    starts = np.searchsorted(cols[order], np.arange(n_labels))
    ends = np.searchsorted(cols[order], np.arange(n_labels), side="right")
    spans = zip(starts.tolist(), ends.tolist(), strict=True)
    return {c: pids[order[s:min(e, s + k)]].tolist() for c, (s, e) in enumerate(spans) if e > s}


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
