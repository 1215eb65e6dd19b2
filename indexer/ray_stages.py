"""The two stages the Ray engine runs on cluster nodes: decode (a task per block) and encode (a pool of actors).

Kept apart from the driver side (indexer/ray_executor.py) so that what a worker process imports stays small: the
decode stage imports only the torch-free decoder, the encode actor loads torch when it builds its model, and
neither imports Ray at module level. Batches travel as dicts of numpy arrays (Ray Data's "numpy" format):

* decode in:   key int64 (n,), path bytes (n,), reuse bool (n,)
* decode out:  key, meta (n,) pickled DecodeResult without pixels, has_pixels bool (n,), pixels uint8 (n, S, S, 3)
* encode out:  key, meta, has_vector bool (n,), vector float32 (n, D), embed_s float64 (n,) model seconds

When the encode actors hold GPUs (`ship_jpeg`), decode tasks leave the pixels of plain JPEGs to them: decode out then
also has has_jpeg bool (n,) and jpeg (n,) pickled `gpu_decode.PendingJpeg` (the file's bytes and header facts; b""
elsewhere), and the actor decodes those on its device (nvjpeg) before embedding, or on its CPU where the node's
torchvision cannot. A block then carries the JPEGs' bytes (a few MB per camera photo) instead of 150 KB of pixels.

Rows without pixels (a failure, a reuse answer) carry zero pixels and a zero vector, so every column keeps one
fixed shape; `has_*` says which rows are real. Metadata is pickled whole so that the driver commits exactly the
DecodeResult the local engine would have produced (dates, reasons and all).
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import replace
from typing import Any

import numpy as np

from clipsearch.indexer.ingest.decode import PreprocessSpec, decode_file
from clipsearch.indexer.ingest.gpu_decode import PendingJpeg, TensorJpegDecoder, cpu_decode, decode_device, probe_file

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

_REUSE_CACHE: dict[str, frozenset[str]] = {}  # per worker process: reuse hash sets by object id, fetched once


def _reuse_hashes(reuse_ref: tuple[Any, ...] | None) -> frozenset[str]:
    """The run's reuse hashes, fetched from the object store once per worker process (they can be large)."""
    if reuse_ref is None:
        return frozenset()
    (ref,) = reuse_ref  # wrapped in a tuple so that Ray hands us the reference, not a copy per batch
    key = ref.hex()
    if key not in _REUSE_CACHE:
        import ray

        _REUSE_CACHE.clear()
        _REUSE_CACHE[key] = ray.get(ref)
    return _REUSE_CACHE[key]


def _pickled(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def decode_batch(batch: Batch, preprocess: PreprocessSpec, max_pixels: int,
                 reuse_ref: tuple[Any, ...] | None = None, ship_jpeg: bool = False) -> Batch:
    """Decode a block of files with the local engine's decoder (same statuses and reasons), on a CPU task.

    `ship_jpeg`: plain JPEGs are only read, hashed and checked here; their bytes travel to the encode actor, whose
    GPU decodes them (`gpu_decode.probe_file`)."""
    reuse = _reuse_hashes(reuse_ref)
    n, size = len(batch["key"]), preprocess.size
    pixels = np.zeros((n, size, size, 3), np.uint8)
    has_pixels, has_jpeg = np.zeros(n, bool), np.zeros(n, bool)
    meta, jpeg = np.empty(n, object), np.full(n, b"", object)
    decode = probe_file if ship_jpeg else decode_file
    for i, (path, allow) in enumerate(zip(batch["path"], batch["reuse"], strict=True)):
        result = decode(bytes(path), preprocess, max_pixels, reuse if allow else frozenset())
        if isinstance(result, PendingJpeg):
            jpeg[i], has_jpeg[i] = _pickled(result), True
            result = result.result
        elif result.pixels is not None:
            pixels[i], has_pixels[i] = result.pixels, True
        meta[i] = _pickled(replace(result, pixels=None))
    out = {"key": np.asarray(batch["key"], np.int64), "meta": meta, "has_pixels": has_pixels, "pixels": pixels}
    return {**out, "has_jpeg": has_jpeg, "jpeg": jpeg} if ship_jpeg else out


class EncodeActor:
    """A Ray Data actor that builds the encoder once from the model spec and embeds decoded batches.

    Each node loads the model from the same spec as the driver; `space_key` is the driver's embedding space, and an
    actor whose weights differ (another checkpoint file at the same path on that node) refuses to start rather than
    mix vectors of two spaces in one index.
    """

    def __init__(self, spec: str, device: str | None, backend: str, model_cache: str | None, space_key: str,
                 gpu_decode: str = "auto", preprocess: PreprocessSpec | None = None,
                 max_pixels: int = 100_000_000, cpu_threads: int | None = None) -> None:
        from clipsearch.indexer.errors import UsageError
        from clipsearch.indexer.model.factory import create_encoder

        self.encoder = create_encoder(spec, device, backend, model_cache)
        if cpu_threads and str(self.encoder.device) == "cpu":
            # the actor holds cpu_threads of the node's CPUs: an encoder sized to the whole node would put
            # actors x cores spinning threads on the cores (2 actors on 2 cores ran at 0.76 of the local engine)
            self.encoder.limit_threads(cpu_threads)
        if self.encoder.space.key != space_key:
            raise UsageError(f"model {spec} on this node is embedding space {self.encoder.space.key}, "
                             f"the driver's is {space_key}: the nodes must share the same weights")
        self.dim = self.encoder.space.dim
        self.preprocess, self.max_pixels = preprocess or self.encoder.preprocess_spec, max_pixels
        jpeg_device = decode_device(gpu_decode, str(self.encoder.device))  # on: an error here if it cannot
        self.jpegs = TensorJpegDecoder(jpeg_device, self.preprocess, max_pixels) if jpeg_device else None
        self._warned = False

    def __call__(self, batch: Batch) -> Batch:
        """Embed the rows that have pixels; pixels are dropped here (only vectors travel back to the driver)."""
        t0 = time.perf_counter()
        has = np.asarray(batch["has_pixels"], bool)
        pixels, meta = np.asarray(batch["pixels"]), batch["meta"]
        if "has_jpeg" in batch and np.any(batch["has_jpeg"]):
            has, pixels, meta = self._decode_jpegs(batch, has, pixels)
        vectors = np.zeros((len(has), self.dim), np.float32)
        if has.any():
            vectors[has] = self.encoder.encode_pixels(pixels[has])
        embed_s = np.full(len(has), (time.perf_counter() - t0) / max(len(has), 1))  # sums to the batch's seconds
        return {"key": batch["key"], "meta": meta, "has_vector": has, "vector": vectors, "embed_s": embed_s}

    def _decode_jpegs(self, batch: Batch, has: np.ndarray,
                      pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixels for the rows the decode task shipped as JPEG bytes: on this actor's GPU, else its CPU (the
        CPU decoder's result, as a decode task would have recorded it)."""
        rows = np.flatnonzero(np.asarray(batch["has_jpeg"], bool))
        items: list[PendingJpeg] = [pickle.loads(bytes(batch["jpeg"][i])) for i in rows]
        if self.jpegs is not None:
            results = self.jpegs.decode(items)
        else:
            if not self._warned:
                log.warning("encode actor: JPEGs arrive undecoded but this node cannot decode them on the GPU; "
                            "decoding them on the actor's CPU (--gpu-decode off decodes them in the decode tasks)")
                self._warned = True
            results = [cpu_decode(item, self.preprocess, self.max_pixels) for item in items]
        has, pixels, meta = has.copy(), pixels.copy(), np.array(batch["meta"], object)
        for i, result in zip(rows, results, strict=True):
            has[i] = result.pixels is not None
            if has[i]:
                pixels[i] = result.pixels
            meta[i] = _pickled(replace(result, pixels=None))
        return has, pixels, meta
