"""FAISS vector store: one index per embedding space, derived from the catalog, with a manifest beside it.

Files per space in the index dir: ``<key>.<generation>.faiss`` and ``<key>.manifest.json``. The manifest is
written last and atomically; it is the commit point, so a crash leaves either the old or the new pair. On load, a
manifest that disagrees with the catalog (space, dim, count, generation) or an unreadable file means a rebuild
from the catalog: never a silently stale answer.

Index types: exact inner product (``IndexFlatIP`` under an id map) up to ``exact_max`` vectors; above it an
``IndexIVFFlat``: it keeps full vectors (no quantisation, which hurts text->image recall), so its candidates are
scored exactly, and ``nprobe`` trades speed for recall.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import faiss
import numpy as np

from clipsearch.indexer.errors import IndexUnavailable
from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class StoreOptions:
    """Index-type policy."""

    exact_max: int = 50_000  # up to this many: exact search (~0.19 us/vector at 512-d on 2 cores: ~10 ms at 50k)
    nprobe: int = 48  # IVF lists visited per query (bench/RESULTS.md: recall@10 >= 0.95 at 1M)
    train_per_list: int = 64  # training sample per IVF list (capped at 262,144 vectors)
    auto_rebuild: bool = True  # rebuild from the catalog on mismatch; False raises IndexUnavailable instead


@dataclass
class _Loaded:
    index: faiss.Index
    generation: int
    kind: str


# Loaded indexes are never modified (a change rebuilds and replaces the file), so they are memory-mapped: loading
# 1M vectors takes milliseconds instead of seconds of copying 2 GB, lists are paged in as searches touch them, and
# a file replaced by a rebuild stays valid for a reader that still maps it.
_READ_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)  # combined, the two flags fail on IVF files


def _read_through(path: Path) -> None:
    """Read a file start to end so that its pages sit in the OS page cache (a hint; never fails).

    Why not rely on the memory map or posix_fadvise: faulting a cold mapped index in page by page ran at ~25 MB/s
    on the project's VM (73 s for the 2 GB index of a million photos), and WILLNEED barely helped, while one
    sequential read of the same file takes 2.5 s.
    """
    buf = bytearray(16 << 20)
    try:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    except OSError:
        pass


def _fsync_replace(tmp: str, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class VectorStore:
    """Loads, builds and searches the per-space FAISS indexes; thread-safe for concurrent readers."""

    def __init__(self, index_dir: Path, catalog: Catalog, options: StoreOptions = StoreOptions()) -> None:
        self.dir = Path(index_dir)
        self.catalog = catalog
        self.options = options
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()
        self._prefetching: dict[str, threading.Thread] = {}  # index file -> the thread reading it into the cache

    def manifest_path(self, space: SpaceInfo) -> Path:
        """Where the manifest of a space lives."""
        return self.dir / f"{space.key}.manifest.json"

    def read_manifest(self, space: SpaceInfo) -> dict | None:
        """The manifest as written, or None when absent or unreadable."""
        try:
            return json.loads(self.manifest_path(space).read_text())
        except (OSError, ValueError):
            return None

    # --- building ----------------------------------------------------------------------------------------------
    def new_index(self, dim: int, count: int, sample: np.ndarray | None) -> tuple[faiss.Index, str]:
        """An empty index of the type the policy picks for `count` vectors (trained on `sample` if IVF)."""
        if count <= self.options.exact_max or sample is None:
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat-ip"
        nlist = int(min(65536, max(64, 4 * math.sqrt(count))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.nprobe = self.options.nprobe
        return index, f"ivf{nlist}-flat-ip"

    def _training_sample(self, space: SpaceInfo) -> np.ndarray | None:
        if space.count <= self.options.exact_max:
            return None
        nlist = int(min(65536, max(64, 4 * math.sqrt(space.count))))
        want = min(space.count, max(nlist * 39, min(262_144, nlist * self.options.train_per_list)))
        parts, have = [], 0
        stride = max(1, space.count // want)
        for _ids, vecs in self.catalog.iter_vectors(space.id):
            parts.append(vecs[::stride])
            have += len(parts[-1])
        return np.ascontiguousarray(np.concatenate(parts)[:want]) if have else None

    def rebuild(self, space: SpaceInfo) -> faiss.Index:
        """Build the space's index from the catalog and write it atomically with its manifest."""
        space = self.catalog.space(space.id)  # fresh generation/count
        index, kind = self.new_index(space.dim, space.count, self._training_sample(space))
        n = 0
        for ids, vecs in self.catalog.iter_vectors(space.id):
            index.add_with_ids(np.ascontiguousarray(vecs), ids)
            n += len(ids)
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{space.key}.{space.generation}.faiss"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{space.key}.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            _fsync_replace(tmp, final)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "space_key": space.key,
                "space_label": space.label,
                "model_spec": space.model_spec,
                "dim": space.dim,
                "metric": "inner_product",
                "index_type": kind,
                "count": n,
                "generation": space.generation,
                "file": final.name,
                "written_at": datetime.now().isoformat(timespec="seconds"),
            }
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{space.key}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(manifest, f, indent=2)
            _fsync_replace(tmp, self.manifest_path(space))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in self.dir.glob(f"{space.key}.*.faiss"):
            if old != final:
                old.unlink(missing_ok=True)
        log.info("built %s index for %s: %d vectors (generation %d)", kind, space.label, n, space.generation)
        self._loaded[space.key] = _Loaded(index, space.generation, kind)
        return index

    # --- loading -----------------------------------------------------------------------------------------------
    def _problem(self, space: SpaceInfo, manifest: dict | None) -> str | None:
        if manifest is None:
            return "no index manifest"
        expect = {"space_key": space.key, "dim": space.dim, "count": space.count, "generation": space.generation}
        for field, want in expect.items():
            if manifest.get(field) != want:
                return f"manifest {field}={manifest.get(field)!r} but catalog has {want!r}"
        if not (self.dir / str(manifest.get("file"))).is_file():
            return "index file missing"
        return None

    def index_for(self, space: SpaceInfo) -> faiss.Index:
        """The up-to-date index of a space: cached, loaded from disk, or rebuilt from the catalog."""
        generation = self.catalog.space(space.id, with_count=False).generation  # one-row read per query
        with self._lock:
            cached = self._loaded.get(space.key)
            if cached and cached.generation == generation:
                return cached.index
            space = self.catalog.space(space.id)  # counted only when the index must be (re)loaded
            manifest = self.read_manifest(space)
            problem = self._problem(space, manifest)
            if problem is None:
                try:
                    index = faiss.read_index(str(self.dir / manifest["file"]), _READ_FLAGS)
                    if index.ntotal != space.count or index.d != space.dim:
                        raise ValueError(f"index holds {index.ntotal}x{index.d}")
                    if hasattr(index, "nprobe"):
                        index.nprobe = self.options.nprobe
                    self._loaded[space.key] = _Loaded(index, space.generation, manifest.get("index_type", "?"))
                    return index
                except (RuntimeError, ValueError) as e:
                    problem = f"damaged index file ({str(e).splitlines()[0][:120]})"
            if not self.options.auto_rebuild:
                raise IndexUnavailable(f"index for {space.label} is not usable: {problem}; run `clipsearch reindex`")
            log.warning("rebuilding index for %s from the catalog: %s", space.label, problem)
            return self.rebuild(space)

    def prefetch(self, space: SpaceInfo) -> None:
        """Start reading the space's index file into the OS page cache on a background thread (a hint; never fails).

        Tagging calls this before encoding its labels, so a cold index (2 GB at 1M photos) comes off the disk
        while the text tower runs instead of after it.
        """
        path = self._index_file(space)
        if path is not None:
            thread = threading.Thread(target=_read_through, args=(path,), name="index-prefetch", daemon=True)
            self._prefetching[str(path)] = thread
            thread.start()

    def _index_file(self, space: SpaceInfo) -> Path | None:
        """The index file the manifest names, or None without a manifest."""
        manifest = self.read_manifest(space)
        return None if manifest is None else self.dir / str(manifest.get("file"))

    def _warm(self, space: SpaceInfo) -> None:
        """Have the index file in the page cache before streaming all of it: wait for a prefetch, else read it."""
        path = self._index_file(space)
        if path is None:
            return
        thread = self._prefetching.pop(str(path), None)
        if thread is not None:
            thread.join()
        else:
            _read_through(path)

    def sync(self, space: SpaceInfo) -> None:
        """Make the on-disk index of a space match the catalog (called at the end of an indexing run)."""
        space = self.catalog.space(space.id)
        if self._problem(space, self.read_manifest(space)) is not None:
            self.rebuild(space)

    def iter_vectors(self, space: SpaceInfo, batch: int = 65_536,
                     reuse: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, vectors) of a space from its memory-mapped index: what tagging reads instead of the catalog.

        The index is validated against the catalog's generation first (index_for), so these are the catalog's
        vectors; reading them from memory avoids streaming every blob out of the database again. With `reuse`, the
        arrays yielded are only valid until the next step (read-only use): no fresh memory per chunk, which at a
        million vectors saves gigabytes of page faults; by default each chunk is the caller's own copy.
        """
        index = self.index_for(space)
        self._warm(space)
        if isinstance(index, faiss.IndexIDMap2):
            flat = faiss.downcast_index(index.index)
            n, d = flat.ntotal, flat.d
            vecs = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
            ids = faiss.vector_to_array(index.id_map)
            for start in range(0, n, batch):
                yield ids[start : start + batch], vecs[start : start + batch]
            return
        ivf = faiss.extract_index_ivf(index)  # IVF-Flat: the lists hold the full float32 vectors
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

    # --- searching ---------------------------------------------------------------------------------------------
    def search(
        self, space: SpaceInfo, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (ids, scores) per query row; `allowed_ids` restricts the search to those ids (filters)."""
        index = self.index_for(space)
        k = int(min(k, index.ntotal))
        if k <= 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(queries))]
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed_ids is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            if hasattr(index, "nprobe"):
                # A selective filter may leave too few allowed ids in the usual lists: probe all of them then
                # (membership checks are cheap; only allowed vectors are scored), so top-k is not lost.
                selective = len(allowed_ids) < 0.2 * index.ntotal
                params = faiss.SearchParametersIVF(sel=sel, nprobe=index.nlist if selective else self.options.nprobe)
            else:
                params = faiss.SearchParameters(sel=sel)
            scores, ids = index.search(q, k, params=params)
        else:
            scores, ids = index.search(q, k)
        out = []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            keep = row_ids >= 0
            out.append((row_ids[keep].astype(np.int64), row_scores[keep].astype(np.float32)))
        return out
