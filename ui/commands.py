"""Library commands: index, status, reindex, optimize. Each reads its arguments, calls one service, prints text or
`--json`.

`status_data` lives in ui/status.py; it is re-exported here for callers that imported it from this module.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from clipsearch.indexer.config import AppConfig, IndexOptions

from .commands_common import config_from, int_range, non_negative, out, positive
from .registry import command
from .status import status_data, status_lines

__all__ = ["status_data"]

MIN_PIXELS = 1_000_000
_DEFAULTS = IndexOptions()
_pixels = int_range(MIN_PIXELS)


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="photo folders (read, never written)")
    p.add_argument("--batch-size", type=positive, default=_DEFAULTS.batch_size, metavar="N",
                   help="images per embedding batch and per catalog transaction")
    p.add_argument("--workers", type=non_negative, default=None, metavar="N",
                   help="decode worker processes; 0 decodes in this process (default: all cores; cores - 1 with a GPU)")
    p.add_argument("--force", action="store_true", help="remove vanished files even if most of the library vanished")
    p.add_argument("--follow-symlinks", action="store_true", help="follow symbolic links to folders and files")
    p.add_argument("--max-pixels", type=_pixels, default=_DEFAULTS.max_pixels, metavar="N",
                   help=f"decompression-bomb limit in pixels, width x height (default: {_DEFAULTS.max_pixels:,}); at "
                        f"least {MIN_PIXELS:,}, because a lower limit would mark ordinary photos as failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress-file", type=Path, metavar="FILE",
                   help="keep {done,total} JSON here (default: HOME/index-progress.json, which the UI polls)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where the embed stage runs: this machine's process pool, or a Ray cluster "
                        "(pip install 'clipsearch[ray]'; see docs/scale.md)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local Ray instance)")
    p.add_argument("--gpus-per-worker", type=_fraction_or_more, default=None, metavar="G",
                   help="GPUs per Ray encode worker (default: 1 when the cluster has GPUs)")
    p.add_argument("--gpu-decode", choices=["auto", "on", "off"], default=_DEFAULTS.gpu_decode,
                   help="decode JPEG pixels on the GPU when the model runs on CUDA (auto; on: fail rather than fall "
                        "back to the CPU; off: always the CPU)")
    p.add_argument("--ocr", action="store_true",
                   help="also read the text in the photos (signs, receipts, screenshots) for text:\"...\" queries, "
                        "after the commit in --workers processes (pip install 'clipsearch[ocr]')")


@command("index", "index photo folders (incremental: new, changed, moved and removed files)", arguments=_index_args,
         graceful_stop=True,
         examples=("clipsearch index ~/Pictures",
                   "clipsearch index ~/Pictures /mnt/photos --model demo --workers 2",
                   "clipsearch --home ~/trip-library index ~/Pictures/2024-trip --ocr --json"))
def cmd_index(args: argparse.Namespace) -> int:
    """Index folders and print the run summary; a stop request (SIGTERM/SIGINT) ends it after a committed batch."""
    from clipsearch.indexer.app import build_indexer

    if args.gpu_decode == "on":  # before any work: no GPU decoder here is one line, not a failure mid-run
        from clipsearch.indexer.ingest.gpu_decode import decode_device

        decode_device("on", config_from(args).device or "cuda")
    if args.ocr:  # before any work: a missing extra is one line naming it
        from clipsearch.indexer.ingest.ocr import require_engine

        require_engine()
    opts = IndexOptions(batch_size=args.batch_size, workers=args.workers, force=args.force,
                        max_pixels=args.max_pixels, follow_symlinks=args.follow_symlinks, gpu_decode=args.gpu_decode,
                        progress=not (args.no_progress or args.json))
    config = config_from(args)
    progress = args.progress_file or config.home / "index-progress.json"
    executor = _ray_executor(args, config, opts) if args.engine == "ray" else None
    try:
        indexer = build_indexer(config, opts, executor)
        report = indexer.run(args.paths, on_progress=_progress_writer(progress), ocr=args.ocr)
    finally:
        if executor is not None:
            executor.close()
    _warm_vocabulary(config, indexer)
    lines = [f"indexed {report.indexed}, unchanged {report.unchanged}, moved {report.moved}, "
             f"reused {report.reused}, removed {report.removed}, failed {sum(report.failed.values())} "
             f"in {report.seconds:.1f}s ({report.images_per_second:.1f} images/s)"]
    lines += [f"  {n:5d} x {reason}" for reason, n in report.failed.most_common()]
    lines += [f"  skipped {d}" for d in report.skipped_dirs]
    if report.skipped_by_ext:
        lines.append(f"  not read (not a photo type): {sum(report.skipped_by_ext.values())} files, "
                     + ", ".join(f"{ext or '(none)'} {n}" for ext, n in report.skipped_by_ext.most_common()))
    if report.decoder_warnings:
        lines.append(f"  {report.decoder_warnings} decoder warnings in {report.files_with_warnings} files "
                     "(details with -v in the log)")
    if report.missing_kept:
        lines.append(f"  {report.missing_kept} catalogued files are missing and were NOT removed (most of the "
                     "library vanished at once: unmounted disk?); re-run with --force to remove them")
    data = report.as_dict()
    if indexer.last_ocr is not None:
        data["ocr"] = indexer.last_ocr.as_dict()
        lines.append(f"  {indexer.last_ocr.summary()}")
    if report.interrupted:
        lines.append("  stopped on request after a committed batch; re-run to resume")
    out(args, data, "\n".join(lines))
    return 130 if report.interrupted else 0


def _fraction_or_more(value: str) -> float:
    """A GPU share for --gpus-per-worker: a number > 0 (0.5 lets two workers share a GPU)."""
    try:
        g = float(value)
    except ValueError:
        g = float("nan")
    if not g > 0:
        raise argparse.ArgumentTypeError(f"expects a number of GPUs > 0, got '{value}'")
    return g


def _warm_vocabulary(config: AppConfig, indexer: object) -> None:
    """With the model loaded anyway (something was embedded here), embed its reference vocabulary into the shared
    label cache, so that the first query does not (search/relevance.py warm_vocabulary)."""
    encoder = indexer.encoder.loaded  # type: ignore[attr-defined]
    if encoder is None:
        return
    from clipsearch.indexer.model.onnx_cache import labels_root
    from clipsearch.search.relevance import warm_vocabulary

    warm_vocabulary(encoder, labels_root(config.model_cache))


def _ray_executor(args: argparse.Namespace, config: AppConfig, opts: IndexOptions):  # -> RayExecutor
    """The Ray engine for the embed stage, connected before any work starts (a bad --address fails here)."""
    from clipsearch.indexer.ray_executor import RayExecutor

    executor = RayExecutor(address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           backend=config.backend, model_cache=config.model_cache, progress=opts.progress,
                           gpu_decode=opts.gpu_decode)
    executor.connect()
    return executor


def _progress_writer(path: Path | None) -> Callable[[int, int], None] | None:
    """A callback that atomically rewrites {done, total} to `path` (None: no callback)."""
    if path is None:
        return None

    def write(done: int, total: int) -> None:
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"done": done, "total": total}, f)
            os.replace(tmp, path)
        except OSError:  # progress is a courtesy to the UI: a read-only home must not stop the run
            pass

    write(0, 0)
    return write


@command("status", "counts by status, failures, skipped file types, embedding spaces, paths (no model loaded)",
         examples=("clipsearch status", "clipsearch --home ~/trip-library status --json"))
def cmd_status(args: argparse.Namespace) -> int:
    """Print counts by status, failures, skipped extensions and spaces."""
    d = status_data(config_from(args))
    out(args, d, "\n".join(status_lines(d)))
    return 0


@command("reindex", "rebuild the vector indexes from the catalog (after a lost or damaged index file)",
         examples=("clipsearch reindex", "clipsearch reindex --home ~/trip-library --json"))
def cmd_reindex(args: argparse.Namespace) -> int:
    """Rebuild every space's vector index from the catalog (a writer: it holds the library's writer lock)."""
    from clipsearch.indexer.app import open_parts
    from clipsearch.indexer.lock import hold_writer_lock

    config = config_from(args)
    parts = open_parts(config)
    done = []
    with hold_writer_lock(config.home, config.db_url):
        for s in parts.catalog.spaces():
            parts.store.rebuild(s)
            done.append({"space": s.label, "vectors": parts.catalog.space(s.id).count})
    out(args, done, "\n".join(f"rebuilt {d['space']}: {d['vectors']} vectors" for d in done) or "no spaces yet")
    return 0


@command("optimize", "retrain each vector index for its current size and fold in the pending changes",
         examples=("clipsearch optimize", "clipsearch optimize --json"))
def cmd_optimize(args: argparse.Namespace) -> int:
    """Retrain every space's index for its size class and compact it (a writer: it holds the writer lock).

    Adds and removals are applied in place and an index is only retrained when it has grown 4x or changed size
    class; `optimize` does it now, e.g. after a large import, and prunes removal records no index needs."""
    from clipsearch.indexer.app import open_parts
    from clipsearch.indexer.lock import hold_writer_lock

    config = config_from(args)
    parts = open_parts(config)
    done = []
    with hold_writer_lock(config.home, config.db_url):
        for s in parts.catalog.spaces():
            r = parts.store.optimize(s)
            done.append({"space": s.label, "index_type": r.index_type, "vectors": r.vectors,
                         "seconds": round(r.seconds, 3), "pruned_removals": r.pruned_removals})
    out(args, done, "\n".join(f"optimized {d['space']}: {d['index_type']}, {d['vectors']} vectors in "
                              f"{d['seconds']:.2f}s" for d in done) or "no spaces yet")
    return 0
