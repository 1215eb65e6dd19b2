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

    def note(self) -> str | None:
        """What was left out of an uploaded label file (blank or repeated lines), to say so on the page."""
        if self.upload is None:
            return None
        raw = self.upload.getvalue().decode("utf-8-sig", errors="replace").splitlines()
        blank = sum(1 for line in raw if not line.strip())
        kept = [line.strip() for line in raw if line.strip() and not line.strip().startswith("#")]
        repeated = len(kept) - len(set(kept))
        parts = [f"{blank} blank" if blank else "", f"{repeated} repeated" if repeated else ""]
        said = " and ".join(p for p in parts if p)
        return f"{self.upload.name}: {len(set(kept))} labels used; {said} lines ignored." if said else None


def labels_input(label: str, default: str, key: str) -> LabelsInput:
    """A labels text box (a comma list) plus a label-file upload (one per line). What is typed is only ever
    text: a path typed here is a label, never a file read on the server."""
    st.session_state.setdefault(key, default)  # the default once; a saved label set may replace it later
    text = st.text_input(label, key=key, help="Comma-separated; `dog=0.7` sets a label's own threshold.")
    upload = st.file_uploader("…or upload a label file (one label per line)", type=LABEL_FILE_TYPES,
                              key=f"{key}_file")
    return LabelsInput(text, upload)


BADGES = {"strong": ":green-badge[:material/check_circle: strong match]",
          "possible": ":orange-badge[:material/help: possible match]",
          "weak": ":gray-badge[:material/remove: weak match]"}


def counts_line(page: Any) -> str:
    """"12 strong · 30 possible matches" for a text query; nothing for an image query."""
    if page.counts is None:
        return ""
    at_least = "" if page.counts_exact else "at least "
    return (f"**{at_least}{page.counts['strong']} strong** · {page.counts['possible']} possible "
            f"{'match' if page.counts['possible'] == 1 else 'matches'}")


def result_grid(svc: Any, page: Any, key: str, columns: int = 4) -> None:
    """Thumbnails with rank, file name, relevance badge, score and date; "Open" shows the lightbox, "More like
    this" sets per-user state for the next run."""
    if not page.hits:
        st.info("No matches." if page.counts is None else "No strong matches: turn off \"Strong matches only\" "
                "to see the closest photos.")
        return
    cols = st.columns(columns)
    for n, hit in enumerate(page.hits):
        with cols[n % columns]:
            try:
                st.image(svc.thumbnail(hit.id), width="stretch")
            except Exception as e:  # a photo that vanished since indexing: show why, keep the grid
                show_error(e)
            date = hit.date.strftime("%Y-%m-%d") if hit.date else "no date"
            badge = BADGES.get(hit.relevance or "", "")
            st.markdown(f"**{hit.rank}.** {badge}")
            st.caption(f"{os.path.basename(hit.path)} · score {hit.score:.3f} · {date}")
            a, b = st.columns(2)
            if a.button("Open", key=f"{key}-open-{hit.id}", icon=":material/open_in_full:"):
                lightbox(svc, hit.id)
            if b.button("More like this", key=f"{key}-more-{hit.id}"):
                st.session_state["similar_to"] = hit.id
                st.session_state["offset"] = 0
                st.rerun()


@st.dialog("Photo", width="large")
def lightbox(svc: Any, photo_id: int) -> None:
    """The photo large, its metadata and tags, photos like it, and a ranking of the user's own labels."""
    try:
        info = svc.photo_info(photo_id)
        left, right = st.columns([3, 2])
        left.image(svc.thumbnail(photo_id, 1600), width="content")  # its own size, up to the column's width
        size = f"{info.width} × {info.height}" if info.width else "unknown size"
        with right:
            st.markdown(f"**{os.path.basename(info.path)}**  \n{size} · {info.format or '?'} · "
                        f"{info.date.strftime('%Y-%m-%d %H:%M') if info.date else 'no date'}")
            st.caption(f"#{info.id} · {info.path}")
            st.write("Tags: " + (", ".join(info.tags) if info.tags else "none"))
            labels = st.text_input("Describe with my labels", ", ".join(svc.default_labels()), key="lb-labels")
            if labels.strip():
                ranked = svc.describe(photo_id, labels=labels, k=10)
                st.bar_chart({"label": [r.label for r in ranked], "similarity": [r.score for r in ranked]},
                             x="label", y="similarity", x_label="label", y_label="similarity to the photo",
                             horizontal=True, height=40 + 28 * len(ranked))
        st.markdown("**Photos like this**")
        similar = svc.similar(photo_id, 4)
        for col, hit in zip(st.columns(4), similar.hits, strict=False):
            col.image(svc.thumbnail(hit.id), width="stretch")
            col.caption(f"{os.path.basename(hit.path)} · {hit.score:.3f}")
    except Exception as e:
        show_error(e)
