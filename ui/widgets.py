"""Rendering shared by pages: the result grid with "more like this" and "describe" on every hit, and the labels
input (a text box or an uploaded file: never a path on the server)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import streamlit as st

from .state import LABEL_FILE_TYPES, show_error


@dataclass(frozen=True)
class LabelsInput:
    """What the user gave as labels: typed text, and an uploaded label file that wins when present."""

    text: str
    upload: Any = None

    def value(self) -> str | list[str]:
        """The labels to pass to the service (UsageError for an upload that is not UTF-8 text). Read when used, not
        while a form is drawn, so a bad file becomes one message after the form."""
        from clipsearch.search.zeroshot import label_lines

        if self.upload is None:
            return self.text
        return label_lines(self.upload.getvalue(), self.upload.name)


def labels_input(label: str, default: str, key: str) -> LabelsInput:
    """A labels text box (a comma list) plus a label-file upload (one per line). What is typed is only ever
    text: a path typed here is a label, never a file read on the server."""
    text = st.text_input(label, default, key=key, help="Comma-separated; `dog=0.7` sets a label's own threshold.")
    upload = st.file_uploader("…or upload a label file (one label per line)", type=LABEL_FILE_TYPES,
                              key=f"{key}_file")
    return LabelsInput(text, upload)


def result_grid(svc: Any, page: Any, key: str, columns: int = 4) -> None:
    """Thumbnails with file name, score and date; buttons set per-user state for the next run."""
    if not page.hits:
        st.info("No matches.")
        return
    cols = st.columns(columns)
    for n, hit in enumerate(page.hits):
        with cols[n % columns]:
            try:
                st.image(svc.thumbnail(hit.id), width="stretch")
            except Exception as e:  # a photo that vanished since indexing: show why, keep the grid
                show_error(e)
            date = hit.date.strftime("%Y-%m-%d") if hit.date else "no date"
            st.caption(f"**{os.path.basename(hit.path)}** · {hit.score:.3f} · {date}")
            a, b = st.columns(2)
            if a.button("More like this", key=f"{key}-more-{hit.id}"):
                st.session_state["similar_to"] = hit.id
                st.session_state["offset"] = 0
                st.rerun()
            if b.button("Describe", key=f"{key}-desc-{hit.id}"):
                st.session_state["describe"] = hit.id


def describe_panel(svc: Any) -> None:
    """Image→text for the photo the user asked to describe (built-in vocabulary)."""
    pid = st.session_state.get("describe")
    if pid is None:
        return
    with st.expander(f"Describe photo #{pid}", expanded=True):
        try:
            for r in svc.describe(int(pid), vocab="imagenet", k=5):
                st.write(f"{r.score:.3f} — {r.label}")
        except Exception as e:
            show_error(e)
