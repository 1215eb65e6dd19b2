"""Search by a region of a photo: embed only what is inside a box, so that a small thing in a big photo becomes
the query instead of the whole scene around it (`clipsearch similar PATH|ID --box x,y,w,h`, the lightbox's box).

The box is in the photo's own pixels as a person sees it: after the EXIF orientation is applied, at full
resolution (the size the catalog records as width x height). The crop then goes through the model's own
preprocessing, exactly as a whole photo would, so its vector lives in the same space as the indexed ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


# --- region vectors at index time (opt-in) ---------------------------------------------------------------------------
def grid_boxes(width: int, height: int, grid: int = 3, overlap: float = 0.5) -> list[Box]:
    """A grid x grid layout of boxes, each (1 + overlap) times a cell's side, spread evenly over the photo: an
    object on a cell border still lies whole inside one box."""
    cw, ch = min(width, round(width / grid * (1 + overlap))), min(height, round(height / grid * (1 + overlap)))
    steps = [i / (grid - 1) for i in range(grid)] if grid > 1 else [0.0]
    return [(round((width - cw) * fx), round((height - ch) * fy), cw, ch) for fy in steps for fx in steps]


def _crops(data: bytes, full: tuple[int | None, int | None], spec: Any, grid: int, overlap: float,
           max_pixels: int) -> tuple[list[Box], np.ndarray]:
    """Boxes in full-resolution pixels and their preprocessed crops, decoded at the smallest JPEG scale that
    keeps every crop at least the model's input size."""
    draft = round(spec.size * grid / (1 + overlap)) if full[0] else None
    im, _ = open_image(data, max_pixels, draft_to=draft)
    width, height = full if full[0] and full[1] else im.size
    sx, sy = im.width / width, im.height / height
    boxes = grid_boxes(width, height, grid, overlap)
    pixels = [preprocess(im.crop((round(x * sx), round(y * sy), round((x + w) * sx), round((y + h) * sy))), spec)
              for x, y, w, h in boxes]
    return boxes, np.stack(pixels)


def index_regions(catalog: Catalog, encoder: Any, space: Any, grid: int = 3, overlap: float = 0.5,
                  chunk: int = 32, on_progress: Any = None, max_pixels: int = 100_000_000) -> int:
    """Embed grid crops of every photo of the space that has none for its current content; returns how many
    photos got them. Costs grid**2 embeddings per photo (9 by default): opt-in, for libraries where small things
    matter. A photo that no longer reads is skipped (logged), never fatal."""
    import logging

    from clipsearch.indexer.storage.region_store import RegionStore

    store = RegionStore(catalog)
    todo = store.photos_needing(space.id)
    done = failed = 0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        rows = catalog.photos_by_id([pid for pid, _ in part])
        items: dict[int, tuple[list[Box], np.ndarray]] = {}
        for pid, path in part:
            try:
                with open(path, "rb") as f:
                    boxes, pixels = _crops(f.read(), (rows[pid]["width"], rows[pid]["height"]),
                                           encoder.preprocess_spec, grid, overlap, max_pixels)
            except (OSError, ValueError) as e:
                failed += 1
                logging.getLogger(__name__).debug("no region vectors for #%d: %s", pid, e)
                continue
            items[pid] = (boxes, encoder.encode_pixels(pixels))
        store.put(space.id, items)
        done += len(items)
        if on_progress:
            on_progress(start + len(part), len(todo))
    if failed:
        logging.getLogger(__name__).warning("%d photos could not be read for region vectors", failed)
    return done


@dataclass(frozen=True)
class RegionHit:
    """A photo found by a region query, and where in it the best match was (None: the photo as a whole)."""

    id: int
    path: str
    score: float  # cosine of the query with the photo's vector or its best region vector, whichever is higher
    box: Box | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"id": self.id, "path": self.path, "score": round(self.score, 6),
                "box": list(self.box) if self.box else None}


class RegionIndex:
    """The region vectors of one space, loaded once (a process that answers many queries keeps one and makes a new
    one after `index_regions` ran)."""

    def __init__(self, catalog: Catalog, space_id: int) -> None:
        from clipsearch.indexer.storage.region_store import RegionStore

        self.photo_ids, self.boxes, self.vectors = RegionStore(catalog).load(space_id)

    def __len__(self) -> int:
        return len(self.photo_ids)

    def best(self, qvec: np.ndarray, k: int) -> dict[int, tuple[float, Box]]:
        """Photo id -> (score, box) of its best region, for the k photos whose best region scores highest."""
        if not len(self.photo_ids):
            return {}
        scores = self.vectors @ np.asarray(qvec, np.float32)
        order = np.argsort(-scores, kind="stable")
        out: dict[int, tuple[float, Box]] = {}
        for i in order:
            pid = int(self.photo_ids[i])
            if pid not in out:
                out[pid] = (float(scores[i]), tuple(int(v) for v in self.boxes[i]))  # type: ignore[assignment]
                if len(out) >= k:
                    break
        return out


def search_regions(catalog: Catalog, store: Any, space: Any, qvec: np.ndarray, k: int = 20,
                   exclude: set[int] | None = None, regions: RegionIndex | None = None) -> list[RegionHit]:
    """Rank photos for a (region) query vector by the better of their whole-photo vector and their region vectors
    (index_regions), best first; `exclude` leaves out the photo the region came from."""
    exclude = exclude or set()
    want = k + len(exclude)
    ids, scores = store.search(space, np.asarray(qvec, np.float32)[None, :], want)[0]
    merged: dict[int, tuple[float, Box | None]] = {int(i): (float(s), None) for i, s in zip(ids, scores, strict=True)}
    for pid, (score, box) in (regions or RegionIndex(catalog, space.id)).best(qvec, want).items():
        if pid not in merged or score > merged[pid][0]:
            merged[pid] = (score, box)
    ranked = sorted(((s, pid, box) for pid, (s, box) in merged.items() if pid not in exclude),
                    key=lambda t: (-round(t[0], 6), t[1]))[:k]
    rows = catalog.photos_by_id([pid for _, pid, _ in ranked])
    return [RegionHit(pid, rows[pid]["path"], s, box) for s, pid, box in ranked if pid in rows]
