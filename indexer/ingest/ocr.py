"""Text in photos (OCR), offline: RapidOCR (PP-OCR detection + recognition on ONNX Runtime, models inside the
`rapidocr-onnxruntime` wheel). Opt-in: nothing here is imported unless OCR is asked for.

A photo whose OCR fails keeps everything else (its CLIP vector was written by the indexer); the failure is a
result with a status and a reason, never an exception out of `read_file`. Photos are read through the same safe
decoder as indexing (EXIF orientation, bomb limit) and reduced to `max_side` first: text small enough to vanish
there is too small to matter for search, and the cost of detection grows with the pixel count.
"""

from __future__ import annotations

import importlib.util
import time
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
