"""A deterministic fake encoder for unit tests: every word is a fixed random direction; a text is the normalised
sum of its words. Photos are written with vectors built from the same words, so rankings are predictable."""

from __future__ import annotations

import zlib
from datetime import datetime
from pathlib import Path

import numpy as np

from clipsearch.indexer.errors import BadImage
from clipsearch.indexer.ingest.decode import PreprocessSpec
from clipsearch.indexer.model.torch_encoder import EmbeddingSpace
from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.indexer.storage.store import VectorStore

DIM = 64
STOP = {"a", "an", "the", "of", "photo", "on", "in", "this", "is"}


def word_vec(word: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(word.encode())).normal(size=DIM)
    return v / np.linalg.norm(v)


def concept(text: str) -> np.ndarray:
    words = [w.strip(".,") for w in text.lower().split() if w.strip(".,") not in STOP] or ["nothing"]
    v = sum(word_vec(w) for w in words)
    return (v / np.linalg.norm(v)).astype(np.float32)


class FakeEncoder:
    """Implements the Encoder contract (normalised float32 (N, D)) without a model."""

    spec = "fake"
    logit_scale = 100.0
    preprocess_spec = PreprocessSpec(size=8)
    space = EmbeddingSpace("fake-space", "fake", DIM)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([concept(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)

    def encode_image_bytes(self, data: bytes, max_pixels: int = 0) -> np.ndarray:
        if not data.startswith(b"concept:"):
            raise BadImage("cannot use this image: not an image format we accept")
        return concept(data[8:].decode())[None]

    def default_templates(self):
        return None


def populate(tmp: Path, photos: list[tuple[str, str, datetime | None]]) -> tuple[Catalog, VectorStore]:
    """Catalog + store holding photos (path, concept words, date) with their fake vectors."""
    cat = Catalog(f"sqlite:///{tmp / 'cat.db'}")
    sid = cat.ensure_space(FakeEncoder.space.key, "fake", "fake", DIM)
    recs = [PhotoRecord(p.encode(), 1, 1_000_000_000, "indexed", content_hash=str(i), taken_at=d, format="JPEG")
            for i, (p, _, d) in enumerate(photos)]
    cat.write_batch(sid, recs, {i: concept(c) for i, (_, c, _) in enumerate(photos)})
    return cat, VectorStore(tmp / "idx", cat)
