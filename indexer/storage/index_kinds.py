"""Which FAISS index a space gets for its size, how it is trained and filled, and its float16 re-rank vectors.

* up to ``exact_max`` vectors: exact inner product (``IndexFlatIP`` under an id map);
* up to ``pq_min``: ``IndexIVFFlat``. It keeps the full float32 vectors, so every candidate it returns is
  scored exactly (the "exact re-rank" is built in) and ``nprobe`` trades speed for recall;
* above: ``IndexIVFPQ`` (128 bytes a vector at 512-d) whose candidates are re-ranked exactly against float16
  copies of the vectors, memory-mapped from disk: at 10M photos the codes take ~1.3 GB instead of 20 GB.

A trained index is kept while the space grows, and retrained (a full build) only when its size class changes or it
has grown ``retrain_growth`` times past the count it was trained at (``needs_retrain``), or on ``optimize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np


@dataclass(frozen=True)
class Kind:
    """An index type with its shape parameters."""

    family: str  # "flat" | "ivf-flat" | "ivf-pq"
    nlist: int = 0  # IVF lists
    m: int = 0  # PQ sub-quantizers (bytes per vector)

    @property
    def label(self) -> str:
        """The name written into the manifest's index_type (status shows it)."""
        if self.family == "flat":
            return "flat-ip"
        if self.family == "ivf-flat":
            return f"ivf{self.nlist}-flat-ip"
        return f"ivf{self.nlist}-pq{self.m}-ip+f16-rerank"

    @classmethod
    def parse(cls, label: str) -> Kind:
        """The inverse of `label` (manifests record the label only)."""
        if label.startswith("flat"):
            return cls("flat")
        head = label.split("-")
        nlist = int(head[0][3:])
        if head[1] == "flat":
            return cls("ivf-flat", nlist)
        return cls("ivf-pq", nlist, int(head[1][2:]))


def _pq_m(dim: int) -> int:
    """Sub-quantizers for ~4 dimensions each (128 bytes a vector at 512-d), a divisor of dim.

    Why not the usual 8 dims (64 bytes): at ten million clustered vectors, 64-byte codes rank the true top 10
    so loosely that re-ranking 1,000 candidates was needed for recall@10 0.96; 128-byte codes reach 0.99 from 200
    (bench/RESULTS.md, issue 14)."""
    want = max(1, dim // 4)
    return max(m for m in range(1, want + 1) if dim % m == 0)


def choose_kind(count: int, dim: int, exact_max: int, pq_min: int, pq_nlist_max: int) -> Kind:
    """The index type for a space of `count` vectors."""
    if count <= exact_max:
        return Kind("flat")
    nlist = int(min(65536, max(64, 4 * math.sqrt(count))))
    if count < pq_min:
        return Kind("ivf-flat", nlist)
    return Kind("ivf-pq", max(64, min(nlist, pq_nlist_max)), _pq_m(dim))


_ORDER = {"flat": 0, "ivf-flat": 1, "ivf-pq": 2}


def needs_retrain(current: Kind, trained_count: int, count: int, wanted: Kind, growth: float) -> str | None:
    """Why the index must be built afresh for `count` vectors, or None to keep adding to the trained one.

    A larger size class is built as soon as it is reached; a smaller one only once the space has shrunk
    `growth` times below the count the index was built for, so a library hovering at a threshold is not rebuilt
    on every sync."""
    if _ORDER[wanted.family] > _ORDER[current.family]:
        return f"{count} vectors call for {wanted.label}, not {current.label}"
    if _ORDER[wanted.family] < _ORDER[current.family] and count * growth < trained_count:
        return f"shrunk to {count} vectors, under 1/{growth:g} of the {trained_count} it was built for"
    if current.family != "flat" and count > growth * max(1, trained_count):
        return f"grown to {count} vectors, {growth:g}x the {trained_count} it was trained at"
    return None


def sample_size(kind: Kind, count: int, per_list: int) -> int:
    """Training vectors for a kind: 39-`per_list` per list (FAISS' k-means range), at most 262,144 (PQ needs
    ~10k for its 256 centroids per sub-quantizer)."""
    if kind.family == "flat":
        return 0
    want = max(kind.nlist * 39, min(262_144, kind.nlist * per_list))
    if kind.family == "ivf-pq":
        want = max(want, 256 * 39)
    return min(count, want)


def empty_index(kind: Kind, dim: int, sample: np.ndarray | None) -> faiss.Index:
    """An empty index of this kind, trained on `sample` for the IVF kinds."""
    if kind.family == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind.family == "ivf-flat":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, kind.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.index_factory(dim, f"IVF{kind.nlist},PQ{kind.m}", faiss.METRIC_INNER_PRODUCT)
        index.do_polysemous_training = False  # the factory's default; we never search by Hamming (slow training)
    assert sample is not None and len(sample), "an IVF index needs a training sample"
    if gpu_count():  # k-means of the coarse quantizer (most of a build's training time) on the GPUs
        index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if gpu_count():
        index.clustering_index = None  # the GPU index is not serialisable: the file stays a CPU index
    return index


def gpu_count() -> int:
    """GPUs FAISS can use: > 0 only with the faiss-gpu build on a machine with a CUDA device (0 with faiss-cpu).

    Only training uses them: the trained index is the same kind of CPU index either way, searched on the CPU (a
    few ms at 1M and 10M; bench/RESULTS.md issue 14), so a library built on a GPU box opens anywhere."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # a faiss-gpu build on a machine whose driver cannot start
        return 0


@dataclass
class Segment:
    """Float16 copies of some vectors for exact re-ranking: sorted ids and their rows, memory-mapped."""

    ids: np.ndarray  # (n,) int64, ascending (memory-mapped)
    vecs: Any  # (n, d) float16 rows: an index_files.RowFile (read on demand), or an array in benchmarks
    files: tuple[str, str]  # ids file, vectors file (names in the index dir)


def gather(segments: list[Segment], ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, float32 vectors) of `ids` from the segments; a later segment holds the newer vector of an id."""
    out = np.zeros((len(ids), dim), np.float32)
    found = np.zeros(len(ids), bool)
    for seg in reversed(segments):
        todo = np.flatnonzero(~found)
        if not len(todo) or not len(seg.ids):
            continue
        want = ids[todo]
        pos = np.minimum(np.searchsorted(seg.ids, want), len(seg.ids) - 1)
        hit = seg.ids[pos] == want
        rows = pos[hit]
        order = np.argsort(rows)  # visit the mapped rows in file order
        out[todo[hit][order]] = seg.vecs[rows[order]]
        found[todo[hit]] = True
    return found, out


def member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask of `ids` found in an ascending array (binary search: works on a memory map without reading it all)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def load_index(path: Path, mmap: bool) -> faiss.Index:
    """Read an index file: memory-mapped (queries; lists paged in as searches touch them) or as a writable copy."""
    if mmap:
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)  # combined, the two flags fail on IVF files
        return faiss.read_index(str(path), flags)
    return faiss.read_index(str(path))
