"""Decode-worker entry points. Torch-free on purpose: spawned workers import only this and indexer.decode,
so they start in a fraction of a second instead of loading torch."""

from __future__ import annotations

import os
from typing import Any

from clipsearch.indexer.ingest.decode import DecodeResult, PreprocessSpec, decode_file

_W: dict[str, Any] = {}


def init_worker(spec: PreprocessSpec, max_pixels: int, reuse: frozenset[str]) -> None:
    """Per-process setup: preprocessing spec, bomb limit, hashes whose vectors can be reused."""
    _W.update(spec=spec, max_pixels=max_pixels, reuse=reuse)
    try:
        os.nice(5)  # decoding yields to the embedding process when cores are scarce
    except OSError:
        pass


def decode_task(path: bytes, allow_reuse: bool = True) -> DecodeResult:
    """Decode one file with the per-process settings (allow_reuse=False: always decode, never answer "reuse")."""
    return decode_file(path, _W["spec"], _W["max_pixels"], _W["reuse"] if allow_reuse else frozenset())
