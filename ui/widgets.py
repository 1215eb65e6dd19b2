"""Rendering shared by pages: the result grid with "open" (the lightbox, ui/lightbox.py) and "more like this" on
every hit, and the labels input (a text box or an uploaded file: never a path on the server)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import streamlit as st

from .lightbox import LightboxContext, open_lightbox, show_lightbox, show_similar
from .markup import highlight_markdown, snippet
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


STACK_BADGE = ":violet-badge[:material/layers: +{n} near-{word}]"


def result_grid(svc: Any, page: Any, key: str, columns: int = 4, query: str | None = None,
                on_search_page: bool = False) -> None:
    """Thumbnails with rank, file name, relevance badge, score and date (plus a stack badge and the words of the
    query read in the photo, when the hit has them); "Open" shows the lightbox, "More like this" sets per-user state
    for the next run. `query`: the text query of these results, for the lightbox's "why did it match"."""
    if not page.hits:
        st.info("No matches." if page.counts is None else "No strong matches: turn off \"Strong matches only\" "
                "to see the closest photos.")
    cols = st.columns(columns) if page.hits else []
    for n, hit in enumerate(page.hits):
        with cols[n % columns]:
            _card(svc, hit, key, query, on_search_page)
    show_lightbox(svc, key)


def _card(svc: Any, hit: Any, key: str, query: str | None, on_search_page: bool) -> None:
    """One result: its thumbnail, what it is, and its buttons; the hit travels into the lightbox's context."""
    try:
        st.image(svc.thumbnail(hit.id), width="stretch")
    except Exception as e:  # a photo that vanished since indexing: show why, keep the grid
        show_error(e)
    date = hit.date.strftime("%Y-%m-%d") if hit.date else "no date"
    badges = [BADGES.get(hit.relevance or "", "")]
    folded = hit.stack.count - 1 if hit.stack is not None else 0
    if folded > 0:
        badges.append(STACK_BADGE.format(n=folded, word="duplicate" if folded == 1 else "duplicates"))
    st.markdown(" ".join([f"**{hit.rank}.**", *[b for b in badges if b]]))
    st.caption(f"{os.path.basename(hit.path)} · score {hit.score:.3f} · {date}")
    if hit.ocr is not None and hit.ocr.text.strip():
        line, spans = snippet(hit.ocr.text, hit.ocr.spans)
        st.markdown(":material/text_fields: " + highlight_markdown(line, spans))
    a, b = st.columns(2)
    if a.button("Open", key=f"{key}-open-{hit.id}", icon=":material/open_in_full:"):
        stack = tuple(hit.stack.ids[1:]) if hit.stack is not None else ()
        open_lightbox(LightboxContext(hit.id, key, query, hit.ocr, stack, on_search_page))
    if b.button("More like this", key=f"{key}-more-{hit.id}"):
        show_similar(hit.id, None, on_search_page)
