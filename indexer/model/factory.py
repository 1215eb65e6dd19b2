"""The one factory for encoders: a model spec + device (+ backend) → an object satisfying the Encoder Protocol.

Backends are imported here lazily, so asking for an encoder is the moment torch (or onnxruntime) loads.
"""

from __future__ import annotations

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.model.protocol import Encoder

BACKENDS = ("auto", "torch")


def create_encoder(spec: str, device: str | None = None, backend: str = "auto") -> Encoder:
    """An encoder for `spec` on `device` (None: best available) with the chosen backend."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    from clipsearch.indexer.model.torch_encoder import TorchEncoder

    return TorchEncoder(spec, device)
