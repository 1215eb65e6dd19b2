"""Thumbnails of catalogued photos, generated once and cached in the home dir (never the 12 MP original).

Only photos known to the catalog are served, by id: there is no way to ask for an arbitrary path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from clipsearch.indexer.errors import BadImage, PhotoNotFound
from clipsearch.indexer.ingest.decode import load_display_image
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog


def thumbnail(catalog: Catalog, cache_dir: Path, photo_id: int, size: int = 320) -> bytes:
    """JPEG bytes of an upright thumbnail (EXIF orientation applied) no larger than `size` pixels."""
    row = catalog.photos_by_id([int(photo_id)]).get(int(photo_id))
    if row is None or row["status"] != PhotoStatus.INDEXED:
        raise PhotoNotFound(f"no indexed photo with id {photo_id}")
    cached = cache_dir / f"{photo_id}_{size}_{row['mtime_ns']}.jpg"
    if cached.is_file():
        return cached.read_bytes()
    try:
        im = load_display_image(bytes(row["path_bytes"]), size)
    except (OSError, ValueError) as e:
        raise BadImage(f"photo #{photo_id} cannot be shown: {e}") from e
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return data
