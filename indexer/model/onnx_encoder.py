"""The ONNX Runtime backend of the Encoder Protocol: CPU inference without torch or open_clip.

Why: importing torch and open_clip and building the model costs 4-8 s per process on a laptop CPU, longer than
the search it serves. Once a model is exported (onnx_export, on first use, into the model cache) this backend
needs only onnxruntime, NumPy and the BPE tokenizer: a fresh process embeds its first text in about a second.
Its vectors are the torch encoder's (cosine ≥ 0.9999, checked at export), so it reports the same embedding space
and both backends share one index.

Each tower's session is built on first use (a text query never loads the image graph), and its files' SHA-256
is checked while ONNX Runtime builds the session: a damaged export is rebuilt once, else reported in one line.

`SPEC@int8` runs SPEC's export quantized to int8 (onnx_quant): its own embedding space, built from the fp32 export.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import ModelUnavailable
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.model.onnx_cache import (
    TOWERS,
    ExportMeta,
    OnnxUnsupported,
    cache_root,
    find_export,
    model_folder,
    remove_export,
    unsupported_reason,
)
from clipsearch.indexer.model.onnx_quant import export_source, split_quant
from clipsearch.indexer.model.onnx_sessions import DamagedExport, load_tokenizer, open_session, take_prewarmed
from clipsearch.indexer.model.protocol import PixelInputs
from clipsearch.indexer.model.tokenizer import BpeTokenizer

log = logging.getLogger(__name__)

_TEXT_BATCH = 256  # texts per text-graph run (the torch encoder's batch)
_INPUTS = {"image": "pixels", "text": "tokens"}
_PAD_BUDGET = 24  # padded token rows worth one more graph run (~5 ms of ViT-B-32's text tower on 2 cores)


def length_batches(lengths: list[int], max_batch: int, pad_budget: int) -> list[tuple[int, int]]:
    """[start, stop) runs over texts sorted by token length: a batch is cut where the next, longer text would pad
    more than `pad_budget` token rows of the batch (63 relevance contrasts of 10-14 tokens: 0.23 s as one batch
    padded to 14, less in two), or at max_batch texts."""
    out, start, top = [], 0, lengths[0] if lengths else 0
    for i, n in enumerate(lengths):
        if i > start and (i - start >= max_batch or (n - top) * (i - start) > pad_budget):
            out.append((start, i))
            start = i
        top = n if i == start else max(top, n)
    if lengths:
        out.append((start, len(lengths)))
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class OnnxEncoder(PixelInputs):
    """open_clip towers on ONNX Runtime (CPU), satisfying the Encoder Protocol with the torch encoder's space."""

    device = "cpu"

    def __init__(self, spec: str, model_cache: str | Path | None = None) -> None:
        self.spec = spec
        self.folder = model_folder(split_quant(spec)[0])  # model folders may carry prompt templates (templates.txt)
        self._root = cache_root(model_cache)
        self._source = export_source(spec)
        found = find_export(self._root, self._source)
        if found is None:
            reason = unsupported_reason(self._root, self._source)
            if reason:
                raise OnnxUnsupported(f"model {spec} cannot run on ONNX Runtime ({reason}; recorded in "
                                      f"{self._root / 'sources'}: delete the file to retry)")
            found = self._export()
        self._threads = usable_cores()
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._load(*found)

    @classmethod
    def from_export(cls, spec: str, folder: Path, meta: ExportMeta, threads: int | None = None) -> OnnxEncoder:
        """An encoder over an export folder as it is (the exporter's own check runs one before installing it)."""
        enc = cls.__new__(cls)
        enc.spec, enc.folder, enc._root, enc._source = spec, model_folder(split_quant(spec)[0]), folder.parent, ""
        enc._threads = threads or usable_cores()
        enc._sessions, enc._lock = {}, threading.Lock()
        enc._load(folder, meta)
        return enc

    def _load(self, folder: Path, meta: ExportMeta) -> None:
        self._dir, self._meta = folder, meta
        self.space = meta.space
        self.preprocess_spec = meta.preprocess
        self.logit_scale = meta.logit_scale
        self._tokenizer: BpeTokenizer | None = None

    def _export(self) -> tuple[Path, ExportMeta]:
        base, int8 = split_quant(self.spec)
        if int8:  # quantized from the base model's fp32 export (exported first if need be)
            from clipsearch.indexer.model.onnx_quant import quantize_export

            return quantize_export(self.spec, OnnxEncoder(base, self._root.parent), self._root, self._source)
        from clipsearch.indexer.model.onnx_export import export_model  # imports torch: only when exporting

        return export_model(self.spec, self._root, self._source)

    @property
    def export_dir(self) -> Path:
        """The export folder this encoder runs (under <model cache>/onnx, named by its space key)."""
        return self._dir

    @property
    def export_meta(self) -> ExportMeta:
        """The export's export.json, as checked when it was found."""
        return self._meta

    def open_towers(self) -> None:
        """Build both towers' sessions now: their files are checked, and a damaged export rebuilt, before use."""
        for tower in TOWERS:
            self._session(tower)

    # --- sessions ------------------------------------------------------------------------------------------------
    def _open(self, tower: str) -> Any:
        """A session for one tower: the one built in the background for it (onnx_sessions.prewarm), else a new one."""
        session = take_prewarmed(self._dir, tower, self._threads)
        return session if session is not None else open_session(self._dir, self._meta, tower, self._threads)

    def _session(self, tower: str) -> Any:
        """The tower's session, built on first use; a damaged export is rebuilt once, in place of a wrong vector."""
        with self._lock:
            if tower in self._sessions:
                return self._sessions[tower]
            try:
                session = self._open(tower)
            except DamagedExport as e:
                if not self._source:
                    raise ModelUnavailable(f"ONNX export {self._dir} is damaged: {e}") from e
                log.warning("ONNX export of %s is damaged (%s): exporting it again", self.spec, e)
                self._rebuild(str(e))
                try:
                    session = self._open(tower)
                except DamagedExport as again:
                    raise ModelUnavailable(f"ONNX export of {self.spec} in {self._dir} is unusable: {again}") from again
            self._sessions[tower] = session
            return session

    def _rebuild(self, why: str) -> None:
        remove_export(self._dir)
        folder, meta = self._export()
        if meta.space != self.space:
            raise ModelUnavailable(f"the re-exported {self.spec} is embedding space {meta.space.key}, not "
                                   f"{self.space.key} ({why})")
        self._load(folder, meta)  # sessions already open keep the files they loaded (checked then)

    @property
    def tokenizer(self) -> BpeTokenizer:
        """open_clip's tokenizer for this model, torch-free (the vocabulary file is checked on first use)."""
        if self._tokenizer is None:
            self._tokenizer = take_prewarmed(self._dir, "tokenizer", 0) or load_tokenizer(self._dir, self._meta)
        return self._tokenizer

    def limit_threads(self, n: int | None) -> Callable[[], None]:
        """Use at most n threads per session (None: unchanged); returns a function restoring the old count.
        ONNX Runtime fixes the count when a session is built, so a change drops the open sessions."""
        old = self._threads

        def use(count: int) -> None:
            with self._lock:
                if count != self._threads:
                    self._threads = count
                    self._sessions.clear()

        if n:
            use(n)
        return lambda: use(old)

    # --- the Encoder Protocol -------------------------------------------------------------------------------------
    def default_templates(self) -> list[str] | None:
        """Prompt templates shipped with a model folder (one per line, with {}), else None."""
        path = self.folder / "templates.txt" if self.folder else None
        if path and path.is_file():
            return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if "{}" in t]
        return None

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch of decoded model inputs, (N, S, S, 3) uint8 as produced by indexer.decode."""
        if len(pixels) == 0:
            return np.zeros((0, self.space.dim), np.float32)
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        size = self.preprocess_spec.size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(f"pixels must be (N, {size}, {size}, 3) uint8, got {x.shape}")
        return _normalise(self._session("image").run(None, {"pixels": x})[0])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts in batches of similar length; returns (N, D).

        As in the torch encoder, texts are sorted by token length, and for causal towers each batch runs only up to
        its longest end-of-text token (exact: no position attends to a later one) instead of the full context. A
        longer text starts a new batch when padding the batch so far to it would cost more than a run does."""
        if not texts:
            return np.zeros((0, self.space.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        lengths = tokens.argmax(axis=1) + 1 if self._meta.text_dynamic_length else np.full(len(texts), tokens.shape[1])
        order = np.lexsort((*tokens[:, : int(lengths.max())].T[::-1], lengths))
        session = self._session("text")
        out = np.empty((len(texts), self.space.dim), np.float32)
        for start, stop in length_batches(lengths[order].tolist(), _TEXT_BATCH, _PAD_BUDGET):
            idx = order[start:stop]
            batch = np.ascontiguousarray(tokens[idx, : int(lengths[idx].max())])
            out[idx] = _normalise(session.run(None, {"tokens": batch})[0])
        return out
