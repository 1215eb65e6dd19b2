"""Catalog-side photo filters. They resolve to an id allow-list that the vector search applies inside FAISS
(an IDSelector), so a filtered top-k is a true top-k, not a post-filtered shortfall."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import and_, func, or_, select

from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.schema import embeddings, photos, tag_labels, tags


@dataclass(frozen=True)
class PhotoFilter:
    """Restrictions on which photos a query may return; empty means everything."""

    folder: str | None = None  # path prefix (a folder and everything below it)
    after: datetime | None = None  # photo date >= after (EXIF capture time, else file mtime)
    before: datetime | None = None  # photo date < before
    tags: tuple[str, ...] = field(default_factory=tuple)  # photo must carry every one of these tag labels
    formats: tuple[str, ...] = field(default_factory=tuple)  # JPEG, PNG, HEIF, ... (any of)

    def is_empty(self) -> bool:
        """True when no restriction is set (the search then needs no allow-list)."""
        return not (self.folder or self.after or self.before or self.tags or self.formats)


def filter_ids(catalog: Catalog, space_id: int, flt: PhotoFilter) -> np.ndarray | None:
    """Ids of photos with a vector in the space that pass the filter; None when the filter is empty."""
    if flt.is_empty():
        return None
    conds = [embeddings.c.space_id == space_id]
    if flt.folder:
        prefix = flt.folder.rstrip("/")
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conds.append(or_(photos.c.folder == prefix, photos.c.folder.like(escaped + "/%", escape="\\")))
    if flt.after:
        conds.append(photos.c.date >= flt.after)
    if flt.before:
        conds.append(photos.c.date < flt.before)
    if flt.formats:
        conds.append(func.upper(photos.c.format).in_([f.upper() for f in flt.formats]))
    q = select(photos.c.id).join(embeddings, embeddings.c.photo_id == photos.c.id).where(and_(*conds))
    for label in flt.tags:
        label_ids = select(tag_labels.c.id).where(tag_labels.c.label == label)
        q = q.where(photos.c.id.in_(select(tags.c.photo_id).where(tags.c.label_id.in_(label_ids))))
    with catalog.engine.connect() as conn:
        return np.fromiter(conn.execute(q).scalars(), dtype=np.int64)
