"""Near-duplicate groups: exact copies (same content hash) and resized, recompressed, slightly cropped or edited
copies, for `clipsearch duplicates` and for stacking search results (search/stacks.py).

Candidates come from two nearest-neighbour searches, never from comparing every pair:

* the photos' CLIP vectors in the space (k nearest with a cosine floor), which finds copies a strong model sees as
  one photo;
* the perceptual layout descriptors (indexer/ingest/phash.py), which find them whatever the model: a random-weight
  network ranks a brightened copy below a hundred photos of the same colour.

Both run as a blocked self-join (`knn_pairs`: k-means lists, a matrix product per list) rather than one index query
per photo, which at a million photos is the difference between minutes and hours on two cores. Every candidate pair
is then confirmed at the pixel level: pHash Hamming distance (whole photo against the other's whole and 95 % crops)
at most `phash_max`, opponent colours on a 4x4 grid within `colour_max` and aspect ratios within `aspect_max`. Two
photos of the same kind of subject on the same background differ there and stay apart (bench/duplicates.py); burst
shots of one still scene can pass, as they would for a person glancing at them. Confirmed pairs and exact copies are
joined with union-find. clipsearch never deletes anything: a group only suggests which member to keep.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select

from clipsearch.indexer.errors import EmptyLibrary, UsageError
from clipsearch.indexer.ingest.phash import PerceptualSignature, SignatureTable, signature_of_file
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo
from clipsearch.indexer.storage.phash_store import SignatureStore
from clipsearch.indexer.storage.schema import photos

from .duplicate_defaults import DEFAULT_PHASH_MAX, DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class DuplicateOptions:
    """How candidates are gathered and confirmed (the two thresholds are arguments of find_duplicate_groups)."""

    neighbours: int = 8  # nearest neighbours per photo and candidate source (copies link up through each other)
    layout_min: float = 0.5  # layout-descriptor cosine of a pixel candidate (loose: the hashes decide)
    block: int = 700  # mean k-means list size of the blocked neighbour search (balances k-means against the joins)
    aspect_max: float = 0.07  # largest |log| change of aspect ratio (a 5 % crop of one side changes it by 0.05)
    colour_max: float = 10.0  # largest mean change of the opponent-colour grid, in 8-bit levels (copies <= ~10)
    workers: int = 1  # processes computing missing signatures (1: in this process)


@dataclass(frozen=True)
class DuplicateMember:
    """One photo of a group, with what a person needs to decide what to keep."""

    id: int
    path: str
    size: int  # bytes
    width: int | None
    height: int | None
    date: datetime | None
    format: str | None
    content_hash: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["date"] = self.date.isoformat() if self.date else None
        return d


@dataclass(frozen=True)
class DuplicateGroup:
    """Photos that are copies of one another, best first (most pixels, then largest file, then oldest id)."""

    members: tuple[DuplicateMember, ...]
    exact: bool  # every member has the same content hash (byte-identical files)

    @property
    def ids(self) -> tuple[int, ...]:
        """Member photo ids, best first."""
        return tuple(m.id for m in self.members)

    @property
    def keep(self) -> DuplicateMember:
        """The suggested member to keep (the first); nothing is ever deleted by clipsearch."""
        return self.members[0]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: size, exact, keep (id), reclaimable bytes, members."""
        return {"size": len(self.members), "exact": self.exact, "keep": self.keep.id,
                "reclaimable_bytes": sum(m.size for m in self.members[1:]),
                "members": [m.as_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DuplicateGroup:
        """The inverse of as_dict (the group cache reads it back)."""
        members = tuple(DuplicateMember(**{**m, "date": datetime.fromisoformat(m["date"]) if m["date"] else None})
                        for m in d["members"])
        return cls(members, bool(d["exact"]))


def duplicates_document(groups: list[DuplicateGroup]) -> dict[str, Any]:
    """What `clipsearch duplicates --json` prints: totals, then every group."""
    return {"groups": len(groups), "photos": sum(len(g.members) for g in groups),
            "reclaimable_bytes": sum(g.as_dict()["reclaimable_bytes"] for g in groups),
            "items": [g.as_dict() for g in groups]}


# --- signatures ------------------------------------------------------------------------------------------------------
def _signature_task(path: bytes) -> PerceptualSignature | str:
    try:
        return signature_of_file(path)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _compute(paths: list[bytes], workers: int) -> Iterator[PerceptualSignature | str]:
    if workers <= 1 or len(paths) < 64:
        yield from map(_signature_task, paths)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(_signature_task, paths, chunksize=32)


def ensure_signatures(catalog: Catalog, workers: int = 1, on_progress: Progress | None = None,
                      chunk: int = 512) -> SignatureTable:
    """Signatures of every indexed photo, computing (and storing, a chunk at a time, so an interrupted run keeps
    its work) those missing or stale. Photos that no longer decode are skipped with one log line."""
    store = SignatureStore(catalog)
    todo = store.photos_needing()
    failed = 0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        done: dict[int, PerceptualSignature] = {}
        for (pid, _path), sig in zip(part, _compute([p for _, p in part], workers), strict=True):
            if isinstance(sig, str):
                failed += 1
                log.debug("no perceptual signature for #%d: %s", pid, sig)
            else:
                done[pid] = sig
        store.put(done)
        if on_progress:
            on_progress("signatures", start + len(part), len(todo))
    if failed:
        log.warning("%d photos could not be read for the pixel check (moved or damaged since indexing); "
                    "they are grouped by content hash only", failed)
    return store.load()


# --- candidates ------------------------------------------------------------------------------------------------------
def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unique unordered id pairs as (m, 2) int64 with a < b (self pairs dropped)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    keep = a != b
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    keys = np.unique((lo << 32) | hi)
    return np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1) if len(keys) else np.zeros((0, 2), np.int64)


def _lists(x: np.ndarray, block: int, seed: int) -> list[np.ndarray]:
    """Rows grouped by their two nearest k-means centroids (each row in two lists): a pair of near-copies shares
    at least one list, so a self-join inside each list finds it. One list for a small set."""
    import faiss

    n, dim = x.shape
    nlist = n // block
    if nlist < 2:
        return [np.arange(n)] if n > 1 else []
    km = faiss.Kmeans(dim, nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=40)
    km.train(x)
    assign = np.concatenate([km.index.search(x[s : s + 65536], 2)[1] for s in range(0, n, 65536)])
    rows = np.repeat(np.arange(n), 2)
    order = np.argsort(assign.ravel(), kind="stable")
    bounds = np.searchsorted(assign.ravel()[order], np.arange(nlist + 1))
    return [rows[order[bounds[i] : bounds[i + 1]]] for i in range(nlist) if bounds[i + 1] - bounds[i] > 1]


def knn_pairs(ids: np.ndarray, x: np.ndarray, k: int, min_score: float, block: int = 700, seed: int = 0,
              stage: str = "model", on_progress: Progress | None = None) -> np.ndarray:
    """Id pairs (a, b) where b is among a's k nearest neighbours by inner product and scores >= min_score.

    A blocked self-join instead of one search per row: rows are split into k-means lists (`_lists`) and each list
    is multiplied with itself (BLAS), so every vector is read once per list rather than once per query, which is
    what made the per-query index search the bottleneck at a million photos (bench/duplicates.py). Only the lists
    a vector belongs to are searched: a near-copy, not a vaguely similar photo, is what this is for."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    left, right = [], []
    lists = _lists(x, block, seed)
    for n_done, rows in enumerate(lists, 1):
        members = x[rows]
        kk = min(k, len(rows) - 1)
        for start in range(0, len(rows), 2048):
            scores = members[start : start + 2048] @ members.T
            np.put_along_axis(scores, np.arange(start, start + len(scores))[:, None], -np.inf, axis=1)
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            ok = np.take_along_axis(scores, top, axis=1) >= min_score
            q = np.broadcast_to(np.arange(start, start + len(scores))[:, None], top.shape)
            left.append(ids[rows[q[ok]]])
            right.append(ids[rows[top[ok]]])
        if on_progress and (n_done % 64 == 0 or n_done == len(lists)):
            on_progress(stage, n_done, len(lists))
    if not left:
        return np.zeros((0, 2), np.int64)
    return _pairs(np.concatenate(left), np.concatenate(right))


def model_candidates(catalog: Catalog, space: SpaceInfo, threshold: float, options: DuplicateOptions,
                     on_progress: Progress | None = None) -> np.ndarray:
    """Id pairs among each photo's nearest neighbours by CLIP vector with cosine >= threshold."""
    parts = list(catalog.iter_vectors(space.id))
    if not parts:
        return np.zeros((0, 2), np.int64)
    ids, x = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    del parts
    return knn_pairs(ids, x, options.neighbours, threshold, options.block, stage="model", on_progress=on_progress)


def layout_candidates(table: SignatureTable, options: DuplicateOptions,
                      on_progress: Progress | None = None) -> np.ndarray:
    """Id pairs among each photo's nearest neighbours by perceptual layout (model-independent candidates)."""
    if len(table) < 2:
        return np.zeros((0, 2), np.int64)
    return knn_pairs(table.ids, table.descriptors, options.neighbours, options.layout_min, options.block,
                     stage="layout", on_progress=on_progress)


def confirm(table: SignatureTable, pairs: np.ndarray, phash_max: int, options: DuplicateOptions,
            chunk: int = 1 << 20) -> np.ndarray:
    """The candidate pairs that pass the pixel check (both signatures present; hashes, colours and aspect close).
    In chunks, hashes first: the cheap test drops most pairs before the colour grids are gathered."""
    kept = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        a, b = table.rows_of(part[:, 0]), table.rows_of(part[:, 1])
        known = (a >= 0) & (b >= 0)
        part, a, b = part[known], a[known], b[known]
        close = table.distances(a, b) <= phash_max
        part, a, b = part[close], a[close], b[close]
        ok = (table.aspect_changes(a, b) <= options.aspect_max) & (table.colour_changes(a, b) <= options.colour_max)
        kept.append(part[ok])
    return np.concatenate(kept) if kept else np.zeros((0, 2), np.int64)


def exact_pairs(catalog: Catalog) -> np.ndarray:
    """Id pairs of indexed photos with the same content hash (each joined to the first of its hash)."""
    dup = (select(photos.c.content_hash).where(photos.c.status == PhotoStatus.INDEXED,
                                               photos.c.content_hash.is_not(None))
           .group_by(photos.c.content_hash).having(func.count() > 1))
    q = (select(photos.c.content_hash, photos.c.id)
         .where(photos.c.status == PhotoStatus.INDEXED, photos.c.content_hash.in_(dup)))
    first: dict[str, int] = {}
    out = []
    with catalog.engine.connect() as conn:
        for digest, pid in conn.execute(q.order_by(photos.c.id)):
            out.append((first.setdefault(digest, int(pid)), int(pid)))
    return _pairs(np.array([p[0] for p in out], np.int64), np.array([p[1] for p in out], np.int64))


# --- grouping --------------------------------------------------------------------------------------------------------
def union_find(pairs: np.ndarray) -> list[list[int]]:
    """Connected components (of two or more ids) of an edge list, each sorted, in order of their smallest id."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = defaultdict(list)
    for x in parent:
        comps[root(x)].append(x)
    return [sorted(c) for _, c in sorted(comps.items()) if len(c) > 1]


def _describe(catalog: Catalog, components: list[list[int]]) -> list[DuplicateGroup]:
    rows = catalog.photos_by_id([i for c in components for i in c])
    groups = []
    for comp in components:
        members = [DuplicateMember(i, rows[i]["path"], int(rows[i]["size"]), rows[i]["width"], rows[i]["height"],
                                   rows[i]["date"], rows[i]["format"], rows[i]["content_hash"])
                   for i in comp if i in rows]
        if len(members) < 2:
            continue
        members.sort(key=lambda m: (-(m.width or 0) * (m.height or 0), -m.size, m.id))
        hashes = {m.content_hash for m in members}
        groups.append(DuplicateGroup(tuple(members), len(hashes) == 1 and None not in hashes))
    groups.sort(key=lambda g: (-len(g.members), min(g.ids)))
    return groups


def find_duplicate_groups(catalog: Catalog, space: SpaceInfo,
                          threshold: float = DEFAULT_THRESHOLD, phash_max: int = DEFAULT_PHASH_MAX, *,
                          options: DuplicateOptions = DuplicateOptions(), signatures: SignatureTable | None = None,
                          on_progress: Progress | None = None) -> list[DuplicateGroup]:
    """Groups of duplicate photos in the library, largest first (see the module docstring).

    `signatures` replaces the stored ones (benchmarks pass synthetic ones); by default missing signatures are
    computed from the files first (one decode per photo, stored for later runs). EmptyLibrary when the space has
    no vectors, UsageError for thresholds out of range."""
    if not -1.0 <= threshold <= 1.0 or isinstance(threshold, bool):
        raise UsageError(f"--threshold must be a cosine between -1 and 1, got {threshold}")
    if isinstance(phash_max, bool) or not isinstance(phash_max, int | np.integer) or not 0 <= phash_max <= 63:
        raise UsageError(f"phash_max must be a whole number of bits between 0 and 63, got {phash_max}")
    if not catalog.has_vectors(space.id):
        raise EmptyLibrary(f"no photos are indexed with model {space.model_spec}: nothing to compare")
    table = signatures if signatures is not None else ensure_signatures(catalog, options.workers, on_progress)
    found = np.concatenate([model_candidates(catalog, space, threshold, options, on_progress),
                            layout_candidates(table, options, on_progress)])
    confirmed = confirm(table, _pairs(found[:, 0], found[:, 1]), phash_max, options)
    edges = np.concatenate([exact_pairs(catalog), confirmed])
    log.info("duplicates: %d candidate pairs, %d confirmed by the pixel check", len(found), len(confirmed))
    return _describe(catalog, union_find(edges))
