"""Search page: natural language or combined queries, filters, strong-only, sort, pagination."""

from __future__ import annotations

from datetime import datetime, time

import streamlit as st

from clipsearch.ui.state import service, show_error
from clipsearch.ui.widgets import describe_panel, result_grid

st.title("Search")
try:
    svc = service()
    with st.sidebar:
        st.subheader("Filters")
        folder = st.text_input("Folder", key="f_folder", placeholder="/photos/2023")
        after = st.date_input("From", value=None, key="f_after")
        before = st.date_input("Until", value=None, key="f_before")
        tags = st.multiselect("Tags", svc.tags.labels(), key="f_tags")
        strong = st.toggle("Strong matches only", key="f_strong")
        sort = st.radio("Sort by", ["relevance", "date"], key="f_sort", horizontal=True)
        per_page = st.select_slider("Per page", [8, 12, 20, 40], value=12, key="f_k")
    query = st.text_input("Describe the photo you want", key="query",
                          placeholder='dog on a beach at sunset   or   "2:dog" - "snow"')
    st.session_state.setdefault("offset", 0)
    if st.session_state.get("last_query") != query:
        st.session_state["offset"], st.session_state["last_query"] = 0, query
        st.session_state.pop("similar_to", None)

    from clipsearch.indexer.storage.filters import PhotoFilter

    flt = PhotoFilter(folder=folder or None, after=datetime.combine(after, time()) if after else None,
                      before=datetime.combine(before, time.max) if before else None, tags=tuple(tags))
    offset = st.session_state["offset"]
    similar_to = st.session_state.get("similar_to")
    page = None
    if similar_to is not None:
        c1, c2 = st.columns([4, 1])
        c1.subheader(f"Photos like #{similar_to}")
        if c2.button("Back to query", key="clear-similar"):
            st.session_state.pop("similar_to", None)
            st.rerun()
        page = svc.similar(int(similar_to), per_page, offset, flt, strong, sort)
    elif query.strip():
        page = svc.search(query, per_page, offset, flt, strong, sort)
    if page is not None:
        result_grid(svc, page, "s")
        prev, info, nxt = st.columns([1, 2, 1])
        if prev.button("◀ Previous", disabled=offset == 0, key="prev"):
            st.session_state["offset"] = max(0, offset - per_page)
            st.rerun()
        info.caption(f"results {offset + 1}–{offset + len(page.hits)}")
        if nxt.button("Next ▶", disabled=not page.has_more, key="next"):
            st.session_state["offset"] = offset + per_page
            st.rerun()
        describe_panel(svc)
except Exception as e:
    show_error(e)
