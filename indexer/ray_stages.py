"""The two stages the Ray engine runs on cluster nodes: decode (a task per block) and encode (a pool of actors).

Kept apart from the driver side (indexer/ray_executor.py) so that what a worker process imports stays small: the
decode stage imports only the torch-free decoder, the encode actor loads torch when it builds its model, and
neither imports Ray at module level. Batches travel as dicts of numpy arrays (Ray Data's "numpy" format):

* decode in:   key int64 (n,), path bytes (n,), reuse bool (n,)
* decode out:  key, meta (n,) pickled DecodeResult without pixels, has_pixels bool (n,), pixels uint8 (n, S, S, 3)
* encode out:  key, meta, has_vector bool (n,), vector float32 (n, D), embed_s float64 (n,) model seconds

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


def decode_batch(batch: Batch, preprocess: PreprocessSpec, max_pixels: int,
                 reuse_ref: tuple[Any, ...] | None = None) -> Batch:
    """Decode a block of files with the local engine's decoder (same statuses and reasons), on a CPU task."""
    reuse = _reuse_hashes(reuse_ref)
    n, size = len(batch["key"]), preprocess.size
    pixels = np.zeros((n, size, size, 3), np.uint8)
    has_pixels = np.zeros(n, bool)
    meta = np.empty(n, object)
    for i, (path, allow) in enumerate(zip(batch["path"], batch["reuse"], strict=True)):
        result = decode_file(bytes(path), preprocess, max_pixels, reuse if allow else frozenset())
        if result.pixels is not None:
            pixels[i], has_pixels[i] = result.pixels, True
        meta[i] = pickle.dumps(replace(result, pixels=None), protocol=pickle.HIGHEST_PROTOCOL)
    return {"key": np.asarray(batch["key"], np.int64), "meta": meta, "has_pixels": has_pixels, "pixels": pixels}


class EncodeActor:
    """A Ray Data actor that builds the encoder once from the model spec and embeds decoded batches.

    Each node loads the model from the same spec as the driver; `space_key` is the driver's embedding space, and an
    actor whose weights differ (another checkpoint file at the same path on that node) refuses to start rather than
    mix vectors of two spaces in one index.
    """

    def __init__(self, spec: str, device: str | None, backend: str, model_cache: str | None, space_key: str) -> None:
        from clipsearch.indexer.errors import UsageError
        from clipsearch.indexer.model.factory import create_encoder

        self.encoder = create_encoder(spec, device, backend, model_cache)
        if self.encoder.space.key != space_key:
            raise UsageError(f"model {spec} on this node is embedding space {self.encoder.space.key}, "
                             f"the driver's is {space_key}: the nodes must share the same weights")
        self.dim = self.encoder.space.dim

    def __call__(self, batch: Batch) -> Batch:
        """Embed the rows that have pixels; pixels are dropped here (only vectors travel back to the driver)."""
        t0 = time.perf_counter()
        has = np.asarray(batch["has_pixels"], bool)
        vectors = np.zeros((len(has), self.dim), np.float32)
        if has.any():
            vectors[has] = self.encoder.encode_pixels(np.asarray(batch["pixels"])[has])
        embed_s = np.full(len(has), (time.perf_counter() - t0) / max(len(has), 1))  # sums to the batch's seconds
        return {"key": batch["key"], "meta": batch["meta"], "has_vector": has, "vector": vectors, "embed_s": embed_s}
