"""The one service per process: built by an `st.cache_resource` factory from the environment, never mutated by
pages. Per-user state (query, offset, selections) lives in `st.session_state`.

The UI never reads a file on the server because of what a user typed: its service refuses file terms in queries
and file paths as images (`allow_files=False`), labels come from a text box or an uploaded file, and indexing is
limited to the roots the UI was started with (`clipsearch ui --roots DIR`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import streamlit as st

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp", "heic", "heif", "avif"]
LABEL_FILE_TYPES = ["txt", "csv", "lst"]


@st.cache_resource(show_spinner="Loading the model…")
def _service(cfg: Any) -> Any:
    from clipsearch.search.service import SearchOptions, build_service

    return build_service(cfg, SearchOptions(allow_files=False))


CAPTIONER = "demo"  # the caption model the lightbox offers: the bundled one, for libraries indexed with the demo model
ANSWERER = "demo"  # the question model the lightbox offers, likewise


@st.cache_resource(show_spinner="Loading the caption model…")
def _captioner(spec: str, space_key: str, _encoder: Any) -> Any:
    from clipsearch.search.captions import load_captioner

    return load_captioner(spec, _encoder)


@st.cache_resource(show_spinner="Loading the question model…")
def _answerer(spec: str, space_key: str, _encoder: Any) -> Any:
    from clipsearch.search.questions import load_answerer

    return load_answerer(spec, _encoder)


def captioner(svc: Any) -> Any:
    """The caption model for the service's embedding space, loaded once per process and space (its weights are
    read-only, so every session shares it). A model it cannot read is a one-line error, retried on the next ask."""
    return _captioner(CAPTIONER, svc.encoder.space.key, svc.encoder)


def answerer(svc: Any) -> Any:
    """The question model for the service's embedding space, loaded once per process and space (as captioner)."""
    return _answerer(ANSWERER, svc.encoder.space.key, svc.encoder)


def config() -> Any:
    """AppConfig of this UI process, from the environment `clipsearch ui` set (load_config, as everywhere)."""
    from clipsearch.indexer.config import load_config

    return load_config()


def service() -> Any:
    """The process-wide SearchService for the configured home/catalog/model (server files refused)."""
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


def folder_under_roots(folder: str, roots: Iterable[Path]) -> Path:
    """The real path of `folder` if it lies under one of `roots` (symlinks and `..` resolved first), else a
    UsageError. The check comes before any look at the folder, so a refusal says nothing about what exists."""
    from clipsearch.indexer.errors import UsageError

    roots = [Path(os.path.realpath(r)) for r in roots]
    if not roots:
        raise UsageError("Indexing from the UI is off: start it with `clipsearch ui --roots DIR` to allow folders.")
    shown = ", ".join(str(r) for r in roots)
    raw = Path(folder.strip()).expanduser()
    if not folder.strip() or not raw.is_absolute():
        raise UsageError(f"Give the full path of a folder under: {shown}")
    real = Path(os.path.realpath(raw))
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise UsageError(f"{folder.strip()} is outside the folders this UI may index ({shown}).")
    if not real.is_dir():
        raise UsageError(f"{folder.strip()} is not a folder.")
    return real


LABEL_SETS_FILE = "label-sets.json"  # named label sets saved from the Zero-shot page, in the app's home


def label_sets() -> dict[str, str]:
    """Saved label sets (name → labels as typed), from the home; {} when none or unreadable."""
    import json

    path = config().home / LABEL_SETS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_label_set(name: str, labels: str) -> None:
    """Save (or replace) a named label set in the home, atomically; a blank name or list is refused."""
    import json

    from clipsearch.indexer.errors import UsageError
    from clipsearch.search.zeroshot import parse_labels

    name = name.strip()
    if not name or len(name) > 100:
        raise UsageError("Give the label set a name (up to 100 characters).")
    names = [lab.name for lab in parse_labels(labels)]
    sets = {**label_sets(), name: ", ".join(names)}
    path = config().home / LABEL_SETS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sets, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def show_error(e: Exception) -> None:
    """A readable message on the page instead of a traceback."""
    from clipsearch.indexer.errors import ClipsearchError

    if isinstance(e, ClipsearchError):
        st.error(str(e))
    else:
        st.error(f"Something went wrong: {type(e).__name__}: {e}")
