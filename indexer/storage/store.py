"""FAISS vector store: one index per embedding space, derived from the catalog, updated in place.

Per space the index dir holds a base (FAISS file + ids, and float16 re-rank vectors for IVF-PQ), a delta of the
changes since the base, and ``<key>.manifest.json`` naming them with the catalog generation they cover. Files are
written once under fresh names and the manifest is replaced atomically, last: a reader sees the old set or the
new one, never a torn one (index_files.py).

* ``sync`` (the indexer, after its catalog commits) reads what changed since the manifest's generation from the
  catalog's change record (changes.py) and writes a new delta; past ``delta_max`` changes the delta is merged into
  a new base, and past a size threshold the index is retrained (index_kinds.py). A crash between the catalog
  commit and the index write is repaired the same way, on the next open: only the difference is applied.
* A query never rebuilds: when the files lag the catalog it searches the missing vectors exactly beside the index
  (logged at INFO, which ``-v`` shows); a gap of more than ``overlay_max`` changes is written as ``sync`` would.
  Only a damaged, missing or foreign index is rebuilt from the catalog, with one warning line.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipsearch.indexer.errors import IndexUnavailable
from clipsearch.indexer.storage import changes
from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo
from clipsearch.indexer.storage.index_build import StoreOptions, build_base, merge_base, open_base
from clipsearch.indexer.storage.index_files import (
    MANIFEST_VERSION,
    collect_garbage,
    fresh_name,
    manifest_path,
    read_manifest,
    read_through,
    write_manifest,
    writer_lock,
)
from clipsearch.indexer.storage.index_kinds import Kind, choose_kind, needs_retrain, sample_size
from clipsearch.indexer.storage.index_state import (
    Base,
    Delta,
    IndexView,
    Knobs,
    OptimizeReport,
    SpaceIndex,
    StoreStats,
    load_delta,
    save_delta,
)

__all__ = ["IndexView", "OptimizeReport", "StoreOptions", "StoreStats", "VectorStore"]

log = logging.getLogger(__name__)


class VectorStore:
    """Loads, catches up, writes and searches the per-space indexes; thread-safe for concurrent readers."""

    def __init__(self, index_dir: Path, catalog: Catalog, options: StoreOptions = StoreOptions()) -> None:
        self.dir = Path(index_dir)
        self.catalog = catalog
        self.options = options
        self.stats = StoreStats()
        self._loaded: dict[str, SpaceIndex] = {}
        self._tokens: dict[str, str] = {}  # key -> token of the manifest the loaded state came from
        self._lock = threading.Lock()
        self._prefetching: dict[str, threading.Thread] = {}
        self._knobs = Knobs(options.nprobe, options.pq_nprobe, options.rerank)
        self._catalog_id: str | None = None

    def manifest_path(self, space: SpaceInfo) -> Path:
        """Where the manifest of a space lives."""
        return manifest_path(self.dir, space.key)

    def read_manifest(self, space: SpaceInfo) -> dict | None:
        """The manifest as written, or None when absent or unreadable."""
        return read_manifest(self.manifest_path(space))

    def _identity(self) -> str:
        if self._catalog_id is None:
            self._catalog_id = self.catalog.identity()
        return self._catalog_id

    # --- opening -----------------------------------------------------------------------------------------------
    def _manifest_problem(self, space: SpaceInfo, manifest: dict | None) -> str | None:
        """Why the manifest cannot be trusted for this space of this catalog, or None."""
        if manifest is None:
            return "no index manifest"
        if manifest.get("manifest_version") != MANIFEST_VERSION:
            return f"index written by another clipsearch version (manifest v{manifest.get('manifest_version')})"
        mine = {"catalog_id": self._identity(), "space_key": space.key, "space_id": space.id, "dim": space.dim}
        for field, want in mine.items():
            if manifest.get(field) != want:
                return f"manifest {field}={manifest.get(field)!r} but this catalog's space has {want!r}"
        generation = int(manifest.get("generation", -1))
        if generation > space.generation:
            now = self.catalog.space(space.id, with_count=False).generation  # a writer may have moved on since
            if generation > now:
                return f"index covers generation {generation}, ahead of the catalog's {now}"
        if generation < space.diff_from:
            return f"index covers generation {generation}, older than the catalog's change record ({space.diff_from})"
        return None

    def _open(self, space: SpaceInfo, manifest: dict) -> SpaceIndex:
        """The state the manifest names; ValueError when its base is unusable. A damaged delta only costs a
        catch-up from the base's generation (logged), never a rebuild."""
        cached = self._loaded.get(space.key)
        entry = manifest["base"]
        if cached is not None and cached.base.file == entry["file"]:
            base = cached.base
        else:
            base = open_base(self.dir, entry, space.dim)
        delta, generation = Delta.empty(space.dim), base.generation
        if manifest.get("delta"):
            try:
                delta, meta = load_delta(self.dir / manifest["delta"]["file"], space.dim)
                want = {"space_key": space.key, "base_file": base.file, "generation": manifest["generation"]}
                if {k: meta.get(k) for k in want} != want:
                    raise ValueError(f"delta file belongs to {meta}")
                generation = int(manifest["generation"])
            except (ValueError, OSError) as e:
                if self.read_manifest(space) != manifest:  # a writer replaced the set (and dropped this delta)
                    raise ValueError("the manifest was replaced while it was read") from e
                log.warning("index for %s: %s; re-applying the catalog's changes since generation %d",
                            space.label, e, base.generation)
                delta = Delta.empty(space.dim)
        else:
            generation = int(manifest["generation"])
        state = SpaceIndex(base, delta, generation, generation, space.dim, self._knobs)
        if generation == int(manifest["generation"]) and state.count != manifest.get("count"):
            raise ValueError(f"index files hold {state.count} vectors, the manifest says {manifest.get('count')}")
        return state

    def _disk_state(self, space: SpaceInfo, writer: bool) -> SpaceIndex:
        """The state on disk (reused when this process loaded the same files), or a rebuilt one when it is missing
        or damaged. A reader of a space never written starts from an empty index and catches up in memory."""
        for _attempt in range(3):
            manifest = self.read_manifest(space)
            cached = self._loaded.get(space.key)
            if cached is not None and not writer and manifest is None and not cached.base.file:
                return cached  # still never written: keep catching up in memory from where it is
            if (cached is not None and manifest and manifest.get("token") == self._tokens.get(space.key)
                    and (not writer or cached.generation == cached.disk_generation)):
                return cached
            problem = self._manifest_problem(space, manifest)
            if problem is None:
                try:
                    state = self._open(space, manifest)  # type: ignore[arg-type]
                    self._tokens[space.key] = manifest["token"]  # type: ignore[index]
                    return state
                except ValueError as e:
                    problem = str(e)
            if self.read_manifest(space) == manifest:  # not replaced by a writer while we read: a real problem
                break
        if manifest is None and not writer and space.diff_from == 0:
            return self._empty(space)
        with writer_lock(self.dir, space.key):
            if self.read_manifest(space) != manifest:  # another process wrote (or repaired) it meanwhile
                return self._disk_state(space, writer)
            return self._build(space, problem or "unusable index", warn=manifest is not None)

    def _empty(self, space: SpaceInfo) -> SpaceIndex:
        base = Base(faiss.IndexIDMap2(faiss.IndexFlatIP(space.dim)), Kind("flat"), np.zeros(0, np.int64), [],
                    0, 0, {})
        return SpaceIndex(base, Delta.empty(space.dim), 0, 0, space.dim, self._knobs)

    def _current(self, space: SpaceInfo) -> SpaceIndex:
        """The state a query searches: cached while the catalog's generation is unchanged (one-row read)."""
        info = self.catalog.space(space.id, with_count=False)
        cached = self._loaded.get(info.key)
        if cached is not None and cached.generation == info.generation:
            return cached
        with self._lock:
            cached = self._loaded.get(info.key)
            if cached is not None and cached.generation == info.generation:
                return cached
            state = self._disk_state(info, writer=False)
            if state.generation < info.generation:
                state = self._catch_up_in_memory(info, state)
            self._loaded[info.key] = state
            return state

    def _catch_up_in_memory(self, space: SpaceInfo, state: SpaceIndex) -> SpaceIndex:
        """Apply the catalog's changes since `state` in memory (a query never rebuilds); a gap larger than
        `overlay_max` is written to disk instead, as `sync` would."""
        summary = changes.summarize(self.catalog.engine, space.id, state.generation)
        if summary is None or summary.upserts + summary.removals > self.options.overlay_max:
            return self._sync(space)
        new = self._apply(space, state, summary.generation)
        self.stats.answered_behind += 1
        log.info("index for %s is behind the catalog (generation %d < %d): %d written and %d removed vectors are "
                 "searched exactly beside it until `clipsearch index` updates it", space.label,
                 state.disk_generation, summary.generation, summary.upserts, summary.removals)
        return new

    def _apply(self, space: SpaceInfo, state: SpaceIndex, generation: int) -> SpaceIndex:
        """`state` with the catalog's changes since its generation applied (in memory)."""
        removed = changes.removed_since(self.catalog.engine, space.id, state.generation)
        parts = list(changes.upserts_since(self.catalog.engine, space.id, state.generation))
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        vecs = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, space.dim), np.float32)
        self.stats.upserts_applied += len(ids)
        self.stats.removals_applied += len(removed)
        return state.caught_up(removed, ids, vecs, generation)

    # --- writing -----------------------------------------------------------------------------------------------
    def sync(self, space: SpaceInfo) -> None:
        """Bring the space's files up to the catalog by applying only what changed (the indexer calls this after
        its commits). A counted `space` (count >= 0) at the covered generation is also checked against the files."""
        state = self._sync(space)
        if space.count >= 0 and space.generation == state.generation and space.count != state.count:
            info = self.catalog.space(space.id, with_count=False)
            with writer_lock(self.dir, info.key):
                self._build(info, f"index holds {state.count} vectors, the catalog {space.count}", warn=True)

    def _sync(self, space: SpaceInfo) -> SpaceIndex:
        info = self.catalog.space(space.id, with_count=False)
        with writer_lock(self.dir, info.key):
            state = self._catch_up_on_disk(info, self._disk_state(info, writer=True))
        self._loaded[info.key] = state
        return state

    def _catch_up_on_disk(self, space: SpaceInfo, state: SpaceIndex) -> SpaceIndex:
        """Write the catalog's changes since the files' generation: a new delta, or past `delta_max` a merged base,
        or past a size threshold a retrained one. Called under the writer lock."""
        summary = changes.summarize(self.catalog.engine, space.id, state.generation)
        if summary is None:
            return self._build(space, f"the catalog's change record does not reach back to generation "
                                      f"{state.generation}", warn=True)
        if summary.generation == state.generation:
            return state
        if summary.upserts + summary.removals > self.options.catchup_max:
            return self._build(space, f"{summary.upserts + summary.removals} changes to apply", warn=False)
        t0, o = time.perf_counter(), self.options
        new = self._apply(space, state, summary.generation)
        wanted = choose_kind(new.count, space.dim, o.exact_max, o.pq_min, o.pq_nlist_max)
        why = needs_retrain(new.base.kind, new.base.trained_count, new.count, wanted, o.retrain_growth)
        if why is not None:
            return self._build(space, why, warn=False)
        merged = new.delta.size() > o.delta_max
        if merged:
            entry = merge_base(self.dir, space.key, new.base, new.delta, summary.generation, o.max_segments)
            out = self._publish(space, entry, None, Delta.empty(space.dim), summary.generation)
            self.stats.merges += 1
        else:
            out = self._publish(space, new.base.entry, new.base, new.delta, summary.generation)
            self.stats.delta_writes += 1
        log.info("index for %s: applied %d written and %d removed vectors (generation %d -> %d) in %.2fs%s",
                 space.label, summary.upserts, summary.removals, state.generation, summary.generation,
                 time.perf_counter() - t0, "; merged into a new base" if merged else "")
        return out

    def _publish(self, space: SpaceInfo, entry: dict[str, Any], base: Base | None, delta: Delta,
                 generation: int) -> SpaceIndex:
        """Write the delta (if any) and the manifest that makes the set current; drop files no longer named."""
        delta_entry = None
        if delta.size():
            name = fresh_name(space.key, "delta", generation, "npz")
            save_delta(self.dir / name, delta, {"space_key": space.key, "base_file": entry["file"],
                                                "generation": generation})
            delta_entry = {"file": name, "vectors": len(delta.ids), "hidden": len(delta.hidden)}
        if base is None:
            base = open_base(self.dir, entry, space.dim)
        state = SpaceIndex(base, delta, generation, generation, space.dim, self._knobs)
        manifest = {
            "manifest_version": MANIFEST_VERSION, "token": secrets.token_hex(8), "catalog_id": self._identity(),
            "space_id": space.id, "space_key": space.key, "space_label": space.label, "model_spec": space.model_spec,
            "dim": space.dim, "metric": "inner_product", "index_type": base.kind.label, "count": state.count,
            "generation": generation, "file": entry["file"], "base": entry, "delta": delta_entry,
            "written_at": datetime.now().isoformat(timespec="seconds"),
        }
        write_manifest(self.manifest_path(space), manifest)
        keep = {entry["file"], entry["ids_file"], *([delta_entry["file"]] if delta_entry else [])}
        keep |= {name for seg in entry.get("rerank", []) for name in (seg["ids"], seg["vecs"])}
        collect_garbage(self.dir, space.key, keep)
        self._tokens[space.key] = manifest["token"]
        return state

    def _build(self, space: SpaceInfo, reason: str, warn: bool) -> SpaceIndex:
        """A new base from the whole catalog (first build, repair, retrain, optimize), or IndexUnavailable when
        auto_rebuild is off. Streams the catalog: memory holds the index, not a copy of every vector."""
        if not self.options.auto_rebuild:
            raise IndexUnavailable(f"index for {space.label} is not usable: {reason}; run `clipsearch reindex`")
        (log.warning if warn else log.info)("index for %s: %s; building it from the catalog", space.label, reason)
        t0, o = time.perf_counter(), self.options
        with writer_lock(self.dir, space.key):
            counted = self.catalog.space(space.id)  # generation read before streaming: later changes re-apply
            kind = choose_kind(counted.count, space.dim, o.exact_max, o.pq_min, o.pq_nlist_max)
            sample = self._sample(space, kind, counted.count)
            spent = {"sample": time.perf_counter() - t0}
            entry = build_base(self.dir, space.key, space.dim, kind, sample, self.catalog.iter_vectors(space.id),
                               counted.generation, spent)
            state = self._publish(counted, entry, None, Delta.empty(space.dim), counted.generation)
        self.stats.full_builds += 1
        self._loaded[space.key] = state
        log.info("built %s index for %s: %d vectors (generation %d) in %.1fs (%s)", state.kind, space.label,
                 state.count, state.generation, time.perf_counter() - t0,
                 ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()))
        return state

    def _sample(self, space: SpaceInfo, kind: Kind, count: int) -> np.ndarray | None:
        """A random training sample read by id (an ids-only scan, then point reads), not a pass over every vector."""
        n = sample_size(kind, count, self.options.train_per_list)
        if n == 0:
            return None
        ids = changes.vector_ids(self.catalog.engine, space.id)
        pick = np.sort(np.random.default_rng(0).choice(len(ids), size=min(n, len(ids)), replace=False))
        return changes.vectors_of(self.catalog.engine, space.id, ids[pick])

    def rebuild(self, space: SpaceInfo) -> IndexView:
        """Build the space's index from the catalog afresh (`clipsearch reindex`)."""
        return IndexView(self._build(self.catalog.space(space.id, with_count=False), "rebuild requested", False))

    def optimize(self, space: SpaceInfo) -> OptimizeReport:
        """Retrain the space's index for its current size, fold the delta in, compact the re-rank vectors, and
        forget removal records the new index no longer needs (`clipsearch optimize`).

        Pruning means an index elsewhere that covers an older generation (another home on a shared PostgreSQL
        catalog) is rebuilt on its next open rather than caught up."""
        t0 = time.perf_counter()
        state = self._build(self.catalog.space(space.id, with_count=False), "optimize requested", False)
        pruned = changes.prune(self.catalog.engine, space.id, state.generation)
        return OptimizeReport(state.kind, state.count, time.perf_counter() - t0, pruned)

    # --- reading -----------------------------------------------------------------------------------------------
    def count(self, space: SpaceInfo) -> int:
        """Vectors a query over this space searches (up to date with the catalog)."""
        return self._current(space).count

    def index_for(self, space: SpaceInfo) -> IndexView:
        """The up-to-date index of a space as queries see it (count, dim, type, ids)."""
        return IndexView(self._current(space))

    def search(self, space: SpaceInfo, queries: np.ndarray, k: int,
               allowed_ids: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (ids, scores) per query row, best first; `allowed_ids` restricts the search to those ids (filters)
        and still returns k hits when k allowed vectors exist."""
        state = self._current(space)
        k = int(min(k, state.count))
        if k <= 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(queries))]
        return state.search(queries, k, allowed_ids)

    def iter_vectors(self, space: SpaceInfo, batch: int = 65_536,
                     reuse: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, vectors) of a space from its memory-mapped index files: what tagging reads instead of the
        catalog. Up to date with the catalog (like a query). IVF-PQ spaces yield their float16 re-rank vectors
        as float32. With `reuse`, arrays are only valid until the next step (read-only use); else each chunk is
        the caller's own copy."""
        state = self._current(space)
        self._warm(space)
        yield from state.iter_vectors(batch, reuse)

    def _index_files(self, space: SpaceInfo) -> list[Path]:
        """The files a full stream of the space reads: the base file, or the IVF-PQ float16 vectors."""
        manifest = self.read_manifest(space)
        if not manifest or "base" not in manifest:
            return []
        segs = [self.dir / s["vecs"] for s in manifest["base"].get("rerank", [])]
        return segs or [self.dir / manifest["base"]["file"]]

    def prefetch(self, space: SpaceInfo) -> None:
        """Start reading the space's index files into the OS page cache on a background thread (a hint; never
        fails). Tagging calls this before encoding its labels, so a cold index comes off the disk meanwhile."""
        for path in self._index_files(space):
            thread = threading.Thread(target=read_through, args=(path,), name="index-prefetch", daemon=True)
            self._prefetching[str(path)] = thread
            thread.start()

    def _warm(self, space: SpaceInfo) -> None:
        """Have the index files in the page cache before streaming all of them: wait for a prefetch, else read."""
        for path in self._index_files(space):
            thread = self._prefetching.pop(str(path), None)
            if thread is not None:
                thread.join()
            else:
                read_through(path)
