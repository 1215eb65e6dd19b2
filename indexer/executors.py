"""Stage 2 of an indexing run, *embed*: decode and encode planned files through an Executor.

The Executor is the seam between one machine and a cluster: plan and commit never know which one ran. An
executor receives tasks (a path, and whether an already-embedded content hash may be reused instead of decoding)
and yields batches of results (decode metadata without pixels, plus a vector for each decoded photo). Each batch
becomes one catalog transaction in the commit stage. `LocalExecutor` is a process pool on this machine; a Ray Data
executor (indexer/ray_executor.py) runs the same decode code on a cluster.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest import gpu_decode
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.ingest.decode import DecodeResult, PreprocessSpec, decode_file
from clipsearch.indexer.ingest.gpu_decode import PendingJpeg, TensorJpegDecoder, probe_file, probe_task
from clipsearch.indexer.ingest.workers import decode_task, init_worker, sigint_held_off
from clipsearch.indexer.model.protocol import Encoder

log = logging.getLogger(__name__)

Decoded = DecodeResult | PendingJpeg  # a pending JPEG gets its pixels beside the model (gpu_decode)


@dataclass(frozen=True)
class EmbedTask:
    """One file to decode (and embed): `key` is the caller's handle for it."""

    key: int
    path: bytes
    allow_reuse: bool = True  # may answer "reuse" for a content hash that already has a vector


@dataclass(frozen=True)
class EmbedResult:
    """What the embed stage learnt about one file: decode metadata (no pixels) and its vector if it was decoded."""

    key: int
    decoded: DecodeResult
    vector: np.ndarray | None = None


@dataclass
class EmbedStats:
    """Seconds spent waiting for decodes and in the model (per-stage timing, summed over batches)."""

    decode_wait: float = 0.0
    embed: float = 0.0


@dataclass(frozen=True)
class EmbedContext:
    """What every executor needs to know, whatever runs it."""

    spec: str  # model spec (an executor on other machines builds its own encoder from it)
    preprocess: PreprocessSpec
    max_pixels: int
    reuse_hashes: frozenset[str]  # content hashes whose vectors can be reused (moves and duplicates)
    batch_size: int
    stats: EmbedStats = field(default_factory=EmbedStats)


class Executor(Protocol):
    """Runs the embed stage; yields result batches in any order (each batch one commit)."""

    def run(self, tasks: Sequence[EmbedTask], ctx: EmbedContext,
            encoder: Callable[[], Encoder]) -> Iterator[list[EmbedResult]]:
        """Decode and embed `tasks`; `encoder()` returns this process's encoder (loaded once)."""
        ...


class LocalExecutor:
    """A decode process pool on this machine feeding the in-process encoder.

    On an accelerator, decoding runs ahead of the model in a bounded window (the CPU decodes while the device
    embeds). When the model runs on the same CPU cores, overlapping only makes decode workers and the model's
    threads pre-empt each other, so the phases alternate instead: all workers decode one batch while the model
    is idle, then the model gets every core for that batch (measured as the best packing on shared cores).

    With the model on CUDA, JPEG pixels are decoded there too (`gpu_decode`: auto | on | off): the workers then
    only read, hash and check each file, and each batch's JPEGs are decoded on the device just before embedding.
    """

    def __init__(self, workers: int | None = None, progress: bool = False, gpu_decode: str = "auto") -> None:
        if gpu_decode not in _MODES:
            raise UsageError(f"--gpu-decode must be one of {', '.join(_MODES)} (got {gpu_decode!r})")
        self.workers, self.progress, self.gpu_decode = workers, progress, gpu_decode

    def run(self, tasks: Sequence[EmbedTask], ctx: EmbedContext,
            encoder: Callable[[], Encoder]) -> Iterator[list[EmbedResult]]:
        """Decode in worker processes, embed each batch in this process, yield one result list per batch."""
        enc = encoder()
        jpegs = _jpeg_decoder(enc, ctx, self.gpu_decode)
        batch: list[tuple[EmbedTask, Decoded]] = []
        for task, result in self._decoded(tasks, ctx, _on_accelerator(enc), jpegs is not None):
            if task is not None:
                batch.append((task, result))
            n_pixels = sum(_has_input(r) for _, r in batch)
            full = n_pixels >= ctx.batch_size or len(batch) >= 4 * ctx.batch_size
            if batch and (full or task is None):  # None: a decode phase ended
                yield _embed_batch(_with_pixels(batch, jpegs, ctx.stats), enc, ctx.stats)
                batch = []
        if batch:
            yield _embed_batch(_with_pixels(batch, jpegs, ctx.stats), enc, ctx.stats)

    def _decoded(self, tasks: Sequence[EmbedTask], ctx: EmbedContext, overlap: bool,
                 probe: bool = False) -> Iterator[tuple[EmbedTask, Decoded] | tuple[None, None]]:
        """Decode results in order (probe: JPEG pixels left pending); (None, None) ends a decode phase."""
        bar = _progress_bar(len(tasks)) if self.progress else None
        try:
            workers = self._worker_count(overlap)
            if workers <= 0 or len(tasks) < 2:
                decode = probe_file if probe else decode_file
                for task in tasks:
                    ts = time.perf_counter()
                    result = decode(task.path, ctx.preprocess, ctx.max_pixels, _reuse(task, ctx))
                    ctx.stats.decode_wait += time.perf_counter() - ts
                    yield task, result
                    bar and bar.update(1)
                return
            yield from self._pooled(tasks, ctx, workers, overlap, bar, probe_task if probe else decode_task)
        finally:
            if bar:
                bar.close()

    def _pooled(self, tasks: Sequence[EmbedTask], ctx: EmbedContext, workers: int, overlap: bool, bar: Any,
                work: Callable[[bytes, bool], Decoded]) -> Iterator[tuple[EmbedTask, Decoded] | tuple[None, None]]:
        window = max(4, ctx.batch_size * 3) if overlap else max(2, ctx.batch_size)
        with ProcessPoolExecutor(workers, mp.get_context("spawn"), init_worker,
                                 (ctx.preprocess, ctx.max_pixels, ctx.reuse_hashes)) as pool:
            pending: deque[tuple[EmbedTask, Future]] = deque()
            it = iter(tasks)

            def refill(n: int) -> None:
                for nxt in itertools.islice(it, n):
                    with sigint_held_off():  # a Ctrl-C while a worker starts must not break the pool
                        pending.append((nxt, pool.submit(work, nxt.path, nxt.allow_reuse)))

            refill(window)
            while pending:
                task, fut = pending.popleft()
                if overlap:
                    refill(1)
                ts = time.perf_counter()
                result = fut.result()
                ctx.stats.decode_wait += time.perf_counter() - ts
                yield task, result
                bar and bar.update(1)
                if not pending and not overlap:
                    yield None, None  # end of a decode phase: embed what it produced while workers are idle
                if not pending:
                    refill(window)

    def _worker_count(self, overlap: bool) -> int:
        """Decode processes: as set, else every core when phases alternate, cores - 1 beside an accelerator."""
        if self.workers is not None:
            return self.workers
        cores = usable_cores()
        return max(1, cores - 1) if overlap else cores


def _reuse(task: EmbedTask, ctx: EmbedContext) -> frozenset[str]:
    return ctx.reuse_hashes if task.allow_reuse else frozenset()


def _on_accelerator(encoder: Encoder) -> bool:
    return not str(getattr(encoder, "device", "cpu")).startswith("cpu")


_MODES = gpu_decode.GPU_DECODE_MODES


def _jpeg_decoder(encoder: Encoder, ctx: EmbedContext, mode: str) -> TensorJpegDecoder | None:
    """The decoder of JPEG pixels beside the model, or None when the workers decode everything (as on a CPU)."""
    device = gpu_decode.decode_device(mode, str(getattr(encoder, "device", "cpu")))
    if device is None:
        return None
    log.info("decoding JPEG pixels on %s, beside the model", device)
    return TensorJpegDecoder(device, ctx.preprocess, ctx.max_pixels)


def _has_input(result: Decoded) -> bool:
    """Whether a decode result will have pixels to embed (now, or once its pending JPEG is decoded)."""
    return isinstance(result, PendingJpeg) or result.pixels is not None


def _with_pixels(batch: list[tuple[EmbedTask, Decoded]], jpegs: TensorJpegDecoder | None,
                 stats: EmbedStats) -> list[tuple[EmbedTask, DecodeResult]]:
    """The batch with its pending JPEGs decoded on the device (their time counts as decode time). Only a run with
    a device decoder asks the workers to leave JPEGs pending."""
    pending = [r for _, r in batch if isinstance(r, PendingJpeg)]
    ts = time.perf_counter()
    decoded = iter(jpegs.decode(pending) if pending and jpegs is not None else [])
    if pending:
        stats.decode_wait += time.perf_counter() - ts
    return [(t, next(decoded) if isinstance(r, PendingJpeg) else r) for t, r in batch]


def _embed_batch(batch: list[tuple[EmbedTask, DecodeResult]], encoder: Encoder,
                 stats: EmbedStats) -> list[EmbedResult]:
    """Embed the decoded photos of a batch; results carry no pixels (they may cross a process boundary)."""
    with_pixels = [i for i, (_, r) in enumerate(batch) if r.pixels is not None]
    vectors: dict[int, np.ndarray] = {}
    if with_pixels:
        ts = time.perf_counter()
        vecs = encoder.encode_pixels(np.stack([batch[i][1].pixels for i in with_pixels]))
        stats.embed += time.perf_counter() - ts
        vectors = dict(zip(with_pixels, vecs, strict=True))
    return [EmbedResult(t.key, replace(r, pixels=None), vectors.get(i)) for i, (t, r) in enumerate(batch)]


def _progress_bar(total: int) -> Any:
    if total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing", dynamic_ncols=True, smoothing=0.1)
