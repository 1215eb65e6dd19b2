"""Near-duplicate groups: exact copies (same content hash) and resized, recompressed, slightly cropped or edited
copies, for `clipsearch duplicates` and for stacking search results (search/stacks.py).

Candidates come from two nearest-neighbour searches, never from comparing every pair:

* the space's vector index (the photo's CLIP vector, kNN with a cosine floor; widened for a photo whose every
  neighbour passes), which finds copies a strong model sees as one photo;
* a FAISS index over the perceptual layout descriptors (indexer/ingest/phash.py), which finds them whatever the
  model: a random-weight network ranks a brightened copy below a hundred photos of the same colour.

Every candidate pair is then confirmed at the pixel level: pHash Hamming distance (whole photo against the other's
whole and 95 % crops) at most `phash_max` and aspect ratios within `aspect_max`. Two photos of one scene, or of the
same kind of subject on the same background, differ there and stay apart. Confirmed pairs and exact copies are
joined with union-find. clipsearch never deletes anything: a group only suggests which member to keep.
"""

from __future__ import annotations

import logging
import math
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
from clipsearch.indexer.storage.store import VectorStore

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.90  # CLIP cosine floor of a model candidate (bench/duplicates.py: demo and random weights)
DEFAULT_PHASH_MAX = 10  # of 63 bits; copies measured <= 10, distinct photos of one kind mostly > 14 (bench)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class DuplicateOptions:
    """How candidates are gathered and confirmed (the two thresholds are arguments of find_duplicate_groups)."""

    neighbours: int = 8  # nearest neighbours asked of each index per photo
    max_neighbours: int = 256  # widened up to this many where every neighbour passes the cosine floor
    layout_min: float = 0.5  # layout-descriptor cosine of a pixel candidate (loose: the hashes decide)
    aspect_max: float = 0.07  # largest |log| change of aspect ratio (a 5 % crop of one side changes it by 0.05)
    batch: int = 8192  # query rows per index search
    exact_flat_max: int = 50_000  # up to this many photos the layout index is exact, above it IVF
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


def model_candidates(catalog: Catalog, store: VectorStore, space: SpaceInfo, threshold: float,
                     options: DuplicateOptions, on_progress: Progress | None = None) -> np.ndarray:
    """Id pairs whose CLIP vectors have cosine >= threshold: kNN on the space's index for every stored vector,
    asking for more neighbours (x4, up to max_neighbours) only for rows whose every neighbour passed."""
    left, right, done, total = [], [], 0, max(space.count, 0)
    for ids, vecs in catalog.iter_vectors(space.id, batch=options.batch):
        rows, k = np.arange(len(ids)), options.neighbours + 1
        while len(rows):
            widen = []
            for r, (nids, scores) in zip(rows, store.search(space, vecs[rows], k), strict=True):
                passed = scores >= threshold
                left.append(np.full(int(passed.sum()), ids[r]))
                right.append(nids[passed])
                if passed.all() and len(nids) == k and k <= options.max_neighbours:
                    widen.append(r)
            rows, k = np.array(widen, dtype=np.int64), min(k * 4, options.max_neighbours + 1)
        done += len(ids)
        if on_progress:
            on_progress("model", done, total or done)
    if not left:
        return np.zeros((0, 2), np.int64)
    return _pairs(np.concatenate(left), np.concatenate(right))


def _layout_index(desc: np.ndarray, options: DuplicateOptions) -> Any:
    import faiss

    dim = desc.shape[1]
    if len(desc) <= options.exact_flat_max:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(min(65536, 4 * math.sqrt(len(desc))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        pick = np.random.default_rng(0).choice(len(desc), size=min(len(desc), nlist * 40), replace=False)
        index.train(desc[np.sort(pick)])
        index.nprobe = 16
    index.add(desc)
    return index


def layout_candidates(table: SignatureTable, options: DuplicateOptions,
                      on_progress: Progress | None = None) -> np.ndarray:
    """Id pairs that are near neighbours by perceptual layout (model-independent candidates)."""
    if len(table) < 2:
        return np.zeros((0, 2), np.int64)
    desc = np.ascontiguousarray(table.descriptors, dtype=np.float32)
    index = _layout_index(desc, options)
    k = min(options.neighbours + 1, len(table))
    left, right = [], []
    for start in range(0, len(desc), options.batch):
        scores, rows = index.search(desc[start : start + options.batch], k)
        ok = (rows >= 0) & (scores >= options.layout_min)
        q = np.repeat(np.arange(start, start + len(rows)), k).reshape(rows.shape)
        left.append(table.ids[q[ok]])
        right.append(table.ids[rows[ok]])
        if on_progress:
            on_progress("layout", start + len(rows), len(desc))
    return _pairs(np.concatenate(left), np.concatenate(right))


def confirm(table: SignatureTable, pairs: np.ndarray, phash_max: int, aspect_max: float) -> np.ndarray:
    """The candidate pairs that pass the pixel check (both signatures present, hashes and aspect close)."""
    if not len(pairs):
        return pairs
    a, b = table.rows_of(pairs[:, 0]), table.rows_of(pairs[:, 1])
    known = (a >= 0) & (b >= 0)
    pairs, a, b = pairs[known], a[known], b[known]
    ok = (table.distances(a, b) <= phash_max) & (table.aspect_changes(a, b) <= aspect_max)
    return pairs[ok]


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


def find_duplicate_groups(catalog: Catalog, store: VectorStore, space: SpaceInfo,
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
    found = np.concatenate([model_candidates(catalog, store, space, threshold, options, on_progress),
                            layout_candidates(table, options, on_progress)])
    confirmed = confirm(table, _pairs(found[:, 0], found[:, 1]), phash_max, options.aspect_max)
    edges = np.concatenate([exact_pairs(catalog), confirmed])
    log.info("duplicates: %d candidate pairs, %d confirmed by the pixel check", len(found), len(confirmed))
    return _describe(catalog, union_find(edges))
