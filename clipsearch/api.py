"""The Python API: one `Library` per home dir, with the same wiring as the CLI and the UI.

A script author wants a few lines, not the parts: `clipsearch.open(...)` reads the same settings as the CLI
(environment and arguments, through `load_config`), and each method builds what it needs on first use, so
`status()` never loads a model and the model is loaded once for all queries.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipsearch.indexer.config import AppConfig, IndexOptions
    from clipsearch.indexer.pipeline import IndexReport
    from clipsearch.indexer.storage.ocr_store import OcrReport
    from clipsearch.search.results import Classification, LabelScore, SearchPage, TagPreview
    from clipsearch.search.service import SearchService


class Library:
    """A photo library: its catalog, vector indexes and model, opened from an AppConfig."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._service: SearchService | None = None
        self.last_ocr: OcrReport | None = None  # what the OCR stage of the last index(..., ocr=True) did

    @property
    def service(self) -> SearchService:
        """The SearchService (loads the model on first use)."""
        if self._service is None:
            from clipsearch.search import build_service

            self._service = build_service(self.config)
        return self._service

    def index(self, paths: Iterable[str | Path], options: IndexOptions | None = None, ocr: bool = False) -> IndexReport:
        """Index folders incrementally (new, changed, moved and removed photos); returns the run's report. With
        `ocr`, the text in the photos is read too (pip install 'clipsearch[ocr]'); `last_ocr` reports that stage."""
        from clipsearch.indexer.app import build_indexer
        from clipsearch.indexer.config import IndexOptions

        indexer = build_indexer(self.config, options or IndexOptions())
        report = indexer.run([Path(p).expanduser() for p in paths], ocr=ocr)
        self.last_ocr = indexer.last_ocr
        self._service = None  # the next query sees the new photos (and the model the library now uses)
        return report

    def ocr(self, retry_failed: bool = False, workers: int = 1) -> OcrReport:
        """Read the text in every indexed photo that has none yet for its content (and, with retry_failed, those
        whose OCR failed), in `workers` processes; no model is loaded. Then `search('text:"..."')` finds them."""
        from clipsearch.indexer.app import open_parts
        from clipsearch.indexer.ingest.ocr import require_engine
        from clipsearch.indexer.lock import hold_writer_lock
        from clipsearch.search.ocr_search import ocr_library

        require_engine()
        parts = open_parts(self.config)
        try:
            with hold_writer_lock(self.config.home, self.config.db_url):
                return ocr_library(parts.catalog, retry_failed, workers)
        finally:
            parts.catalog.dispose()

    def status(self) -> dict[str, Any]:
        """Counts by status, failures, embedding spaces and paths (no model is loaded)."""
        from clipsearch.ui.status import status_data

        return status_data(self.config)

    def search(self, query: str, k: int = 20, *, stack: bool = False, **kwargs: Any) -> SearchPage:
        """Text→image search (combined syntax and `text:"words in the photo"` allowed); `stack` folds
        near-duplicates into one hit with a count (hit.stack); kwargs as SearchService.search."""
        return self.service.search(query, k, stack=stack, **kwargs)

    def similar(self, image: int | str | bytes, k: int = 20, *,
                box: tuple[int, int, int, int] | str | None = None, stack: bool = False, **kwargs: Any) -> SearchPage:
        """Photos like an indexed photo id, an image file or image bytes; `box` (x, y, w, h in the photo's upright
        pixels) searches with that region only; `stack` as in search."""
        return self.service.similar(image, k, box=box, stack=stack, **kwargs)

    def describe(self, image: int | str | bytes, labels: str | builtins.list[str], k: int = 10) -> list[LabelScore]:
        """Rank your labels (a comma list or a list of strings) for one photo."""
        return self.service.describe(image, labels=labels, k=k)

    def classify(self, images: builtins.list[int | str | bytes], labels: str | builtins.list[str],
                 **kwargs: Any) -> builtins.list[Classification]:
        """Zero-shot classification of photos (ids, files or bytes) into your labels."""
        return self.service.classify(images, labels, **kwargs)

    def tag(self, labels: str | builtins.list[str], name: str | None = None, **kwargs: Any) -> TagPreview:
        """Batch-tag the library with your labels (dry_run=True previews without writing)."""
        return self.service.tag(labels, name, **kwargs)


def open(home: str | Path | None = None, model: str | None = None, db: str | None = None,  # noqa: A001
         device: str | None = None) -> Library:
    """Open (or create) the library in `home` (default: $CLIPSEARCH_HOME or the per-user data dir)."""
    from clipsearch.indexer.config import load_config

    return Library(load_config(home=home, model=model, db=db, device=device))


def make_sample(folder: str | Path, count: int = 60, seed: int = 0) -> Path:
    """Write a captioned, photo-like sample library (coloured shapes on backgrounds) to try clipsearch offline."""
    from clipsearch.indexer.model.sample import make_sample as _make

    out = Path(folder).expanduser()
    _make(out, count, seed)
    return out
