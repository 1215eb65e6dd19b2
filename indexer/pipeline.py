"""An indexing run in three stages: plan → embed (through an Executor) → commit, then the vector store catches up.

* plan (indexer/plan.py): scan + diff against the catalog; no model is loaded, and an empty plan ends the run;
* embed (indexer/executors.py): decode + encode of the planned files, on this machine or a cluster;
* commit (indexer/commit.py): one catalog transaction per result batch, crash-safe: killing the process at any
  point loses at most the batches in flight, and a re-run picks up exactly what is missing.

A writer lock per library keeps two indexers apart; SIGTERM/SIGINT (through indexer/stop.py) end the run after
the batch in flight.

With `ocr=True` (`clipsearch index --ocr`) a fourth stage reads the text in the photos under the roots that have
none yet for their content: after the commit, in its own pool of worker processes (indexer/ingest/ocr.py,
`read_many`), never serially after the model in the embedding loop. OCR costs far more per photo than embedding
(bench/RESULTS.md, issue 17), so running it beside the decode workers would only slow the embedding down; as a
stage of its own it gets every core, it reads what was committed even when the embed stage is re-run, and a photo
whose OCR fails keeps its vector and gets a recorded reason (indexer/storage/ocr_store.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.indexer.commit import Committer, IndexReport
from clipsearch.indexer.config import IndexOptions
from clipsearch.indexer.executors import EmbedContext, EmbedTask, Executor, LocalExecutor
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.model.protocol import Encoder
from clipsearch.indexer.plan import Plan, PlanItem, check_roots, make_plan
from clipsearch.indexer.stop import stop_requested
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.store import VectorStore

if TYPE_CHECKING:
    from clipsearch.indexer.storage.ocr_store import OcrReport

log = logging.getLogger(__name__)

__all__ = ["IndexReport", "Indexer"]


class EncoderSource:
    """An encoder that is built only when the plan needs one; knows its model spec before that."""

    def __init__(self, spec: str, build: Callable[[], Encoder]) -> None:
        self.spec, self._build, self._encoder = spec, build, None

    @classmethod
    def of(cls, encoder: Encoder | EncoderSource) -> EncoderSource:
        """Wrap an already built encoder (tests, benchmarks) or pass a source through."""
        if isinstance(encoder, EncoderSource):
            return encoder
        src = cls(encoder.spec, lambda: encoder)
        src._encoder = encoder
        return src

    @property
    def loaded(self) -> Encoder | None:
        """The encoder if it was built already."""
        return self._encoder

    def get(self) -> Encoder:
        """The encoder, built on first use."""
        if self._encoder is None:
            self._encoder = self._build()
        return self._encoder


class Indexer:
    """Indexes photo roots into the catalog and the space's vector index. Parts are passed in (see build_indexer)."""

    def __init__(self, catalog: Catalog, store: VectorStore, encoder: Encoder | EncoderSource, home: Path,
                 options: IndexOptions = IndexOptions(), executor: Executor | None = None,
                 db_url: str | None = None) -> None:
        self.catalog, self.store, self.home, self.options = catalog, store, home, options
        self.encoder = EncoderSource.of(encoder)
        self.executor = executor or LocalExecutor(options.workers, options.progress, gpu_decode=options.gpu_decode)
        self.db_url = db_url
        self.last_ocr: OcrReport | None = None  # what the OCR stage of the last run with ocr=True did

    def run(self, roots: list[Path], on_progress: Callable[[int, int], Any] | None = None,
            ocr: bool = False) -> IndexReport:
        """Index `roots` incrementally. `on_progress(done, total)` is called after each batch (UI polling). With
        `ocr`, the text in the photos under the roots is read after the commit (`last_ocr` reports it); a missing
        OCR engine is a one-line UsageError before any work."""
        from clipsearch.indexer.lock import hold_writer_lock

        if ocr:
            from clipsearch.indexer.ingest.ocr import require_engine

            require_engine()
        self.last_ocr = None
        with hold_writer_lock(self.home, self.db_url):
            report = self._run(roots, on_progress)
            if ocr and not report.interrupted:
                self.last_ocr = self._read_text(roots, report)
            return report

    def _read_text(self, roots: list[Path], report: IndexReport) -> OcrReport:
        """The OCR stage: photos under the roots without text for their content, in `workers` processes (all
        cores by default; 0 reads in this process); each part is stored as it comes, and a stop request ends the
        stage after the part in flight (a re-run reads the rest)."""
        from clipsearch.indexer.storage.ocr_store import OcrStore, read_and_store

        ts = time.perf_counter()
        under = [os.fsencode(str(r)) for r in check_roots(roots, self.home)]
        todo = OcrStore(self.catalog).photos_needing(under=under)
        workers = usable_cores() if self.options.workers is None else self.options.workers
        bar = _ocr_bar(len(todo)) if self.options.progress and todo else None
        try:
            done = read_and_store(self.catalog, todo, workers, on_progress=bar and (lambda d, t: bar.update(d - bar.n)),
                                  should_stop=stop_requested)
        finally:
            if bar is not None:
                bar.close()
        report.stage_seconds["ocr"] = time.perf_counter() - ts
        report.interrupted = report.interrupted or done.interrupted
        return done

    def _run(self, roots: list[Path], on_progress: Callable[[int, int], Any] | None) -> IndexReport:
        t0 = time.perf_counter()
        report = IndexReport()
        space_id = self._known_space_id()
        plan = make_plan(self.catalog, roots, self.home, space_id, self.options.follow_symlinks)
        if plan.needs_model():
            encoder = self.encoder.get()  # the model loads only now, and only when something needs embedding
            s = encoder.space
            true_id = self.catalog.ensure_space(s.key, s.label, encoder.spec, s.dim)
            if true_id != space_id:  # first run of this model, or its weights changed: diff against its space
                space_id = true_id
                plan = make_plan(self.catalog, roots, self.home, space_id, self.options.follow_symlinks)
        report.stage_seconds["plan"] = time.perf_counter() - t0
        report.scanned, report.unchanged = plan.scanned, plan.unchanged
        report.skipped_dirs, report.skipped_by_ext = plan.skipped_dirs, plan.skipped_by_ext
        self._remember_skipped(plan)
        if space_id is not None:
            self._embed_and_commit(plan, space_id, report, on_progress)
        elif plan.vanished:  # nothing to embed and no space yet: only removals
            Committer(self.catalog, None, plan, report).purge_vanished(self.options.force, self.options.vanish_ratio)
        if on_progress:
            on_progress(len(plan.todo), len(plan.todo))
        if space_id is not None and not report.interrupted:
            ts = time.perf_counter()
            self.store.sync(self.catalog.space(space_id))
            report.stage_seconds["index"] = time.perf_counter() - ts
        report.seconds = time.perf_counter() - t0
        return report

    def _known_space_id(self) -> int | None:
        """The space of this model spec as the catalog knows it (no model load); None when it has none yet."""
        enc = self.encoder.loaded
        if enc is not None:
            s = enc.space
            return self.catalog.ensure_space(s.key, s.label, enc.spec, s.dim)
        mine = [s for s in self.catalog.spaces() if s.model_spec == self.encoder.spec]
        return max(mine, key=lambda s: s.id).id if mine else None

    def _embed_and_commit(self, plan: Plan, space_id: int, report: IndexReport,
                          on_progress: Callable[[int, int], Any] | None) -> None:
        committer = Committer(self.catalog, space_id, plan, report)
        items: list[PlanItem] = list(plan.todo)
        tasks = [EmbedTask(i, it.file.path, allow_reuse=it.add_space_to is None) for i, it in enumerate(items)]
        done, total = 0, len(tasks)
        while tasks and not report.interrupted:
            redo: list[PlanItem] = []
            ctx = self._context(committer)
            batches = self.executor.run(tasks, ctx, self.encoder.get)
            try:
                for results in batches:
                    ts = time.perf_counter()
                    redo += committer.commit(items, results)
                    report.stage_seconds["write"] += time.perf_counter() - ts
                    done += len(results)
                    if on_progress:
                        on_progress(min(done, total), total)
                    if stop_requested():
                        report.interrupted = True
                        log.warning("stop requested: ended after a committed batch; re-run to resume")
                        break
            finally:
                close = getattr(batches, "close", None)
                if close:
                    close()  # ends the executor's workers now, not when the generator is collected
            report.stage_seconds["decode_wait"] += ctx.stats.decode_wait
            report.stage_seconds["embed"] += ctx.stats.embed
            start = len(items)
            items += redo  # second pass: decode for real what could not reuse a vector after all
            tasks = [EmbedTask(start + i, it.file.path, allow_reuse=False) for i, it in enumerate(redo)]
        if not report.interrupted:
            committer.purge_vanished(self.options.force, self.options.vanish_ratio)

    def _context(self, committer: Committer) -> EmbedContext:
        enc = self.encoder.get()
        return EmbedContext(spec=self.encoder.spec, preprocess=enc.preprocess_spec, max_pixels=self.options.max_pixels,
                            reuse_hashes=committer.reuse_hashes(), batch_size=self.options.batch_size)

    def _remember_skipped(self, plan: Plan) -> None:
        """Files never read (not a photo extension), by extension, for `clipsearch status`."""
        self.catalog.set_meta("skipped_extensions", json.dumps(dict(plan.skipped_by_ext), sort_keys=True))


def _ocr_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="reading text", dynamic_ncols=True, smoothing=0.1)
