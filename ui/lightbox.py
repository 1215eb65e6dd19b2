"""The photo lightbox (an `st.dialog`): the photo large with its metadata, tags, caption and the text read from it;
"why did it match" (a heatmap of where the text query matches), a region of the photo to search with, a question
to ask about it, the user's own labels ranked, and photos like it.

Which photo is open lives in `st.session_state` (a LightboxContext, with the query and hit it came from), and the
result grid that opened it draws the dialog again on every run until it is dismissed; so widgets inside it keep
the dialog open, in the browser and in AppTest alike. Answers and heatmaps are kept per user for the open photo,
so typing a question does not recompute the heatmap. Everything shown comes from catalogued ids: nothing a user
types here names a file on the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import streamlit as st

from clipsearch.search.results import OcrMatch

from .markup import draw_box, escape_markdown, explainable_text, highlight_markdown
from .state import answerer, captioner, show_error

KEY = "lightbox"  # session-state key of the open photo's LightboxContext
SEARCH_PAGE = "pages/search_page.py"  # where "More like this" and "Search this region" show their results


@dataclass(frozen=True)
class LightboxContext:
    """Which photo the lightbox shows and what it was found by."""

    photo_id: int
    grid: str  # key of the result grid that opened it: only that grid draws the dialog
    query: str | None = None  # the text query of the results it came from; None for photos found by a photo
    ocr: OcrMatch | None = None  # how its recognised text matched the query (words to highlight), if it did
    stack: tuple[int, ...] = ()  # near-duplicates folded into its result card (stacked results)
    on_search_page: bool = False  # results of a region search can be shown without changing page


def open_lightbox(ctx: LightboxContext) -> None:
    """Open the lightbox for a photo; the grid named in `ctx` draws it (show_lightbox) from this run on."""
    st.session_state[KEY] = ctx
    st.session_state.pop("lb-memo", None)


def show_lightbox(svc: Any, grid: str) -> None:
    """Draw the open lightbox if the grid `grid` opened it (call once per run, after the grid)."""
    ctx = st.session_state.get(KEY)
    if isinstance(ctx, LightboxContext) and ctx.grid == grid:
        lightbox(svc, ctx)


def _dismiss() -> None:
    st.session_state.pop(KEY, None)
    st.session_state.pop("lb-memo", None)


def show_similar(photo_id: int, box: tuple[int, int, int, int] | None, on_search_page: bool) -> None:
    """Show photos like `photo_id` (or like a box of it) on the search page, closing the lightbox. From another page
    the search page is opened with the query box as it was, so the similar results are not dropped as stale."""
    st.session_state.update(similar_to=int(photo_id), similar_box=box, offset=0)
    _dismiss()
    if on_search_page:
        st.rerun()
    st.session_state["query"] = st.session_state["last_query"] = st.session_state.get("last_query") or ""
    st.switch_page(SEARCH_PAGE)


def _memo(name: str, key: Any, make: Any) -> Any:
    """`make()` once per user for the open photo and `key` (heatmaps, answers): the dialog reruns on every widget
    change, and a heatmap costs a model pass."""
    memo = st.session_state.setdefault("lb-memo", {})
    if (name, key) not in memo:
        memo[(name, key)] = make()
    return memo[(name, key)]


@st.dialog("Photo", width="large", on_dismiss=_dismiss)
def lightbox(svc: Any, ctx: LightboxContext) -> None:
    """The photo large (or its heatmap, or the region to search), and beside it what is known and can be asked."""
    try:
        info = svc.photo_info(ctx.photo_id)
    except Exception as e:
        show_error(e)
        return
    left, right = st.columns([3, 2])
    with right:
        _metadata(info)
        why_text = explainable_text(ctx.query)
        why = bool(why_text) and st.toggle("Why did it match?", key="lb-why", help="Where the photo matches "
                                           f"'{escape_markdown(why_text or '')}', as a heatmap.")
        region = st.toggle("Search by a region", key="lb-region",
                           help="Search with a part of the photo only: a small thing in a big scene.")
        xs, ys = _region_sliders() if region else ((0.0, 100.0), (0.0, 100.0))
        for panel in (_caption_panel, _text_panel, _ask_panel, _labels_panel):
            try:
                panel(svc, info, ctx)
            except Exception as e:  # one panel's error leaves the others
                show_error(e)
    with left:
        _picture(svc, info, why_text if why else None, (xs, ys) if region else None)
        if region and st.button("Search this region", key="lb-region-go", icon=":material/crop_free:",
                                type="primary"):
            _search_region(info, ctx, xs, ys)
    _related(svc, ctx)


def _metadata(info: Any) -> None:
    size = f"{info.width} × {info.height}" if info.width else "unknown size"
    when = info.date.strftime("%Y-%m-%d %H:%M") if info.date else "no date"
    st.markdown(f"**{escape_markdown(os.path.basename(info.path))}**  \n{size} · {info.format or '?'} · {when}")
    st.caption(f"#{info.id} · {info.path}")
    st.write("Tags: " + (", ".join(info.tags) if info.tags else "none"))


def _region_sliders() -> tuple[tuple[float, float], tuple[float, float]]:
    """Left–right and top–bottom of the box, in percent of the photo (Streamlit has no box-drawing widget)."""
    xs = st.slider("Region: left – right (% of width)", 0, 100, (25, 75), key="lb-region-x")
    ys = st.slider("Region: top – bottom (% of height)", 0, 100, (25, 75), key="lb-region-y")
    return (float(xs[0]), float(xs[1])), (float(ys[0]), float(ys[1]))


def _picture(svc: Any, info: Any, why_text: str | None, box: Any) -> None:
    """The photo, or its heatmap for `why_text` (the photo again when the heatmap fails, under its error), with the
    region box over either."""
    image: Any = None
    note = None
    try:
        if why_text:
            image, note = _memo("explain", why_text, lambda: _heatmap(svc, info.id, why_text))
    except Exception as e:  # a model without a spatial map, an unreadable file: say why, show the photo
        show_error(e)
    try:
        if image is None:
            image = svc.thumbnail(info.id, 1600)
        if box is not None:
            image = draw_box(image, *box)
        # the photo at its own size (up to the column's width); a heatmap or a box is worth seeing large
        st.image(image, width="stretch" if note or box is not None else "content")
        if note:
            st.caption(note)
    except Exception as e:  # the photo vanished or cannot be decoded: say why, keep the rest
        show_error(e)


def _heatmap(svc: Any, photo_id: int, text: str) -> tuple[bytes, str]:
    """PNG of the heatmap overlay and a line saying how to read it."""
    from clipsearch.search.explain import explain_ref

    heat = explain_ref(svc.catalog, svc.encoder, int(photo_id), text, allow_files=False, max_side=800)
    where = ("the ring marks where it matches best" if heat.peak is not None
             else "no part of the photo stands out for it")
    note = (f"Where '{text}' matches: warm colours match most, {where} · score {heat.score:.3f} · {heat.method}")
    return heat.png_bytes(), note


def _search_region(info: Any, ctx: LightboxContext, xs: tuple[float, float], ys: tuple[float, float]) -> None:
    """Check the box against the photo's size (a one-line error here, in the dialog), then show the results."""
    from clipsearch.indexer.errors import UsageError
    from clipsearch.search.region import check_box

    from .markup import box_pixels

    try:
        if not info.width or not info.height:
            raise UsageError("this photo's size is not recorded: index it again to search by a region")
        box = check_box(box_pixels(xs, ys, info.width, info.height), info.width, info.height)
    except Exception as e:
        show_error(e)
        return
    show_similar(info.id, box, ctx.on_search_page)


def _caption_panel(svc: Any, info: Any, ctx: LightboxContext) -> None:
    """The stored caption, and a button that writes one with the caption model (stored in the catalog)."""
    from clipsearch.search.caption_search import captions_of

    slot = st.empty()
    caption = captions_of(svc.catalog, [info.id]).get(info.id)
    if st.button("Caption this photo" if caption is None else "Caption again", key="lb-caption",
                 icon=":material/subtitles:"):
        from clipsearch.search.captions import caption_library, captioner_label

        from .state import CAPTIONER

        made = caption_library(svc.catalog, captioner(svc), captioner_label(CAPTIONER),
                               space_id=svc.space().id, ids=[info.id])
        caption = made.get(info.id, caption)
    slot.markdown(f"**Caption:** {escape_markdown(caption)}" if caption else "**Caption:** none yet")


def _text_panel(svc: Any, info: Any, ctx: LightboxContext) -> None:
    """The text read from the photo (OCR): the query's words highlighted when it was found by them, else the stored
    text as it is. Nothing when OCR never ran on this library or found no text."""
    if ctx.ocr is not None and ctx.ocr.text.strip():
        st.markdown("**Text in the photo** (words of the query highlighted)  \n"
                    + highlight_markdown(ctx.ocr.text, ctx.ocr.spans))
        return
    store = svc.ocr.store()  # None when OCR never ran here (nothing is created just to look)
    row = store.texts_of([info.id]).get(info.id) if store is not None else None
    if row is None:
        return
    if row["status"] != "ok" and not row["text"].strip():
        st.caption(f"The text of this photo could not be read: {row['reason'] or row['status']}")
    elif row["text"].strip():
        st.markdown("**Text in the photo**  \n" + escape_markdown(row["text"]))


def _ask_panel(svc: Any, info: Any, ctx: LightboxContext) -> None:
    """A question about the photo and the question model's answer with its confidence."""
    from clipsearch.search.questions import ask_ref

    question = st.text_input("Ask about this photo", key="lb-ask", placeholder="what colour is the shape?",
                             max_chars=300)
    if not question.strip():
        return
    answer = _memo("ask", question.strip(), lambda: ask_ref(
        svc.catalog, svc.space().id, svc.encoder, answerer(svc), info.id, question, allow_files=False))
    how = " (from where the heatmap of the object peaks)" if answer.how == "heatmap" else ""
    st.markdown(f"**Answer:** {escape_markdown(answer.text)} · confidence {answer.confidence:.2f}{how}")


def _labels_panel(svc: Any, info: Any, ctx: LightboxContext) -> None:
    """The user's labels ranked by similarity to the photo."""
    labels = st.text_input("Describe with my labels", ", ".join(svc.default_labels()), key="lb-labels")
    if labels.strip():
        ranked = svc.describe(info.id, labels=labels, k=10)
        st.bar_chart({"label": [r.label for r in ranked], "similarity": [r.score for r in ranked]},
                     x="label", y="similarity", x_label="label", y_label="similarity to the photo",
                     horizontal=True, height=40 + 28 * len(ranked))


def _related(svc: Any, ctx: LightboxContext) -> None:
    """The near-duplicates stacked under this result (stacked results only), and photos like it."""
    try:
        if ctx.stack:
            st.markdown("**Near-duplicates in this stack**")
            for col, pid in zip(st.columns(4), ctx.stack[:4], strict=False):
                col.image(svc.thumbnail(pid), width="stretch")
                col.caption(f"#{pid}")
        st.markdown("**Photos like this**")
        for col, hit in zip(st.columns(4), svc.similar(ctx.photo_id, 4).hits, strict=False):
            col.image(svc.thumbnail(hit.id), width="stretch")
            col.caption(f"{os.path.basename(hit.path)} · {hit.score:.3f}")
    except Exception as e:
        show_error(e)
