"""Search page: a text query (or an example chip), filters, strong-only, sort, near-duplicate stacks and pages; each
result shows its rank and calibrated relevance (strong / possible / weak), and opens in a lightbox. Photos like a
photo (or like a region of it, from the lightbox) are shown here too."""

from __future__ import annotations

from datetime import datetime, time

import streamlit as st

from clipsearch.indexer.errors import ClipsearchError
from clipsearch.ui.state import service, show_error
from clipsearch.ui.widgets import counts_line, result_grid


def _use_example() -> None:
    """A chip puts its query into the search box (a callback runs before the box is drawn)."""
    chosen = st.session_state.get("examples")
    if chosen:
        st.session_state["query"] = chosen
    st.session_state["examples"] = None


st.title("Search")
try:
    svc = service()
    with st.sidebar:
        st.subheader("Filters")
        folder = st.text_input("Folder", key="f_folder", placeholder="a folder of the library")
        after = st.date_input("From", value=None, key="f_after")
        before = st.date_input("Until", value=None, key="f_before")
        tags = st.multiselect("Tags", svc.tags.labels(), key="f_tags")
        strong = st.toggle("Strong matches only", key="f_strong",
                           help="Photos the model is confident about: the query beats its own contradictions.")
        sort = st.radio("Sort by", ["relevance", "date"], key="f_sort", horizontal=True)
        stack = st.toggle("Stack near-duplicates", key="f_stack",
                          help="Show resized, recompressed or edited copies of a photo as one result, with a badge "
                               "saying how many copies it stands for.")
        per_page = st.select_slider("Per page", [8, 12, 20, 40], value=12, key="f_k")
    try:
        examples = svc.example_queries()
    except ClipsearchError:  # nothing indexed yet: the search below says so
        examples = []
    query = st.text_input("Describe the photo you want", key="query",
                          placeholder=examples[0] if examples else "a dog on a beach at sunset")
    if examples:
        st.pills("Try", examples, key="examples", on_change=_use_example)
    st.session_state.setdefault("offset", 0)
    if st.session_state.get("last_query") != query:
        st.session_state["offset"], st.session_state["last_query"] = 0, query
        st.session_state.pop("similar_to", None)
        st.session_state.pop("similar_box", None)

    from clipsearch.indexer.storage.filters import PhotoFilter

    flt = PhotoFilter(folder=folder or None, after=datetime.combine(after, time()) if after else None,
                      before=datetime.combine(before, time.max) if before else None, tags=tuple(tags))
    offset = st.session_state["offset"]
    similar_to = st.session_state.get("similar_to")
    box = st.session_state.get("similar_box")
    page = None
    if similar_to is not None:
        c1, c2 = st.columns([4, 1])
        c1.subheader(f"Photos like this region of #{similar_to}" if box else f"Photos like #{similar_to}")
        if box:
            c1.caption("region x, y, width, height: {}, {}, {}, {} pixels".format(*box))
        if c2.button("Back to query", key="clear-similar"):
            st.session_state.pop("similar_to", None)
            st.session_state.pop("similar_box", None)
            st.rerun()
        page = svc.similar(int(similar_to), per_page, offset, flt, strong, sort, box=box, stack=stack)
    elif query.strip():
        page = svc.search(query, per_page, offset, flt, strong, sort, stack=stack)
    elif st.session_state.get("last_query") is not None and query != "" and not query.strip():
        st.warning("The query is empty: type what the photos you want show.")
    if page is not None:
        if page.note:
            st.warning(page.note)
        summary = counts_line(page)
        if summary:
            st.markdown(f"{summary} · sorted by {sort}" + (" · near-duplicates stacked" if stack else ""))
        result_grid(svc, page, "s", query=None if similar_to is not None else query, on_search_page=True)
        prev, info, nxt = st.columns([1, 2, 1])
        if prev.button("Previous", disabled=offset == 0, key="prev", icon=":material/chevron_left:"):
            st.session_state["offset"] = max(0, offset - per_page)
            st.rerun()
        if page.hits:
            info.caption(f"results {offset + 1}–{offset + len(page.hits)}")
        if nxt.button("Next", disabled=not page.has_more, key="next", icon=":material/chevron_right:"):
            st.session_state["offset"] = offset + per_page
            st.rerun()
except Exception as e:
    show_error(e)
