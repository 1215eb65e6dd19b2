"""The encoder contract every backend satisfies, and the identity of an embedding space. Torch-free.

A second backend (ONNX Runtime, a remote service) is a new class with these members, created by
`clipsearch.indexer.model.factory.create_encoder`; nothing that uses an encoder tests which one it got.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clipsearch.indexer.errors import BadImage
from clipsearch.indexer.ingest.decode import PreprocessSpec, decode_bytes, preprocess


@dataclass(frozen=True)
class EmbeddingSpace:
    """Identity of a vector space: two encoders with the same key produce comparable vectors."""

    key: str  # short stable hash of label + preprocessing
    label: str  # human-readable: ARCH:weights-id
    dim: int  # embedding dimension


@runtime_checkable
class Encoder(Protocol):
    """Image and text embeddings as L2-normalised float32 arrays (N, D) of one embedding space."""

    spec: str  # the model spec it was built from (what the catalog records per space)
    device: str  # "cpu", "cuda", ...: decides whether decoding overlaps with embedding
    space: EmbeddingSpace  # the space its vectors belong to
    preprocess_spec: PreprocessSpec  # how decode workers prepare model inputs
    folder: Path | None  # model folder (may carry templates.txt), None for registry models
    logit_scale: float  # the model's learned temperature (zero-shot probabilities)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed decoded model inputs, (N, S, S, 3) uint8 as produced by the decoder."""
        ...

    def encode_images(self, images: list[Any]) -> np.ndarray:
        """Embed upright RGB PIL images with the model's preprocessing."""
        ...

    def encode_image_bytes(self, data: bytes, max_pixels: int = 100_000_000) -> np.ndarray:
        """Embed one uploaded or query image through the same safe decoder as the indexer; (1, D)."""
        ...

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts; (N, D)."""
        ...

    def default_templates(self) -> list[str] | None:
        """Prompt templates shipped with the model, if any."""
        ...

    def limit_threads(self, n: int | None) -> Callable[[], None]:
        """Use at most n CPU threads; returns a function that restores the previous setting."""
        ...


class PixelInputs:
    """The image entry points every backend shares, built on its own `encode_pixels` and `preprocess_spec`: PIL
    images and uploaded bytes go through the indexer's decoder, so a query image is prepared like an indexed one."""

    preprocess_spec: PreprocessSpec

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:  # pragma: no cover - each backend defines it
        raise NotImplementedError

    def encode_images(self, images: list[Any]) -> np.ndarray:
        """Embed PIL images (already upright RGB) with the model's preprocessing."""
        return self.encode_pixels(np.stack([preprocess(im, self.preprocess_spec) for im in images]))

    def encode_image_bytes(self, data: bytes, max_pixels: int = 100_000_000) -> np.ndarray:
        """Embed one uploaded/query image through the same safe decoder as the indexer; (1, D)."""
        result = decode_bytes(data, self.preprocess_spec, max_pixels)
        if result.pixels is None:
            raise BadImage(f"cannot use this image: {result.reason or result.status}")
        return self.encode_pixels(result.pixels[None])
