"""clipsearch search: text/image/image→text queries, zero-shot classification and batch tagging over what the
indexer wrote. One SearchService serves the CLI, the Python API and the UI.

The service is imported on first use, so `import clipsearch.search.tagging` (tag export and removal, no model)
loads neither the service nor the vector store and FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .results import Classification, LabelScore, SearchHit, SearchPage, TagPreview

if TYPE_CHECKING:
    from .service import SearchService, build_service

__all__ = ["Classification", "LabelScore", "SearchHit", "SearchPage", "SearchService", "TagPreview", "build_service"]


def __getattr__(name: str) -> Any:
    """SearchService and build_service, imported when first asked for."""
    if name in ("SearchService", "build_service"):
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
