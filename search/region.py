"""Search by a region of a photo: embed only what is inside a box, so that a small thing in a big photo becomes
the query instead of the whole scene around it (`clipsearch similar PATH|ID --box x,y,w,h`, the lightbox's box).

The box is in the photo's own pixels as a person sees it: after the EXIF orientation is applied, at full
resolution (the size the catalog records as width x height). The crop then goes through the model's own
preprocessing, exactly as a whole photo would, so its vector lives in the same space as the indexed ones.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from clipsearch.indexer.errors import BadImage, PhotoNotFound, UsageError
from clipsearch.indexer.ingest.decode import DecodeError, open_image, preprocess
from clipsearch.indexer.storage.catalog import Catalog

Box = tuple[int, int, int, int]  # x, y, width, height in upright full-resolution pixels
RegionSource = int | str | bytes | os.PathLike[str]  # a catalogued photo id, an image file, or its bytes


def parse_box(text: str) -> Box:
    """`x,y,w,h` (whole pixels, commas or spaces) as a Box; UsageError with the expected form otherwise."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise UsageError(f"--box wants four whole numbers x,y,w,h (pixels), got '{text}'")
    return values[0], values[1], values[2], values[3]


def check_box(box: Box, width: int, height: int) -> Box:
    """The box as ints when it has a size and lies inside a width x height photo, else a one-line UsageError."""
    try:
        x, y, w, h = (int(v) for v in box)
    except (TypeError, ValueError) as e:
        raise UsageError(f"a box is four whole numbers x,y,w,h, got {box!r}") from e
    if w <= 0 or h <= 0:
        raise UsageError(f"the box {x},{y},{w},{h} has no area (width and height must be at least 1 pixel)")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise UsageError(f"the box {x},{y},{w},{h} is outside the {width}x{height} photo "
                         f"(x + w must be at most {width}, y + h at most {height})")
    return x, y, w, h


def _read(source: RegionSource, catalog: Catalog | None) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, int) and not isinstance(source, bool):
        if catalog is None:
            raise UsageError("a photo id needs the catalog")
        row = catalog.photos_by_id([source]).get(source)
        if row is None:
            raise PhotoNotFound(f"no photo with id {source}")
        source = bytes(row["path_bytes"])
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        name = os.fsdecode(source) if isinstance(source, bytes) else str(source)
        raise BadImage(f"cannot read image {name}: {e.strerror or e}") from e


def region_vector(encoder: Any, source: RegionSource, box: Box, catalog: Catalog | None = None,
                  max_pixels: int = 100_000_000) -> np.ndarray:
    """(D,) L2-normalised embedding of the box of a photo (id, file or bytes) in the encoder's space.

    BadImage when the image cannot be read or decoded, UsageError for a box without area or outside the photo,
    PhotoNotFound for an unknown id. The photo is decoded at full resolution: the box is in its pixels."""
    data = _read(source, catalog)
    try:
        im, _ = open_image(data, max_pixels)
    except DecodeError as e:
        raise BadImage(f"cannot use this image: {e.reason}") from e
    x, y, w, h = check_box(box, *im.size)
    crop = im.crop((x, y, x + w, y + h))
    pixels = preprocess(crop, encoder.preprocess_spec)
    return np.asarray(encoder.encode_pixels(pixels[None])[0], dtype=np.float32)
