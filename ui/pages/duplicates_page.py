"""Duplicates page: groups of exact and near-duplicate photos (resized, recompressed, cropped or edited copies) side
by side, with what a person needs to choose which to keep: file size, dimensions, date and path, and the copy the
group suggests keeping. clipsearch never deletes or moves a photo: the page only shows.

The groups found here are saved in the app's cache (search/stacks.py save_groups), so the Search page's "Stack
near-duplicates" uses them instead of grouping again. The result stays (session state) until found again.
"""

from __future__ import annotations

import os
from typing import Any

import streamlit as st

from clipsearch.search.duplicate_defaults import DEFAULT_PHASH_MAX, DEFAULT_THRESHOLD
from clipsearch.ui.markup import human_size
from clipsearch.ui.state import service, show_error

MAX_GROUPS = 60  # groups drawn on the page (each is a row of thumbnails); `clipsearch duplicates --json` lists all
PER_ROW = 5  # members side by side before the row wraps


def _find(svc: Any, threshold: float, phash_max: int) -> list[Any]:
    """Group the library with a progress bar, and save the groups for stacked search results."""
    from clipsearch.indexer.ingest.cores import usable_cores
    from clipsearch.search.duplicates import DuplicateOptions, find_duplicate_groups
    from clipsearch.search.stacks import save_groups

    space = svc.space()  # EmptyLibrary (one line) before any work when nothing is indexed with this model
    bar = st.progress(0.0, text="Reading each photo's pixels once (kept for next time)…")
    stages = {"signatures": "Reading pixels", "model": "Comparing embeddings", "layout": "Comparing layouts"}

    def progress(stage: str, done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(1, total)), text=f"{stages.get(stage, stage)}: {done} / {total}")

    groups = find_duplicate_groups(svc.catalog, space, threshold, phash_max,
                                   options=DuplicateOptions(workers=usable_cores()), on_progress=progress)
    bar.empty()
    if svc.cache_dir is not None:
        try:
            save_groups(svc.cache_dir, space, groups, threshold, phash_max)
        except OSError as e:  # stacking then groups again on its own: worth a word, not a failure
            st.caption(f"The groups could not be saved for stacked search results: {e.strerror or e}")
    return groups


def _member(svc: Any, member: Any, keep: bool) -> None:
    try:
        st.image(svc.thumbnail(member.id), width="stretch")
    except Exception as e:  # a photo that vanished since indexing: say so, keep the group
        show_error(e)
    badge = (":green-badge[:material/check_circle: keep (suggested)]" if keep
             else ":gray-badge[:material/content_copy: copy]")
    st.markdown(f"{badge} **#{member.id}**")
    size = f"{member.width} × {member.height}" if member.width else "unknown size"
    date = member.date.strftime("%Y-%m-%d %H:%M") if member.date else "no date"
    st.caption(f"{human_size(member.size)} · {size} · {member.format or '?'} · {date}")
    st.caption(f"{os.path.basename(member.path)} — {member.path}")


def _show(svc: Any, groups: list[Any]) -> None:
    if not groups:
        st.info("No duplicates found with these thresholds.")
        return
    photos = sum(len(g.members) for g in groups)
    copies = sum(m.size for g in groups for m in g.members[1:])
    st.success(f"{len(groups)} {'group' if len(groups) == 1 else 'groups'} of duplicates · {photos} photos · "
               f"{human_size(copies)} in copies")
    for n, group in enumerate(groups[:MAX_GROUPS], 1):
        kind = "identical files" if group.exact else "near-duplicates"
        st.subheader(f"Group {n}: {len(group.members)} photos ({kind})", divider="gray")
        for start in range(0, len(group.members), PER_ROW):
            row = group.members[start : start + PER_ROW]
            for col, member in zip(st.columns(PER_ROW), row, strict=False):
                with col:
                    _member(svc, member, member.id == group.keep.id)
    if len(groups) > MAX_GROUPS:
        st.info(f"Showing {MAX_GROUPS} of {len(groups)} groups: `clipsearch duplicates --json` lists them all.")


st.title("Duplicates")
st.caption("Exact copies and resized, recompressed, slightly cropped or edited copies of a photo, grouped. "
           "**clipsearch never deletes or moves a photo**: each group only suggests the copy to keep (most pixels, "
           "then the largest file, then the oldest).")
try:
    svc = service()
    c1, c2 = st.columns(2)
    threshold = c1.slider("Similarity of a candidate pair (cosine)", 0.5, 1.0, DEFAULT_THRESHOLD, 0.01,
                          key="dup_thr", help="Pairs of photos at least this similar to the model are compared "
                                              "pixel by pixel (higher: fewer candidates).")
    phash_max = c2.slider("Largest pixel difference (bits of 63)", 0, 20, DEFAULT_PHASH_MAX, key="dup_phash",
                          help="How far the perceptual hashes of two copies may differ (higher: looser).")
    if st.button("Find duplicates", key="dup_go", type="primary", icon=":material/content_copy:"):
        st.session_state.pop("dup_result", None)  # a failed search leaves no older result under its error
        st.session_state["dup_result"] = _find(svc, threshold, phash_max)
    if "dup_result" in st.session_state:
        _show(svc, st.session_state["dup_result"])
except Exception as e:
    show_error(e)
