"""Zero-shot classification of image vectors and batch tagging of the library from stored embeddings.

Tagging is one matrix product per chunk of stored vectors against the ensembled label embeddings; no photo is
decoded. A label set is written as a whole (replacing its previous run), so re-running is idempotent and
`remove_tags` undoes it. `Tagger` receives the parts it uses; export and removal are plain functions over the
catalog, so `clipsearch tag --export/--remove` runs without loading a model (nothing here imports torch).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.storage.annotations import TagStore
from clipsearch.indexer.storage.filters import PhotoFilter, filter_ids

from .results import Classification, LabelScore, TagPreview
from .zeroshot import (
    Label,
    LabelVectors,
    check_probability,
    multi_label_probs,
    parse_labels,
    parse_templates,
    single_label_probs,
    thresholds,
)

if TYPE_CHECKING:
    from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo
    from clipsearch.indexer.storage.store import VectorStore

    from .relevance import Relevance

DEFAULT_SET = "zeroshot"
EXPORT_FORMATS = ("csv", "json")
_BLOCK = 4096  # image rows per scoring block: 4096 x 1,000 labels of float32 is 16 MB


def label_set_name(name: str | None) -> str:
    """The label set a run writes to (default 'zeroshot'); a blank name is refused rather than guessed."""
    label_set = DEFAULT_SET if name is None else name.strip()
    if not label_set:
        raise UsageError("the label set name is empty")
    if len(label_set) > 200:
        raise UsageError("the label set name is longer than 200 characters")
    return label_set


class Tagger:
    """Zero-shot classification and batch tagging. It receives what it uses: the encoder (for its logit scale),
    the catalog, the vector store, the tag store, the label embeddings and a function giving the embedding space
    (the service's, so that an empty library gets the service's one message)."""

    def __init__(self, encoder: Any, catalog: Catalog, store: VectorStore, tags: TagStore, labels: LabelVectors,
                 space: Callable[[], SpaceInfo], relevance: Relevance | None = None) -> None:
        self.encoder, self.catalog, self.store, self.tags = encoder, catalog, store, tags
        self.label_vectors, self.space, self.relevance = labels, space, relevance

    def _labels(self, labels: str | list[str], templates: str | list[str] | None) -> tuple[list[Label], list[str]]:
        labs = parse_labels(labels)
        return labs, parse_templates(templates) or self.label_vectors.default_templates()

    def _probs(self, vecs: np.ndarray, lvec: np.ndarray, multi: bool, tmpl: list[str]) -> np.ndarray:
        scale = float(self.encoder.logit_scale)
        if multi:
            return multi_label_probs(vecs, lvec, self.label_vectors.neutral(tmpl), scale)
        return single_label_probs(vecs, lvec, scale)

    def classify(self, vecs: np.ndarray, sources: list[str], labels: str | list[str],
                 templates: str | list[str] | None = None, multi_label: bool = False, threshold: float | None = None,
                 k: int = 5) -> list[Classification]:
        """Top-k labels with probabilities for each image vector (row of `vecs`, named by `sources`)."""
        threshold = check_probability(threshold)
        if len(vecs) == 0:
            raise UsageError("no images to classify")
        labs, tmpl = self._labels(labels, templates)
        names = [lab.name for lab in labs]
        probs = self._probs(vecs, self.label_vectors(names, tmpl), multi_label, tmpl)
        thr = thresholds(labs, threshold if threshold is not None else (0.5 if multi_label else 0.0))
        out = []
        for source, p in zip(sources, probs, strict=True):
            order = np.argsort(-p)
            top = [LabelScore(names[i], float(p[i])) for i in order[: max(1, k)]]
            if multi_label:
                chosen = [names[i] for i in order if p[i] >= thr[i]]
            else:
                chosen = [names[order[0]]] if p[order[0]] >= thr[order[0]] else []
            out.append(Classification(source, top, chosen))
        return out

    def tag(self, labels: str | list[str], name: str | None = None, threshold: float | None = None,
            multi_label: bool = False, filters: PhotoFilter = PhotoFilter(), dry_run: bool = False,
            templates: str | list[str] | None = None, examples: int = 3, on_progress: Any = None,
            strong_only: bool = False) -> TagPreview:
        """Tag every indexed photo (or the filtered ones) with the labels that pass; preview with dry_run. With
        `strong_only` a photo also has to be a strong match for the label as a search query would find it (the
        calibrated cutoff of search/relevance.py): "tag only confident photos".

        Every argument is checked before anything is read or written (an out-of-range threshold must not replace
        a label set with nothing). Vectors come from the space's memory-mapped index, are scored against the label
        embeddings in chunks, and only the passing (photo, label, score) triples are kept, as arrays, and streamed
        to the catalog while the next chunk is scored; examples are each label's strongest matches.
        """
        threshold = check_probability(threshold)
        label_set = label_set_name(name)
        if examples < 0:
            raise UsageError(f"examples must be 0 or more, got {examples}")
        labs, tmpl = self._labels(labels, templates)
        names = [lab.name for lab in labs]
        space = self.space()
        self.store.prefetch(space)  # the index comes off the disk while the labels encode
        lvec = self.label_vectors(names, tmpl)
        thr = thresholds(labs, threshold if threshold is not None else 0.5)
        neutral = self.label_vectors.neutral(tmpl) if multi_label else None
        allowed = filter_ids(self.catalog, space.id, filters)
        total = len(allowed) if allowed is not None else int(self.store.index_for(space).ntotal)
        scale = float(self.encoder.logit_scale)
        confident = _Confident(self.relevance, names) if strong_only else None
        if confident is not None and self.relevance is None:
            raise UsageError("tagging only strong matches needs the relevance calibration (a SearchService)")
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        considered = 0
        # The catalog write streams beside the matrix products (a background writer, one transaction) rather than
        # after them; a dry run only previews.
        with (contextlib.nullcontext() if dry_run else self.tags.writer(label_set, space.id, names) as writer,
              threadpool_limits(1, user_api="blas"),
              ThreadPoolExecutor(usable_cores(), thread_name_prefix="tag") as pool):
            for ids, vecs in self.store.iter_vectors(space, reuse=True):  # consumed before the next chunk
                if allowed is not None:
                    mask = np.isin(ids, allowed)
                    ids, vecs = ids[mask], vecs[mask]
                if len(ids):
                    rows, cols, probs = _score_blocks(pool.map, vecs, lvec, thr, scale, neutral)
                    if confident is not None:
                        rows, cols, probs = confident.keep(vecs, rows, cols, probs)
                    parts.append((ids[rows], cols, probs))
                    if writer is not None:
                        writer.add(*parts[-1])
                considered += len(ids)
                if on_progress:
                    on_progress(considered, total)
        written = 0 if writer is None else writer.written
        return self._preview(label_set, names, parts, considered, examples, written, dry_run)

    def _preview(self, label_set: str, names: list[str], parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 considered: int, examples: int, written: int, dry_run: bool) -> TagPreview:
        pids, cols, probs = _concat(parts)
        counts = np.bincount(cols, minlength=len(names))
        example_ids = _strongest(pids, cols, probs, len(names), examples)
        paths = self.catalog.photos_by_id([p for ids in example_ids.values() for p in ids])
        example_paths = {names[c]: [paths[p]["path"] for p in ids] for c, ids in example_ids.items()}
        return TagPreview(label_set, considered, {n: int(counts[i]) for i, n in enumerate(names)}, example_paths,
                          written, dry_run)


class _Confident:
    """The strong-match filter of a tagging run: each label is checked as a text query (its plan built once, on
    the first photos that pass it), and a (photo, label) pair is kept only when the photo is a strong match."""

    def __init__(self, relevance: Relevance | None, names: list[str]) -> None:
        self.relevance, self.names = relevance, names
        self.plans: dict[int, tuple[Any, np.ndarray]] = {}

    def keep(self, vecs: np.ndarray, rows: np.ndarray, cols: np.ndarray,
             probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The passing triples of a chunk that are strong matches of their label."""
        from .relevance import STRONG

        assert self.relevance is not None
        mask = np.zeros(len(rows), bool)
        for c in np.unique(cols).tolist():
            sel = np.nonzero(cols == c)[0]
            sub = vecs[rows[sel]]
            if c not in self.plans:
                qvec = self.relevance.encoder.encode_texts([self.names[c]])[0]
                self.plans[c] = (self.relevance.plan(self.names[c], sub[:64]), qvec)
            plan, qvec = self.plans[c]
            labels = self.relevance.labels(plan, self.relevance.probabilities(plan, qvec, sub))
            mask[sel] = [lab == STRONG for lab in labels]
        return rows[mask], cols[mask], probs[mask]


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


def _export_format(fmt_or_path: str) -> str:
    fmt = fmt_or_path.lower().rpartition(".")[2]
    if fmt not in EXPORT_FORMATS:
        raise UsageError("export to a .csv or .json file")
    return fmt


def tags_document(catalog: Catalog, fmt: str, label_set: str | None = None) -> tuple[str, int]:
    """Tags (all, or of one label set) as CSV or JSON text, and how many rows it holds: what export writes and
    what the UI offers for download, built in memory (no temporary file)."""
    fmt = _export_format(fmt)
    rows = TagStore(catalog).rows(label_set)
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=1, ensure_ascii=False), len(rows)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["photo_id", "path", "label_set", "label", "score"])
    for r in rows:
        w.writerow([r.photo_id, r.path, r.label_set, r.label, f"{r.score:.6f}"])
    return buf.getvalue(), len(rows)


def export_tags(catalog: Catalog, path: str, label_set: str | None = None) -> int:
    """Write tags to a .csv or .json file (format by extension); returns the number of rows. Needs no encoder.
    The file appears whole or not at all (written beside it, then renamed)."""
    text, n = tags_document(catalog, path, label_set)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    return n


def remove_tags(catalog: Catalog, label_set: str) -> int:
    """Undo a tagging run: delete every tag of the label set; returns how many went. Needs no encoder."""
    return TagStore(catalog).remove_set(label_set_name(label_set))
