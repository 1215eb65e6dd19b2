"""The indexing pipeline: scan → decode (worker processes) → embed (batches) → write (one transaction per batch).

Decoding runs ahead of embedding in a bounded window of futures, so the model never waits for a decode it could
have had and memory stays bounded. Every batch commits photos and vectors together; killing the process at any
point loses at most the batch in flight, and a re-run picks up exactly what is missing.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.config import IndexOptions
from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.ingest.decode import STATUS_REUSE, DecodeResult, decode_file
from clipsearch.indexer.ingest.scan import SAMPLE_DIR_NAME, FoundFile, _is_within, scan
from clipsearch.indexer.ingest.workers import decode_task, init_worker
from clipsearch.indexer.model.protocol import Encoder
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog, KnownFile, PhotoRecord
from clipsearch.indexer.storage.store import VectorStore

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What a run did; the CLI prints it and `--json` serialises it."""

    scanned: int = 0
    indexed: int = 0  # newly embedded
    unchanged: int = 0
    moved: int = 0  # same content at a new path: kept its id, vectors and tags
    reused: int = 0  # duplicate content: vectors copied, not recomputed
    removed: int = 0
    missing_kept: int = 0  # vanished files not removed because too many vanished at once
    failed: Counter = field(default_factory=Counter)  # "status: reason" -> count
    skipped_dirs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"scan": 0.0, "decode_wait": 0.0,
                                                                      "embed": 0.0, "write": 0.0, "index": 0.0})

    @property
    def images_per_second(self) -> float:
        """Embedded images per wall-clock second of the whole run."""
        return self.indexed / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "scanned": self.scanned, "indexed": self.indexed, "unchanged": self.unchanged, "moved": self.moved,
            "reused": self.reused, "removed": self.removed, "missing_kept": self.missing_kept,
            "failed": dict(self.failed), "skipped_dirs": self.skipped_dirs, "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


@dataclass(frozen=True)
class _Todo:
    file: FoundFile
    existing_id: int | None  # row to update in place (a changed file)
    add_space_to: int | None = None  # unchanged photo that only lacks this space's vector (a model change)


class Indexer:
    """Indexes photo roots into the catalog and the space's vector index. Parts are passed in (see build_indexer)."""

    def __init__(self, catalog: Catalog, store: VectorStore, encoder: Encoder, home: Path,
                 options: IndexOptions = IndexOptions()) -> None:
        self.catalog, self.store, self.encoder, self.home, self.options = catalog, store, encoder, home, options

    def run(self, roots: list[Path], on_progress: Any = None) -> IndexReport:
        """Index `roots` incrementally. `on_progress(done, total)` is called after each batch (UI polling)."""
        t0 = time.perf_counter()
        report = IndexReport()
        roots = self._check_roots(roots)
        space = self.encoder.space
        space_id = self.catalog.ensure_space(space.key, space.label, self.encoder.spec, space.dim)

        ts = time.perf_counter()
        found = scan(roots, self.home, self.options.follow_symlinks)
        report.skipped_dirs = [f"{os.fsdecode(p)}: {r}" for p, r in found.skipped]
        known = self.catalog.known_files()
        embedded = self.catalog.embedded_ids(space_id)
        todo, report.unchanged = self._classify(found.files, known, embedded)
        report.scanned = len(found.files)
        root_bytes = [os.fsencode(str(r)) for r in roots]
        seen = {f.path for f in found.files}
        vanished = {p: k for p, k in known.items() if p not in seen and any(_is_within(p, r) for r in root_bytes)}
        vanished_by_hash = {k.content_hash: k for k in vanished.values() if k.content_hash and k.status == PhotoStatus.INDEXED}
        vec_by_hash = self.catalog.hashes_with_vectors(space_id)
        report.stage_seconds["scan"] = time.perf_counter() - ts

        claimed: set[int] = set()
        batch = _Batch()
        restore_threads = self.encoder.limit_threads(self._model_threads(len(todo)))
        try:
            done = 0
            for item, result in self._decoded(todo, frozenset(vanished_by_hash) | frozenset(vec_by_hash), report):
                if item is not None:
                    self._absorb(item, result, batch, report, vanished_by_hash, vec_by_hash, claimed, embedded)
                    done += 1
                full = len(batch.pixels) >= self.options.batch_size or len(batch.records) >= 4 * self.options.batch_size
                if (full or item is None) and not batch.empty():  # None: a decode phase ended (see _decoded)
                    self._flush(batch, space_id, report)
                    if on_progress:
                        on_progress(done, len(todo))
            self._flush(batch, space_id, report)
        finally:
            restore_threads()
        if on_progress:
            on_progress(len(todo), len(todo))

        self._purge([k.id for k in vanished.values() if k.id not in claimed], len(known), report)
        ts = time.perf_counter()
        self.store.sync(self.catalog.space(space_id))
        report.stage_seconds["index"] = time.perf_counter() - ts
        report.seconds = time.perf_counter() - t0
        return report

    def _model_threads(self, n_todo: int) -> int | None:
        """Model threads while decoding (None: torch's default; limiting them measured no gain on 2 cores)."""
        return self.options.torch_threads if n_todo else None

    # --- steps -------------------------------------------------------------------------------------------------
    def _check_roots(self, roots: list[Path]) -> list[Path]:
        out = []
        home = os.path.realpath(self.home)
        for r in roots:
            if not os.path.isdir(r):
                raise UsageError(f"not a folder: {r}")
            real = os.path.realpath(r)
            sample = os.path.join(home, SAMPLE_DIR_NAME)
            inside = real == home or real.startswith(home.rstrip(os.sep) + os.sep)
            if inside and not (real == sample or real.startswith(sample + os.sep)):
                raise UsageError(f"{r} is inside clipsearch's own data dir ({self.home}); index your photos instead")
            out.append(Path(os.path.abspath(r)))
        return out

    @staticmethod
    def _classify(files: list[FoundFile], known: dict[bytes, KnownFile], embedded: set[int]) -> tuple[list[_Todo], int]:
        todo, unchanged = [], 0
        for f in files:
            k = known.get(f.path)
            if k is None:
                todo.append(_Todo(f, None))
            elif k.size != f.size or k.mtime_ns != f.mtime_ns:
                todo.append(_Todo(f, k.id))
            elif k.status == PhotoStatus.INDEXED and k.id not in embedded:
                todo.append(_Todo(f, None, add_space_to=k.id))  # model change: keep row, tags, other vectors
            else:
                unchanged += 1
        return todo, unchanged

    def _decoded(self, todo: list[_Todo], reuse: frozenset[str],
                 report: IndexReport) -> Iterator[tuple[_Todo, DecodeResult] | tuple[None, None]]:
        """Decode results in order, from worker processes.

        On an accelerator, decoding runs ahead of the model in a bounded window (the CPU decodes while the device
        embeds). When the model runs on the same CPU cores, overlapping only makes decode workers and the
        model's threads pre-empt each other (one descheduled thread stalls a whole parallel op), so the phases
        alternate instead: all workers decode one batch while the model is idle, then the model gets every
        core for that batch. That is the best packing of the two kinds of work on shared cores. The end of each
        decode phase is yielded as (None, None) so that the consumer embeds then, even if some files failed.
        """
        spec, max_px = self.encoder.preprocess_spec, self.options.max_pixels
        bar = self._progress_bar(len(todo))
        try:
            workers = self._workers()
            if workers <= 0 or len(todo) < 2:
                for item in todo:
                    ts = time.perf_counter()
                    result = decode_file(item.file.path, spec, max_px, reuse)
                    report.stage_seconds["decode_wait"] += time.perf_counter() - ts
                    yield item, result
                    bar and bar.update(1)
                return
            overlap = self._model_on_accelerator()
            window = max(4, self.options.batch_size * 3) if overlap else max(2, self.options.batch_size)
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(workers, ctx, init_worker, (spec, max_px, reuse)) as pool:
                pending: deque[tuple[_Todo, Future]] = deque()
                it = iter(todo)

                def refill(n: int) -> None:
                    for nxt in itertools.islice(it, n):
                        pending.append((nxt, pool.submit(decode_task, nxt.file.path)))

                refill(window)
                while pending:
                    item, fut = pending.popleft()
                    if overlap:
                        refill(1)
                    ts = time.perf_counter()
                    result = fut.result()
                    report.stage_seconds["decode_wait"] += time.perf_counter() - ts
                    yield item, result  # the consumer embeds here when a batch is full
                    bar and bar.update(1)
                    if not pending and not overlap:
                        yield None, None  # end of a decode phase: embed what it produced while workers are idle
                    if not pending:
                        refill(window)
        finally:
            if bar:
                bar.close()

    def _model_on_accelerator(self) -> bool:
        return not str(getattr(self.encoder, "device", "cpu")).startswith("cpu")

    def _workers(self) -> int:
        """Decode processes: as set, else every core when phases alternate, cores - 1 beside an accelerator."""
        if self.options.workers is not None:
            return self.options.workers
        cores = usable_cores()
        return max(1, cores - 1) if self._model_on_accelerator() else cores

    def _progress_bar(self, total: int) -> Any:
        if not self.options.progress or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="indexing", dynamic_ncols=True, smoothing=0.1)

    def _absorb(self, item: _Todo, r: DecodeResult, batch: _Batch, report: IndexReport,
                vanished_by_hash: dict[str, KnownFile], vec_by_hash: dict[str, int], claimed: set[int],
                embedded: set[int]) -> None:
        """Turn one decode result into catalog work: a new vector, a move, a copy, or a status row."""
        f = item.file
        if item.add_space_to is not None:
            if r.status == STATUS_REUSE:
                r = decode_file(f.path, self.encoder.preprocess_spec, self.options.max_pixels)
            if r.pixels is None:
                report.failed[f"{r.status}: {r.reason}"] += 1
                return
            batch.add_pixels(r.pixels, photo_id=item.add_space_to)
            report.indexed += 1
            return
        if r.status == STATUS_REUSE:
            moved = vanished_by_hash.get(r.content_hash or "")
            src = vec_by_hash.get(r.content_hash or "")
            if item.existing_id is None and moved is not None and moved.id not in claimed:
                claimed.add(moved.id)
                batch.moves.append((moved.id, f.path, f.size, f.mtime_ns))
                report.moved += 1
                if moved.id in embedded:
                    return
                r = decode_file(f.path, self.encoder.preprocess_spec, self.options.max_pixels)  # moved + new model
                if r.pixels is not None:
                    batch.add_pixels(r.pixels, photo_id=moved.id)
                    report.indexed += 1
                return
            if item.existing_id is None and src is not None:
                batch.copies.append((src, f.path, f.size, f.mtime_ns))
                report.reused += 1
                return
            r = decode_file(f.path, self.encoder.preprocess_spec, self.options.max_pixels)  # nothing to reuse
        rec = PhotoRecord(f.path, f.size, f.mtime_ns, r.status, r.reason, r.content_hash, r.width, r.height,
                          r.taken_at, r.camera_make, r.camera_model, r.format, item.existing_id)
        if r.status == PhotoStatus.INDEXED and r.pixels is not None:
            batch.add_pixels(r.pixels, record_index=len(batch.records))
            report.indexed += 1
        else:
            report.failed[f"{r.status}: {r.reason}"] += 1
        batch.records.append(rec)

    def _flush(self, batch: _Batch, space_id: int, report: IndexReport) -> None:
        if batch.empty():
            return
        ts = time.perf_counter()
        vecs = self.encoder.encode_pixels(np.stack(batch.pixels)) if batch.pixels else np.zeros((0, 0), np.float32)
        report.stage_seconds["embed"] += time.perf_counter() - ts
        ts = time.perf_counter()
        by_row = {t: v for (kind, t), v in zip(batch.targets, vecs, strict=True) if kind == "row"}
        by_id = {t: v for (kind, t), v in zip(batch.targets, vecs, strict=True) if kind == "photo"}
        self.catalog.write_batch(space_id, batch.records, by_row, moves=batch.moves,
                                 copies=self._copy_records(batch.copies), extra_vectors=by_id)
        report.stage_seconds["write"] += time.perf_counter() - ts
        batch.clear()

    def _copy_records(self, copies: list[tuple[int, bytes, int, int]]) -> list[tuple[int, PhotoRecord]]:
        if not copies:
            return []
        rows = self.catalog.photos_by_id([c[0] for c in copies])
        out = []
        for src, path, size, mtime_ns in copies:
            s = rows[src]
            out.append((src, PhotoRecord(path, size, mtime_ns, PhotoStatus.INDEXED, None, s["content_hash"], s["width"],
                                         s["height"], s["taken_at"], s["camera_make"], s["camera_model"],
                                         s["format"])))
        return out

    def _purge(self, ids: list[int], known_total: int, report: IndexReport) -> None:
        if not ids:
            return
        if not self.options.force and len(ids) > self.options.vanish_ratio * max(known_total, 1):
            report.missing_kept = len(ids)
            log.warning("%d of %d catalogued files are missing (unmounted disk?): not removing them; "
                        "re-run with --force to remove them", len(ids), known_total)
            return
        report.removed = self.catalog.remove_photos(ids)


@dataclass
class _Batch:
    records: list[PhotoRecord] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    targets: list[tuple[str, int]] = field(default_factory=list)  # per pixels entry: ("row", i) or ("photo", id)
    moves: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    copies: list[tuple[int, bytes, int, int]] = field(default_factory=list)

    def add_pixels(self, pixels: np.ndarray, record_index: int | None = None, photo_id: int | None = None) -> None:
        """Queue an image for embedding; its vector goes to records[record_index] or to an existing photo."""
        self.pixels.append(pixels)
        self.targets.append(("row", record_index) if record_index is not None else ("photo", int(photo_id or 0)))

    def empty(self) -> bool:
        return not (self.records or self.moves or self.copies)

    def clear(self) -> None:
        for part in (self.records, self.pixels, self.targets, self.moves, self.copies):
            part.clear()
