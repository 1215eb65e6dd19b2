"""Why did it match: a heatmap over a photo of where a text query matches it, and its PNG overlay.

`explain(encoder, image, query)` works on a decoded image; `explain_ref(catalog, encoder, ref, query)` first
resolves what the CLI and the UI hand over (a catalogued photo id, a file, uploaded bytes). Nothing here writes to
the catalog. The model-side grid comes from `clipsearch.indexer.model.explain` (imported when first used, so this
module stays torch-free); here it is mapped back onto the photo through the same geometry the preprocessing used:
a squashed photo is stretched back, a padded one un-padded, a centre-cropped one gets relevance only inside the
square the model saw.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from clipsearch.indexer.errors import BadImage, PhotoNotFound, UsageError
from clipsearch.indexer.ingest.decode import DecodeError, PreprocessSpec, open_image, preprocess
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog

# a dark-blue → cyan → yellow → red ramp (close to matplotlib's "turbo"), without a plotting dependency
_RAMP = np.array([(48, 18, 59), (50, 130, 245), (30, 225, 180), (200, 240, 50), (250, 150, 30), (170, 20, 5)],
                 np.float32)


@dataclass(frozen=True)
class Heatmap:
    """Where `query` matches the photo: `values` has the photo's size (upright, as displayed)."""

    query: str  # the text that was explained
    values: np.ndarray = field(repr=False)  # (H, W) float32 in [0, 1]: 1 where the query matches best
    peak: tuple[int, int] | None  # (x, y) pixel of the best match; None when no region stands out (a flat map)
    score: float  # cosine similarity of the query with the whole photo
    method: str  # how the model-side grid was made, e.g. "gradcam:layer2" or "tokens"
    image: Image.Image = field(repr=False)  # the upright RGB photo the map lies over

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the photo and of the map."""
        return self.image.size

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The photo with the map blended over it (strong where it matches) and a ring at the peak."""
        colours = _colourise(self.values)
        a = (alpha * (0.3 + 0.7 * self.values))[..., None]
        out = np.asarray(self.image, np.float32) * (1 - a) + colours * a
        im = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
        if self.peak is not None:
            x, y = self.peak
            r = max(4, min(im.size) // 30)
            draw = ImageDraw.Draw(im)
            draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=(0, 0, 0), width=2)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), width=2)
        return im

    def png_bytes(self, alpha: float = 0.55) -> bytes:
        """The overlay as PNG bytes (what the UI shows and a server would send)."""
        buf = io.BytesIO()
        self.overlay(alpha).save(buf, "PNG")
        return buf.getvalue()

    def write_png(self, path: str | Path, alpha: float = 0.55) -> Path:
        """Write the overlay as a PNG file; a path that cannot be written is a one-line UsageError."""
        path = Path(path)
        try:
            path.write_bytes(self.png_bytes(alpha))
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
        return path


def _colourise(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] → (H, W, 3) float32 colours along _RAMP."""
    pos = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (width, height), pixel centres aligned."""
    im = Image.fromarray(np.ascontiguousarray(values, np.float32))
    return np.asarray(im.resize(size, Image.Resampling.BILINEAR), np.float32)


def to_photo(grid: np.ndarray, size: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """A model-input grid mapped onto a photo of `size` (width, height), inverting `preprocess`'s geometry; photo
    pixels the model never saw (outside a centre crop) get the grid's minimum."""
    s = spec.size
    full = _resize(grid, (s, s))  # over the model's input pixels
    w, h = size
    if spec.resize_mode == "squash":
        return _resize(full, (w, h))
    if spec.resize_mode == "longest":
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = (s - nw) // 2, (s - nh) // 2
        return _resize(full[y0 : y0 + nh, x0 : x0 + nw], (w, h))
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # as preprocess: shortest side → s, centre crop
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    x0, y0 = round(left * w / nw), round(top * h / nh)
    cw, ch = max(1, min(w - x0, round(s * w / nw))), max(1, min(h - y0, round(s * h / nh)))
    out = np.full((h, w), float(full.min()), np.float32)
    out[y0 : y0 + ch, x0 : x0 + cw] = _resize(full, (cw, ch))
    return out


def explain(encoder: Any, image: Image.Image | bytes, query: str, method: str = "auto",
            max_pixels: int = 100_000_000) -> Heatmap:
    """Heatmap of where `query` matches `image` (upright RGB PIL image, or encoded bytes decoded safely).

    The encoder gives the query vector (any backend); the image tower's spatial relevance comes from its torch
    model (`explainer_for`), fed exactly the input the indexer gives it."""
    query = (query or "").strip()
    if not query:
        raise UsageError("the query to explain is empty")
    if isinstance(image, bytes | bytearray):
        try:
            image, _ = open_image(bytes(image), max_pixels)
        except DecodeError as e:
            raise BadImage(f"cannot use this image: {e.reason}") from e
    image = image.convert("RGB") if image.mode != "RGB" else image
    from clipsearch.indexer.model.explain import explainer_for

    spec = encoder.preprocess_spec
    grid = explainer_for(encoder).relevance(preprocess(image, spec), encoder.encode_texts([query])[0], method)
    values = to_photo(grid.values, image.size, spec)
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return Heatmap(query, np.zeros_like(values), None, grid.score, grid.method, image)
    values = (values - lo) / (hi - lo)
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return Heatmap(query, values, (int(x), int(y)), grid.score, grid.method, image)


def explain_ref(catalog: Catalog, encoder: Any, ref: int | str | bytes, query: str, method: str = "auto",
                allow_files: bool = True, max_side: int | None = None) -> Heatmap:
    """`explain` for what a user names: a catalogued photo id, an image file (only where `allow_files`), or
    uploaded bytes. An unknown id is a PhotoNotFound, an unreadable photo a BadImage: one line each, and the
    catalog is only read. `max_side` shrinks large photos first (the UI's lightbox), so the map and its PNG stay
    small; the model's input is barely affected, being far smaller still."""
    data = read_ref(catalog, ref, allow_files)
    try:
        image, _ = open_image(data, 100_000_000)
    except DecodeError as e:
        raise BadImage(f"cannot use {_describe(ref)}: {e.reason}") from e
    if max_side is not None:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return explain(encoder, image, query, method)


def _describe(ref: int | str | bytes) -> str:
    if isinstance(ref, int):
        return f"photo #{ref}"
    return "the uploaded image" if isinstance(ref, bytes | bytearray) else f"image {ref}"


def read_ref(catalog: Catalog, ref: int | str | bytes, allow_files: bool) -> bytes:
    """The encoded bytes behind a reference; catalogued photos are read from their recorded path."""
    if isinstance(ref, bytes | bytearray):
        return bytes(ref)
    if isinstance(ref, int):
        row = catalog.photos_by_id([ref]).get(ref)
        if row is None or row["status"] != PhotoStatus.INDEXED:
            raise PhotoNotFound(f"no indexed photo with id {ref}")
        path: str | bytes = bytes(row["path_bytes"])
    elif not allow_files:
        raise UsageError("an image cannot name a file on the server here: upload the image, or give a catalogued "
                         "photo as #ID")
    else:
        path = ref
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"cannot read {_describe(ref)}: {e.strerror or e}") from e
