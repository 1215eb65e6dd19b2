"""One space's searchable state in memory: a main (base) index plus a delta of the changes made since it.

The base is an immutable, memory-mapped FAISS file; the delta holds the vectors written since (searched exactly)
and the ids the base must no longer serve (removed, or superseded by a newer vector). A query searches both and
merges the hits; a catch-up only replaces the delta, so its cost follows the size of the change, not the library.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipsearch.indexer.storage.index_files import write_atomic
from clipsearch.indexer.storage.index_kinds import Kind, Segment, gather, member

Hits = tuple[np.ndarray, np.ndarray]  # (ids int64, scores float32) of one query row, best first


@dataclass
class StoreStats:
    """What this store object did (tests and benchmarks read it; nothing depends on it)."""

    full_builds: int = 0  # bases built from the whole catalog (first build, repair, retrain, optimize)
    merges: int = 0  # deltas merged into a new base (no training)
    delta_writes: int = 0  # catch-ups written as a new delta file only
    upserts_applied: int = 0  # vectors applied from the change record (on disk or in memory)
    removals_applied: int = 0  # removal records applied
    answered_behind: int = 0  # times a query caught up in memory because the files lagged the catalog


@dataclass(frozen=True)
class OptimizeReport:
    """What `optimize` built."""

    index_type: str
    vectors: int
    seconds: float
    pruned_removals: int  # change records no index needs any more


class IndexView:
    """Read-only facts about a space's index as queries see it (base + delta); `id_map` lists the live ids as
    a FAISS id vector (what `faiss.vector_to_array` reads), for tests and tools."""

    def __init__(self, state: SpaceIndex) -> None:
        self.ntotal, self.d, self.kind, self._state = state.count, state.dim, state.kind, state

    @property
    def id_map(self) -> Any:
        """Live ids as a faiss Int64Vector."""
        vec = faiss.Int64Vector()
        faiss.copy_array_to_vector(np.ascontiguousarray(self._state.live_ids(), dtype=np.int64), vec)
        return vec


@dataclass
class Delta:
    """Changes since the base: vectors to add and base ids to hide."""

    ids: np.ndarray  # (n,) int64: vectors written since the base
    vecs: np.ndarray  # (n, d) float32
    hidden: np.ndarray  # sorted unique int64, a superset of `ids`: base ids not to serve (removed or superseded)

    @classmethod
    def empty(cls, dim: int) -> Delta:
        """No change."""
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    def size(self) -> int:
        """Changes held: every id touched since the base (what bounds the delta before it is merged)."""
        return len(self.hidden)

    def apply(self, removed: np.ndarray, up_ids: np.ndarray, up_vecs: np.ndarray) -> Delta:
        """The delta after removing `removed` and writing `up_ids` (a re-written id replaces its older vector)."""
        touched = np.union1d(removed, up_ids).astype(np.int64)
        keep = ~np.isin(self.ids, touched)
        return Delta(np.concatenate([self.ids[keep], up_ids.astype(np.int64)]),
                     np.concatenate([self.vecs[keep], up_vecs.astype(np.float32)]),
                     np.union1d(self.hidden, touched).astype(np.int64))


def save_delta(path: Path, delta: Delta, meta: dict[str, Any]) -> None:
    """Write a delta file atomically; `meta` names the space and base it belongs to (checked on load)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, ids=delta.ids, vecs=delta.vecs, hidden=delta.hidden,
                     meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))

    write_atomic(path, write)


def load_delta(path: Path, dim: int) -> tuple[Delta, dict[str, Any]]:
    """Read a delta file; ValueError (or OSError) when it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            delta = Delta(z["ids"].astype(np.int64), z["vecs"].astype(np.float32), z["hidden"].astype(np.int64))
    except (KeyError, EOFError) as e:
        raise ValueError(f"damaged delta file {path.name}: {e}") from e
    except Exception as e:  # zipfile.BadZipFile and friends
        if isinstance(e, OSError):
            raise
        raise ValueError(f"damaged delta file {path.name}: {e}") from e
    if delta.vecs.shape != (len(delta.ids), dim) or len(delta.hidden) < len(delta.ids):
        raise ValueError(f"delta file {path.name} holds arrays of the wrong shape")
    return delta, meta


@dataclass
class Base:
    """The main index of a space as its files hold it."""

    index: faiss.Index
    kind: Kind
    ids: np.ndarray  # every id the index holds, ascending (memory-mapped)
    segments: list[Segment]  # float16 re-rank vectors (IVF-PQ only), oldest first
    generation: int  # catalog generation the base covers
    trained_count: int  # vectors the IVF was trained for (retrain past a multiple of it)
    entry: dict[str, Any]  # its manifest entry (files, fingerprint, counts)

    @property
    def file(self) -> str:
        """The index file's name ("" for the in-memory empty base of a space never written)."""
        return str(self.entry.get("file", ""))


@dataclass(frozen=True)
class Knobs:
    """Search-time settings (from StoreOptions)."""

    nprobe: int
    pq_nprobe: int
    rerank: int


@dataclass
class SpaceIndex:
    """Base + delta, with the catalog generation they cover together. Never modified: a change makes a new one."""

    base: Base
    delta: Delta
    generation: int  # catalog generation covered
    disk_generation: int  # generation of the files on disk (lower when a query caught up in memory)
    dim: int
    knobs: Knobs
    count: int = field(init=False)  # live vectors
    _not_hidden: Any = field(init=False, default=None)
    _keep: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        in_base = self.delta.hidden[member(self.base.ids, self.delta.hidden)]
        self.count = len(self.base.ids) - len(in_base) + len(self.delta.ids)
        if len(in_base):
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(in_base))
            self._not_hidden = faiss.IDSelectorNot(batch)
            self._keep = [batch]

    @property
    def kind(self) -> str:
        """The base index type (manifest label)."""
        return self.base.kind.label

    def caught_up(self, removed: np.ndarray, up_ids: np.ndarray, up_vecs: np.ndarray, generation: int) -> SpaceIndex:
        """This state with changes applied in memory (the files stay as they are)."""
        return SpaceIndex(self.base, self.delta.apply(removed, up_ids, up_vecs), generation, self.disk_generation,
                          self.dim, self.knobs)

    def live_ids(self) -> np.ndarray:
        """Every id served, ascending."""
        base = np.asarray(self.base.ids)
        return np.union1d(base[~np.isin(base, self.delta.hidden)], self.delta.ids)

    # --- search ------------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[Hits]:
        """Top-k per query row over base and delta; `allowed` (ids) restricts both, keeping k when k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
        with _threads(1 if len(q) < 8 else 0):
            base_hits = self._search_base(q, k, allowed)
        parts = [base_hits, self._search_delta(q, k, allowed)]
        out = []
        for row in range(len(q)):
            ids = np.concatenate([p[row][0] for p in parts])
            scores = np.concatenate([p[row][1] for p in parts])
            best = np.lexsort((ids, -scores))[:k]
            out.append((ids[best].astype(np.int64), scores[best].astype(np.float32)))
        return out

    def _selector(self, allowed: np.ndarray | None, keep: list[Any]) -> Any:
        """FAISS selector for allowed-and-not-hidden ids (a bitmap: one bit per id up to the largest allowed)."""
        if allowed is None:
            return self._not_hidden
        top = int(allowed.max())
        flags = np.zeros(top + 1, bool)
        flags[allowed] = True
        hidden = self.delta.hidden
        flags[hidden[hidden <= top]] = False
        bitmap = np.packbits(flags, bitorder="little")
        keep.append(bitmap)
        return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))

    def _search_base(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Hits]:
        index, kind = self.base.index, self.base.kind
        if index.ntotal == 0 or (allowed is not None and not len(allowed)):
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(q)
        want = min(max(k, self.knobs.rerank) if kind.family == "ivf-pq" else k, index.ntotal)
        keep: list[Any] = []
        sel = self._selector(allowed, keep)
        if kind.family == "flat":
            params = faiss.SearchParameters()
        else:
            params = faiss.SearchParametersIVF()
            nprobe = self.knobs.nprobe if kind.family == "ivf-flat" else self.knobs.pq_nprobe
            if allowed is not None and len(allowed) * nprobe / kind.nlist < 4 * want:
                nprobe = kind.nlist  # few allowed ids in the usual lists: visit all lists, score only allowed ones
            params.nprobe = min(nprobe, kind.nlist)
        if sel is not None:
            params.sel = sel
        scores, ids = index.search(q, want, params=params)
        if kind.family != "flat" and params.nprobe < kind.nlist and (ids[:, -1] < 0).any():
            # the probed lists held fewer than `want` (allowed) vectors: a top-k stays intact by visiting them all
            params.nprobe = kind.nlist
            scores, ids = index.search(q, want, params=params)
        rows = []
        for i in range(len(q)):
            found = ids[i] >= 0
            row_ids, row_scores = ids[i][found], scores[i][found]
            if kind.family == "ivf-pq":
                row_ids, row_scores = self._rerank(q[i], row_ids, k)
            rows.append((row_ids.astype(np.int64), row_scores.astype(np.float32)))
        return rows

    def _rerank(self, qrow: np.ndarray, ids: np.ndarray, k: int) -> Hits:
        """Exact scores of PQ candidates from their float16 vectors (memory-mapped), best k."""
        found, vecs = gather(self.base.segments, ids, self.dim)
        ids, scores = ids[found], vecs[found] @ qrow
        best = np.argsort(-scores, kind="stable")[:k]
        return ids[best], scores[best]

    def _search_delta(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Hits]:
        ids, vecs = self.delta.ids, self.delta.vecs
        if allowed is not None and len(ids):
            mask = np.isin(ids, allowed)
            ids, vecs = ids[mask], vecs[mask]
        if not len(ids):
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(q)
        scores = q @ vecs.T
        kk = min(k, len(ids))
        rows = []
        for row in scores:
            top = np.argpartition(-row, kk - 1)[:kk]
            rows.append((ids[top], row[top]))
        return rows

    # --- streaming ---------------------------------------------------------------------------------------------
    def iter_vectors(self, batch: int, reuse: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every live vector: the base's minus hidden ones, then the delta's."""
        hidden = self.delta.hidden
        for ids, vecs in self._base_chunks(batch, reuse):
            if len(hidden):
                mask = ~np.isin(ids, hidden)
                if not mask.all():
                    ids, vecs = ids[mask], vecs[mask]
            if len(ids):
                yield ids, vecs
        for start in range(0, len(self.delta.ids), batch):
            ids, vecs = self.delta.ids[start : start + batch], self.delta.vecs[start : start + batch]
            yield (ids, vecs) if reuse else (ids.copy(), vecs.copy())

    def _base_chunks(self, batch: int, reuse: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        index, family = self.base.index, self.base.kind.family
        if index.ntotal == 0:
            return
        if family == "flat":
            flat = faiss.downcast_index(index.index)
            n, d = flat.ntotal, flat.d
            vecs = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
            ids = faiss.vector_to_array(index.id_map)
            for start in range(0, n, batch):
                chunk = ids[start : start + batch], vecs[start : start + batch]
                yield chunk if reuse else (chunk[0].copy(), chunk[1].copy())
        elif family == "ivf-flat":
            yield from _ivf_flat_chunks(index, batch, reuse)
        else:
            newer = np.zeros(0, np.int64)
            for seg in reversed(self.base.segments):
                for start in range(0, len(seg.ids), batch):
                    ids = np.asarray(seg.ids[start : start + batch])
                    mask = member(self.base.ids, ids) & ~np.isin(ids, newer)
                    yield ids[mask], np.asarray(seg.vecs[start : start + batch][mask], dtype=np.float32)
                newer = np.concatenate([newer, np.asarray(seg.ids)])


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run FAISS on `n` OpenMP threads in this thread (0: as configured).

    Why one for a few queries: FAISS splits a search across queries, so one query keeps one core busy anyway,
    while the other threads still join every parallel region; on a loaded machine (an indexer beside the UI) a
    descheduled thread stalls them all. Measured under load on the 2-core box: 64 ms per query over 10k vectors
    with two threads, 5 ms with one. The setting is per calling thread (OpenMP ICV), so servers' threads keep theirs.
    """
    if n <= 0:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _ivf_flat_chunks(index: faiss.Index, batch: int, reuse: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream an IVF-Flat index's lists (they hold the full float32 vectors) through one chunk buffer."""
    ivf = faiss.extract_index_ivf(index)
    invlists, d = ivf.invlists, ivf.d
    ids_buf, vec_buf = np.empty(batch, np.int64), np.empty((batch, d), np.float32)
    have = 0
    for list_no in range(ivf.nlist):
        size, done = invlists.list_size(list_no), 0
        if size:
            list_ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
            codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size)
            list_vecs = codes.view(np.float32).reshape(size, d)
        while done < size:  # copy into the chunk buffer; a list may straddle two chunks
            take = min(size - done, batch - have)
            ids_buf[have : have + take] = list_ids[done : done + take]
            vec_buf[have : have + take] = list_vecs[done : done + take]
            have, done = have + take, done + take
            if have == batch:
                yield (ids_buf, vec_buf) if reuse else (ids_buf.copy(), vec_buf.copy())
                have = 0
    if have:
        yield (ids_buf[:have], vec_buf[:have]) if reuse else (ids_buf[:have].copy(), vec_buf[:have].copy())
