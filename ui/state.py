"""The one service per process: built by an `st.cache_resource` factory from the environment, never mutated by
pages. Per-user state (query, offset, selections) lives in `st.session_state`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

MAX_UPLOAD_BYTES = int(float(os.environ.get("CLIPSEARCH_MAX_UPLOAD_MB", "20")) * 1024 * 1024)
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp", "heic", "heif", "avif"]


@st.cache_resource(show_spinner="Loading the model…")
def _service(home: str | None, db: str | None, model: str | None) -> Any:
    from indexer.config import AppConfig
    from search import build_service

    kw: dict[str, Any] = {"db_url": db}
    if home:
        kw["home"] = Path(home)
    return build_service(AppConfig(**kw), model)


def service() -> Any:
    """The process-wide SearchService for the configured home/catalog/model."""
    return _service(os.environ.get("CLIPSEARCH_HOME"), os.environ.get("CLIPSEARCH_DB"),
                    os.environ.get("CLIPSEARCH_MODEL"))


def config() -> Any:
    """AppConfig of this UI process (for services that need no model, e.g. status)."""
    from indexer.config import AppConfig

    kw: dict[str, Any] = {"db_url": os.environ.get("CLIPSEARCH_DB")}
    if os.environ.get("CLIPSEARCH_HOME"):
        kw["home"] = Path(os.environ["CLIPSEARCH_HOME"])
    return AppConfig(**kw)


def upload_bytes(upload: Any) -> bytes | None:
    """Bytes of an uploaded file within the size limit (kept in memory, never written to a photo root)."""
    if upload is None:
        return None
    data = upload.getvalue()
    if len(data) > MAX_UPLOAD_BYTES:
        st.error(f"That file is {len(data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
        return None
    return data


def show_error(e: Exception) -> None:
    """A readable message on the page instead of a traceback."""
    from indexer.errors import ClipsearchError

    if isinstance(e, ClipsearchError):
        st.error(str(e))
    else:
        st.error(f"Something went wrong: {type(e).__name__}: {e}")
