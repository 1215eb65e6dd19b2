"""clipsearch search: text/image/image→text queries, zero-shot classification and batch tagging over what the
indexer wrote. One SearchService serves the CLI, the Python API and the UI."""

from .results import Classification, LabelScore, SearchHit, SearchPage, TagPreview
from .service import SearchService, build_service

__all__ = ["Classification", "LabelScore", "SearchHit", "SearchPage", "SearchService", "TagPreview", "build_service"]
