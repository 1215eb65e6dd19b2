"""Text in photos (OCR), offline: RapidOCR (PP-OCR detection + recognition on ONNX Runtime, models inside the
`rapidocr-onnxruntime` wheel). Opt-in: nothing here is imported unless OCR is asked for.

A photo whose OCR fails keeps everything else (its CLIP vector was written by the indexer); the failure is a
result with a status and a reason, never an exception out of `read_file`. Photos are read through the same safe
decoder as indexing (EXIF orientation, bomb limit) and reduced to `max_side` first: text small enough to vanish
there is too small to matter for search, and the cost of detection grows with the pixel count.

Many photos are read by `read_many`: in spawned worker processes, one engine (one ONNX thread) per worker, a few
photos per task. OCR costs far more per photo than embedding (bench/RESULTS.md, issue 17), so it never runs serially
after the model: `clipsearch index --ocr` runs this pool as its own stage once the run's photos are committed, and
`clipsearch ocr` runs it over the whole library. A worker that dies (out of memory, a native crash) costs the
photos of its task a `failed` result with that reason; the pass goes on in a fresh pool.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import open_image

ENGINE = "rapidocr-onnxruntime"
INSTALL_HINT = "OCR needs the rapidocr-onnxruntime package: pip install 'clipsearch[ocr]'"


@dataclass(frozen=True)
class OcrLine:
    """One recognised line: its text, the engine's confidence and its box (x, y, w, h) in the read image."""

    text: str
    score: float
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class OcrResult:
    """What OCR found in one photo. status: ok (text may be empty: no text found) | failed | timeout."""

    status: str
    lines: tuple[OcrLine, ...] = ()
    reason: str | None = None
    seconds: float = 0.0
    scale: float = 1.0  # read-image pixels per original pixel (boxes / scale = original coordinates)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """All lines, one per line, in reading order (top to bottom, then left to right)."""
        return "\n".join(line.text for line in self.lines)


def available() -> bool:
    """Whether the OCR engine is installed (checked without importing it)."""
    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


def require_engine() -> None:
    """A one-line UsageError naming the extra to install, before any work, when the engine is missing."""
    if not available():
        raise UsageError(INSTALL_HINT)


class OcrEngine:
    """RapidOCR behind one method; the ONNX sessions load on first use (about a second), once per process."""

    def __init__(self, min_score: float = 0.5, max_side: int = 1600, timeout_s: float = 30.0,
                 threads: int | None = None) -> None:
        if not available():
            raise UsageError(INSTALL_HINT)
        self.min_score, self.max_side, self.timeout_s, self.threads = min_score, max_side, timeout_s, threads
        self._engine: Any = None

    def _load(self) -> Any:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            kwargs = {"intra_op_num_threads": self.threads} if self.threads else {}
            self._engine = RapidOCR(**kwargs)
        return self._engine

    def read_image(self, im: Image.Image) -> OcrResult:
        """OCR an upright image. Never raises on a bad image: the result says why."""
        t0 = time.perf_counter()
        scale = min(1.0, self.max_side / max(im.size))
        if scale < 1.0:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.BILINEAR)
        try:
            found, _ = self._load()(np.asarray(im.convert("RGB")))
        except Exception as e:  # noqa: BLE001 - an engine error costs this photo's text, not the run
            return OcrResult("failed", reason=f"OCR engine error: {type(e).__name__}: {e}",
                             seconds=time.perf_counter() - t0, scale=scale)
        lines = []
        for quad, text, score in found or []:
            xs, ys = [p[0] for p in quad], [p[1] for p in quad]
            if float(score) >= self.min_score and str(text).strip():
                box = (int(min(xs)), int(min(ys)), int(max(xs) - min(xs)), int(max(ys) - min(ys)))
                lines.append(OcrLine(str(text).strip(), float(score), box))
        lines.sort(key=lambda ln: (ln.box[1] // 20, ln.box[0]))
        took = time.perf_counter() - t0
        if took > self.timeout_s:  # the text is kept; the status tells that this photo is unusually slow
            return OcrResult("timeout", tuple(lines), f"OCR took {took:.0f} s (limit {self.timeout_s:.0f} s)",
                             took, scale)
        return OcrResult("ok", tuple(lines), None, took, scale)

    def read_bytes(self, data: bytes, max_pixels: int = 100_000_000) -> OcrResult:
        """OCR an image file's bytes through the safe decoder; a file that does not decode is a failed result."""
        try:
            im, _ = open_image(data, max_pixels, draft_to=self.max_side)
        except ValueError as e:
            return OcrResult("failed", reason=f"cannot decode: {getattr(e, 'reason', e)}")
        return self.read_image(im)

    def read_file(self, path: str | bytes, max_pixels: int = 100_000_000) -> OcrResult:
        """OCR an image file; an unreadable one is a failed result with the OS reason."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return OcrResult("failed", reason=f"unreadable: {e.strerror or e}")
        return self.read_bytes(data, max_pixels)


# --- many photos: a pool of worker processes ---------------------------------------------------------------------
_POOL: dict[str, OcrEngine] = {}
WORKER_DIED = "the OCR worker process died while reading it (out of memory?); retry with clipsearch ocr --retry-failed"
# A worker gets this long per photo of a task, beyond which it is taken as hung (an engine stuck on one image, a
# read from a stalled network mount) and killed: `timeout_s` (the soft limit: such a photo keeps its text and is
# marked) three times over, plus time for the worker's start and the engine's first load.
HARD_FACTOR, HARD_SLACK_S = 3.0, 20.0


def _init_pool_worker(options: dict[str, Any]) -> None:
    """Per worker: die with the parent, leave Ctrl-C to it (as the decode workers do), one engine."""
    from clipsearch.indexer.ingest.workers import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _POOL["engine"] = OcrEngine(**options)


def _read_task(items: list[tuple[int, bytes]]) -> dict[int, OcrResult]:
    engine = _POOL["engine"]
    return {pid: engine.read_file(path) for pid, path in items}


def read_many(items: Sequence[tuple[int, bytes]], workers: int = 1, chunk: int = 8, engine: OcrEngine | None = None,
              hard_limit_s: float | None = None, **options: Any) -> Iterator[dict[int, OcrResult]]:
    """OCR (photo id, raw path) pairs; yields {id: result} a task at a time, so that a caller can store each part
    as it comes (an interrupted pass keeps its work). `workers` <= 1 reads in this process (with `engine` when
    given); otherwise spawned workers each build an engine from `options` (one ONNX thread unless `threads` says
    otherwise), and a task still running after `hard_limit_s` per photo (default: HARD_FACTOR x timeout_s +
    HARD_SLACK_S) is killed: its photos are read again one by one, and one that hangs alone is recorded as a
    timeout. Tasks are small enough that every worker gets some even for a handful of photos."""
    if not items:
        return
    if workers <= 1 or len(items) < 2:
        engine = engine or OcrEngine(**options)
        for start in range(0, len(items), chunk):
            yield {pid: engine.read_file(path) for pid, path in items[start : start + chunk]}
        return
    require_engine()
    size = max(1, min(chunk, -(-len(items) // (workers * 2))))
    tasks = deque(list(items[start : start + size]) for start in range(0, len(items), size))
    if hard_limit_s is None:
        hard_limit_s = HARD_FACTOR * float(options.get("timeout_s", 30.0)) + HARD_SLACK_S
    yield from _pooled(tasks, min(workers, len(tasks)), {"threads": 1, **options}, hard_limit_s)


def _pooled(tasks: deque[list[tuple[int, bytes]]], workers: int, options: dict[str, Any],
            hard_limit_s: float) -> Iterator[dict[int, OcrResult]]:
    """Run tasks in a pool, starting a fresh pool when one breaks (its task's photos fail with the reason; a pool
    that breaks before reading anything, e.g. an engine that cannot load, fails every remaining photo at once) or
    when a task runs past its hard limit (module constants; the photos of a hung task are retried singly)."""
    from clipsearch.indexer.ingest.workers import sigint_held_off

    while tasks:
        pool = ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_pool_worker, (options,))
        pending: deque[tuple[list[tuple[int, bytes]], Future]] = deque()
        read_any = False
        try:
            while tasks or pending:
                while tasks and len(pending) < 2 * workers:
                    part = tasks.popleft()
                    with sigint_held_off():  # a Ctrl-C while a worker starts must not break the pool
                        pending.append((part, pool.submit(_read_task, part)))
                part, fut = pending.popleft()
                try:  # the oldest task: running since the previous one ended, so its clock starts now
                    result = fut.result(timeout=hard_limit_s * len(part))
                except FutureTimeout:
                    _kill_workers(pool)
                    tasks.extendleft(reversed([p for p, _ in pending]))
                    pending.clear()
                    if len(part) > 1:  # which photo hangs? each is read again alone
                        tasks.extendleft(reversed([[item] for item in part]))
                    else:
                        reason = f"OCR did not finish in {hard_limit_s:.0f} s: its worker was stopped"
                        yield {part[0][0]: OcrResult("timeout", reason=reason, seconds=hard_limit_s)}
                    break
                except BrokenProcessPool:
                    rest = [p for p, _ in pending]
                    pending.clear()
                    if read_any:  # this task's photos fail; the others are read again in a fresh pool
                        lost = [part]
                        tasks.extendleft(reversed(rest))
                    else:
                        lost = [part, *rest, *tasks]
                        tasks.clear()
                    yield {pid: OcrResult("failed", reason=WORKER_DIED) for p in lost for pid, _ in p}
                    break
                read_any = True
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's worker processes now (a hung one never returns; shutdown alone would wait for it forever).
    Python 3.14 has ProcessPoolExecutor.kill_workers; before it the processes are only reachable privately."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()
