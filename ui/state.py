"""The one service per process: built by an `st.cache_resource` factory from the environment, never mutated by
pages. Per-user state (query, offset, selections) lives in `st.session_state`."""

from __future__ import annotations

from typing import Any

import streamlit as st

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp", "heic", "heif", "avif"]


@st.cache_resource(show_spinner="Loading the model…")
def _service(cfg: Any) -> Any:
    from clipsearch.search import build_service

    return build_service(cfg)


def config() -> Any:
    """AppConfig of this UI process, from the environment `clipsearch ui` set (load_config, as everywhere)."""
    from clipsearch.indexer.config import load_config

    return load_config()


def service() -> Any:
    """The process-wide SearchService for the configured home/catalog/model."""
    return _service(config())


def upload_bytes(upload: Any) -> bytes | None:
    """Bytes of an uploaded file within the size limit (kept in memory, never written to a photo root)."""
    if upload is None:
        return None
    data = upload.getvalue()
    limit = config().max_upload_mb * 1024 * 1024
    if len(data) > limit:
        st.error(f"That file is {len(data) / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB.")
        return None
    return data


def show_error(e: Exception) -> None:
    """A readable message on the page instead of a traceback."""
    from clipsearch.indexer.errors import ClipsearchError

    if isinstance(e, ClipsearchError):
        st.error(str(e))
    else:
        st.error(f"Something went wrong: {type(e).__name__}: {e}")
