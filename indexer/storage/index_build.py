"""Writing a space's main (base) index files: a full build from the catalog, or a merge of the delta into the base.

A base is three kinds of files, each written once under a fresh name: the FAISS index, its ids (ascending int64),
and for IVF-PQ the float16 re-rank segments. A merge copies the base index into memory, removes the hidden ids,
adds the delta's vectors and writes a new file; it keeps the trained quantizer, so its cost is one read and one
write of the file, not a training. IVF-PQ merges add one re-rank segment; past ``max_segments`` they are compacted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipsearch.indexer.storage.index_files import (
    RowFile,
    StreamFile,
    fingerprint,
    fingerprint_problem,
    fresh_name,
    map_array,
    size_problem,
    write_array,
    write_atomic,
)
from clipsearch.indexer.storage.index_kinds import Kind, Segment, empty_index, gather, load_index, member
from clipsearch.indexer.storage.index_state import Base, Delta


@dataclass(frozen=True)
class StoreOptions:
    """Index-type policy, search settings and how changes are held (bench/RESULTS.md has the measurements)."""

    exact_max: int = 50_000  # up to this many: exact search (~0.19 us/vector at 512-d on 2 cores: ~10 ms at 50k)
    pq_min: int = 2_000_000  # from this many: IVF-PQ + float16 re-rank (IVF-Flat would need 4 GB+ of vectors)
    pq_nlist_max: int = 4096  # IVF-PQ lists at most (training and adding cost grow with it: ~4 min to add 10M)
    nprobe: int = 48  # IVF-Flat lists visited per query (recall@10 >= 0.95 at 1M)
    pq_nprobe: int = 32  # IVF-PQ lists visited per query (candidates are ranked by code, then re-ranked)
    rerank: int = 200  # IVF-PQ candidates re-scored exactly from float16 vectors per query (at least k)
    train_per_list: int = 39  # training sample per IVF list (FAISS' minimum; 64 doubled the 1M build for no recall)
    retrain_growth: float = 4.0  # retrain an IVF once the space has grown this many times its training count
    delta_max: int = 10_000  # changes kept beside the base (searched exactly) before they are merged into it
    overlay_max: int = 100_000  # changes a query answers from memory when the files lag the catalog
    catchup_max: int = 500_000  # changes a catch-up holds in memory; past it the index is rebuilt (streamed)
    max_segments: int = 8  # IVF-PQ re-rank segments before they are compacted into one
    auto_rebuild: bool = True  # rebuild a damaged or missing index from the catalog; False raises IndexUnavailable


class _SegmentWriter:
    """Streams (ids, vectors) into a new re-rank segment: ids as int64, vectors as float16."""

    def __init__(self, index_dir: Path, key: str, generation: int) -> None:
        self.names = fresh_name(key, "rerank", generation, "ids"), fresh_name(key, "rerank", generation, "f16")
        self.files = StreamFile(index_dir / self.names[0]), StreamFile(index_dir / self.names[1])
        self.count, self.last = 0, -1

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids):
            if ids[0] <= self.last or np.any(np.diff(ids) <= 0):
                raise ValueError("re-rank segment ids must ascend")
            self.last = int(ids[-1])
        self.files[0].write(np.asarray(ids, "<i8"))
        self.files[1].write(np.asarray(vecs, "<f2"))
        self.count += len(ids)

    def commit(self) -> dict[str, Any]:
        for f in self.files:
            f.commit()
        return {"ids": self.names[0], "vecs": self.names[1], "count": self.count}

    def abort(self) -> None:
        for f in self.files:
            f.abort()


def open_segment(index_dir: Path, entry: dict[str, Any], dim: int) -> Segment:
    """Map a re-rank segment named in the manifest; ValueError when a file is missing or of the wrong size."""
    n = int(entry["count"])
    for name, size in ((entry["ids"], 8 * n), (entry["vecs"], 2 * n * dim)):
        problem = size_problem(index_dir / name, size)
        if problem:
            raise ValueError(problem)
    return Segment(map_array(index_dir / entry["ids"], "<i8", (n,)),
                   RowFile(index_dir / entry["vecs"], "<f2", (n, dim)), (entry["ids"], entry["vecs"]))


def segment_entry(seg: Segment) -> dict[str, Any]:
    """The manifest entry of an open segment."""
    return {"ids": seg.files[0], "vecs": seg.files[1], "count": len(seg.ids)}


def open_base(index_dir: Path, entry: dict[str, Any], dim: int) -> Base:
    """Open (memory-map) the base the manifest names; ValueError saying what is wrong with it (a file may also
    vanish while it is opened: a writer replaced the set, and the caller reads the new manifest)."""
    try:
        return _open_base(index_dir, entry, dim)
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f"cannot open the index files: {e}") from e


def _open_base(index_dir: Path, entry: dict[str, Any], dim: int) -> Base:
    path = index_dir / str(entry.get("file"))
    problem = fingerprint_problem(path, entry.get("fingerprint"))
    if problem:
        raise ValueError(problem)
    try:
        index = load_index(path, mmap=True)
    except RuntimeError as e:
        raise ValueError(f"unreadable index file ({str(e).splitlines()[0][:120]})") from e
    count = int(entry["count"])
    if index.d != dim or index.ntotal != count:
        raise ValueError(f"index file holds {index.ntotal}x{index.d}, the manifest says {count}x{dim}")
    problem = size_problem(index_dir / entry["ids_file"], 8 * count)
    if problem:
        raise ValueError(problem)
    ids = map_array(index_dir / entry["ids_file"], "<i8", (count,))
    segments = [open_segment(index_dir, s, dim) for s in entry.get("rerank", [])]
    return Base(index, Kind.parse(entry["index_type"]), ids, segments, int(entry["generation"]),
                int(entry.get("trained_count", count)), entry)


def _write_base(index_dir: Path, key: str, index: faiss.Index, kind: Kind, ids: np.ndarray,
                segments: list[dict[str, Any]], generation: int, trained_count: int) -> dict[str, Any]:
    """Write the index and ids files of a base; returns its manifest entry (the manifest is written by the caller)."""
    name, ids_name = fresh_name(key, "base", generation, "faiss"), fresh_name(key, "ids", generation, "ids")
    write_atomic(index_dir / name, lambda tmp: faiss.write_index(index, tmp))
    write_array(index_dir / ids_name, np.asarray(ids, "<i8"))
    return {"file": name, "fingerprint": fingerprint(index_dir / name), "ids_file": ids_name,
            "index_type": kind.label, "count": int(index.ntotal), "generation": generation,
            "trained_count": trained_count, "rerank": segments}


def build_base(index_dir: Path, key: str, dim: int, kind: Kind, sample: np.ndarray | None,
               chunks: Iterable[tuple[np.ndarray, np.ndarray]], generation: int,
               timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Train (IVF kinds) and fill a new base from (ids, vectors) chunks in ascending id order; write its files.
    `timings` receives seconds per phase (train, read, add, write) for the build log line."""
    spent = timings if timings is not None else {}
    t0 = time.perf_counter()
    index = empty_index(kind, dim, sample)
    spent["train"] = time.perf_counter() - t0
    seg = _SegmentWriter(index_dir, key, generation) if kind.family == "ivf-pq" else None
    parts: list[np.ndarray] = []
    spent["add"], t0 = 0.0, time.perf_counter()
    try:
        for ids, vecs in chunks:
            t1 = time.perf_counter()
            if len(ids):
                index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.ascontiguousarray(ids, np.int64))
            parts.append(np.array(ids, np.int64))
            if seg is not None:
                seg.add(ids, vecs)
            spent["add"] += time.perf_counter() - t1
        segments = [seg.commit()] if seg is not None else []
    except BaseException:
        if seg is not None:
            seg.abort()
        raise
    spent["read"], t0 = time.perf_counter() - t0 - spent["add"], time.perf_counter()
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if np.any(np.diff(ids) <= 0):
        ids = np.unique(ids)
    entry = _write_base(index_dir, key, index, kind, ids, segments, generation, int(index.ntotal))
    spent["write"] = time.perf_counter() - t0
    return entry


def merge_base(index_dir: Path, key: str, base: Base, delta: Delta, generation: int,
               max_segments: int) -> dict[str, Any]:
    """A new base: the old one minus hidden ids plus the delta's vectors, without retraining; writes its files."""
    index = load_index(index_dir / base.file, mmap=False)  # a writable copy
    hidden = delta.hidden[member(base.ids, delta.hidden)]
    if len(hidden):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(hidden)))
    order = np.argsort(delta.ids, kind="stable")
    add_ids, add_vecs = delta.ids[order], np.ascontiguousarray(delta.vecs[order])
    if len(add_ids):
        index.add_with_ids(add_vecs, add_ids)
    ids = np.union1d(np.setdiff1d(np.asarray(base.ids), hidden, assume_unique=True), add_ids).astype(np.int64)
    segments = [segment_entry(s) for s in base.segments]
    if base.kind.family == "ivf-pq" and len(add_ids):
        seg = _SegmentWriter(index_dir, key, generation)
        seg.add(add_ids, add_vecs)
        segments.append(seg.commit())
        if len(segments) > max_segments:
            opened = [open_segment(index_dir, s, base.index.d) for s in segments]
            segments = [compact_segments(index_dir, key, opened, ids, generation)]
    return _write_base(index_dir, key, index, base.kind, ids, segments, generation, base.trained_count)


def compact_segments(index_dir: Path, key: str, segments: list[Segment], ids: np.ndarray, generation: int,
                     chunk: int = 262_144) -> dict[str, Any]:
    """One re-rank segment holding the newest vector of each live id (drops removed and superseded rows)."""
    dim = segments[0].vecs.shape[1]
    seg = _SegmentWriter(index_dir, key, generation)
    try:
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            found, vecs = gather(segments, part, dim)
            if not found.all():
                raise ValueError(f"{int((~found).sum())} live ids have no re-rank vector")
            seg.add(part, vecs)
        return seg.commit()
    except BaseException:
        seg.abort()
        raise
