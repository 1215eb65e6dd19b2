"""ONNX Runtime sessions for exported towers, and building one in the background before it is asked for.

Why the background: a cold `clipsearch search` spends ~0.45 s building the text tower's session (reading 254 MB
and optimising the graph, mostly on one core) and ~0.3 s importing SQLAlchemy, FAISS and the service and opening
the catalog, also on one core. The CLI knows which model a library uses before it imports any of that (the
`model-hint` file beside the library's caches), so it starts the session here on a thread, and the two overlap on
two cores. Measured side by side: 0.53 s instead of 0.77-0.85 s for both (bench/RESULTS.md, issue 13).

A prewarmed session is used only by an encoder over the same export folder, tower and thread count; a wrong guess
costs the CPU of one session build and nothing else.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from clipsearch.indexer.model.onnx_cache import ExportMeta, cache_root, find_export, verify_files
from clipsearch.indexer.model.onnx_quant import export_source

log = logging.getLogger(__name__)

_prewarmed: dict[tuple[str, str, int], Future[Any]] = {}
_lock = threading.Lock()


class DamagedExport(Exception):
    """A tower's files fail their checksum or ONNX Runtime cannot load them."""


def open_session(folder: Path, meta: ExportMeta, tower: str, threads: int) -> Any:
    """A session for one tower, its files checked against export.json while ONNX Runtime loads them."""
    import onnxruntime as ort

    result: list[str | None] = []
    check = threading.Thread(target=lambda: result.append(verify_files(folder, meta, tower)))
    check.start()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(folder / f"{tower}.onnx"), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own exception types for unreadable graphs
        check.join()
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DamagedExport(result[0] or f"ONNX Runtime cannot load it ({first})") from e
    check.join()
    if result[0]:
        raise DamagedExport(result[0])
    return session


def load_tokenizer(folder: Path, meta: ExportMeta) -> Any:
    """The export's torch-free BPE tokenizer, its vocabulary file checked first (ModelUnavailable if damaged)."""
    from clipsearch.indexer.errors import ModelUnavailable
    from clipsearch.indexer.model.tokenizer import VOCAB_FILE, BpeTokenizer

    reason = verify_files(folder, meta, "vocab")
    if reason:
        raise ModelUnavailable(f"ONNX export of {meta.spec}: {reason}; delete {folder} to rebuild it")
    return BpeTokenizer(folder / VOCAB_FILE, meta.context_length, meta.clean, meta.special_tokens)


def take_prewarmed(folder: Path, tower: str, threads: int) -> Any | None:
    """What prewarm() built for this folder and tower ("tokenizer": threads 0) with this thread count, waiting for
    it, else None. Raises what open_session or load_tokenizer raised."""
    with _lock:
        future = _prewarmed.pop((str(folder), tower, threads), None)
    return future.result() if future is not None else None


def prewarm(spec: str, model_cache: str | Path | None, threads: int, tower: str = "text") -> bool:
    """Start building `tower`'s session of spec's existing ONNX export on a daemon thread; False (and nothing
    started) when the spec has no export yet (exporting stays in the foreground, with its messages)."""
    try:
        found = find_export(cache_root(model_cache), export_source(spec))
    except Exception as e:  # noqa: BLE001 - a malformed spec is reported by the real encoder, not here
        log.debug("no prewarm for %s: %s", spec, e)
        return False
    if found is None:
        return False
    folder, meta = found
    key = (str(folder), tower, threads)
    future: Future[Any] = Future()
    with _lock:
        if key in _prewarmed:
            return True
        _prewarmed[key] = future

    words: Future[Any] = Future()
    with _lock:
        _prewarmed.setdefault((str(folder), "tokenizer", 0), words)

    def build() -> None:
        for fut, make in ((future, lambda: open_session(folder, meta, tower, threads)),
                          (words, lambda: load_tokenizer(folder, meta))):
            try:
                fut.set_result(make())
            except BaseException as e:  # noqa: BLE001 - handed to the encoder that takes it
                fut.set_exception(e)

    threading.Thread(target=build, name=f"prewarm-{tower}", daemon=True).start()
    log.debug("building the %s session of %s in the background", tower, spec)
    return True
