"""Text embeddings kept per process, one text at a time: a query's relevance check embeds dozens of contrast texts
("a red dog" → "a red cat", "a red car", ...), and related queries share most of them ("a red cat" is contrasted
with "a red dog"). Embedding only the texts not seen before turns the second query of a session from ~0.7 s of
text encoding (ViT-B-32, 2 CPU cores; bench/RESULTS.md issue 13) into a few milliseconds, and a repeated query (the
UI re-runs its query on every interaction) into none."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np


class TextVectors:
    """`encoder.encode_texts` with a least-recently-used cache of single texts (thread-safe; the server shares one)."""

    def __init__(self, encoder: Any, max_texts: int = 100_000) -> None:
        self.encoder, self.max_texts = encoder, max_texts
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # texts sent to the encoder (for tests and benchmarks)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) unit vectors, equal to `encoder.encode_texts(texts)`; only unseen texts are encoded.
        One call at a time: the encoder already uses every core, and a text two callers both miss is encoded once."""
        if not texts:
            return np.zeros((0, int(self.encoder.space.dim)), np.float32)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                vecs = np.asarray(self.encoder.encode_texts(missing), dtype=np.float32)
                self.encoded += len(missing)
                self._cache.update(zip(missing, vecs, strict=True))
            out = np.stack([self._cache[t] for t in texts])
            for t in texts:
                self._cache.move_to_end(t)
            while len(self._cache) > self.max_texts:
                self._cache.popitem(last=False)
        return out
