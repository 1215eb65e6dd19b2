"""Zero-shot page: classify one image and preview or apply tags for the library, side by side; both results stay
(session state) until run again. Named label sets are saved in the app's home and reused by both.

Labels come from a text box or an uploaded file and templates from a text area, passed to the service as text:
nothing typed here names a file on the server, and nothing is written to a temporary file.
"""

from __future__ import annotations

import os

import streamlit as st

from clipsearch.ui.state import UPLOAD_TYPES, label_sets, save_label_set, service, show_error, upload_bytes
from clipsearch.ui.widgets import labels_input


def _load_set() -> None:
    """Put a saved label set into both label boxes (a callback: it runs before the boxes are drawn)."""
    chosen = st.session_state.get("zs_saved")
    if chosen:
        st.session_state["zs_labels"] = st.session_state["tag_labels"] = label_sets().get(chosen, "")


def _classify_panel(svc) -> None:
    st.subheader("Classify an image")
    upload = st.file_uploader("Image", type=UPLOAD_TYPES, key="zs_upload")
    photo_id = st.number_input("…or a catalogued photo id", min_value=0, value=0, step=1, key="zs_id")
    labels = labels_input("Labels", ", ".join(svc.default_labels()), key="zs_labels")
    templates = st.text_area("Prompt templates (one per line, with {}; empty = default ensemble)", key="zs_tmpl")
    multi = st.checkbox("Multi-label", key="zs_multi")
    if st.button("Classify", key="zs_go", type="primary"):
        ref = upload_bytes(upload) or (int(photo_id) if photo_id else None)
        if ref is None:
            st.warning("Upload an image or give a photo id.")
        else:
            if labels.note():
                st.info(labels.note())
            (res,) = svc.classify([ref], labels.value(), templates or None, multi_label=multi, k=10)
            st.session_state["zs_result"] = res
    res = st.session_state.get("zs_result")
    if res is not None:
        st.success(f"Prediction for {res.source}: {', '.join(res.chosen) or 'none above threshold'}")
        st.bar_chart({"label": [x.label for x in res.labels], "probability": [x.score for x in res.labels]},
                     x="label", y="probability", x_label="label", y_label="probability", horizontal=True,
                     height=40 + 28 * len(res.labels))


def _tag_panel(svc) -> None:
    st.subheader("Tag the library")
    with st.form("tag_form"):
        t_labels = labels_input("Labels", ", ".join(svc.default_labels()), key="tag_labels")
        t_name = st.text_input("Label set name", "zeroshot", key="tag_name")
        t_thr = st.slider("Minimum probability", 0.0, 1.0, 0.5, key="tag_thr")
        t_multi = st.checkbox("Multi-label", key="tag_multi")
        t_strong = st.checkbox("Only confident photos (strong matches)", key="tag_strong",
                               help="Tag a photo only when a search for the label would call it a strong match.")
        t_folder = st.text_input("Only this folder (optional)", key="tag_folder")
        preview, apply = st.columns(2)
        do_preview = preview.form_submit_button("Preview")
        do_apply = apply.form_submit_button("Apply", type="primary")
    if do_preview or do_apply:
        from clipsearch.indexer.storage.filters import PhotoFilter

        if t_labels.note():
            st.info(t_labels.note())
        bar = st.progress(0.0, text="tagging…")
        st.session_state["tag_result"] = svc.tag(
            t_labels.value(), t_name, t_thr, t_multi, PhotoFilter(folder=t_folder or None), dry_run=not do_apply,
            strong_only=t_strong, on_progress=lambda done, total: bar.progress(min(1.0, done / max(1, total))))
        bar.empty()
    result = st.session_state.get("tag_result")
    if result is not None:
        verb = "Preview: would tag" if result.dry_run else f"Applied to '{result.label_set}': {result.written} tags on"
        st.success(f"{verb} {sum(result.counts.values())} of {result.photos_considered} photos")
        st.bar_chart({"label": list(result.counts), "photos": list(result.counts.values())}, x="label", y="photos",
                     x_label="label", y_label="photos tagged", height=260)
        st.dataframe([{"label": k, "photos": v, "examples": ", ".join(os.path.basename(p)
                                                                   for p in result.examples.get(k, []))}
                      for k, v in result.counts.items()], hide_index=True)


def _saved_sets_bar() -> None:
    c1, c2, c3 = st.columns([2, 2, 1])
    c1.selectbox("Saved label sets", [""] + sorted(label_sets()), key="zs_saved", on_change=_load_set,
                 format_func=lambda n: n or "—")
    name = c2.text_input("Save the classify labels as", key="zs_save_name", placeholder="name")
    if c3.button("Save", key="zs_save"):
        save_label_set(name, st.session_state.get("zs_labels", ""))
        st.toast(f"Saved label set '{name.strip()}'.")


def _tag_sets_panel(svc) -> None:
    sets = svc.tags.label_sets()
    if not sets:
        return
    st.subheader("Applied tags")
    c1, c2 = st.columns(2)
    undo = c1.selectbox("Label set", list(sets), key="tag_undo_set")
    if c2.button(f"Undo '{undo}'", key="tag_undo"):
        st.info(f"Removed {svc.remove_tags(undo)} tags of '{undo}'.")
        st.session_state.pop("tag_result", None)
    for fmt in ("csv", "json"):
        st.download_button(f"Download tags ({fmt.upper()})", lambda fmt=fmt: svc.tags_document(fmt),
                           f"tags.{fmt}", key=f"dl_{fmt}")


st.title("Zero-shot")
try:
    svc = service()
    _saved_sets_bar()
    left, right = st.columns(2, gap="large")
    for column, panel in ((left, _classify_panel), (right, _tag_panel)):
        with column:
            try:
                panel(svc)
            except Exception as e:  # one panel's error leaves the other's result on the page
                show_error(e)
    _tag_sets_panel(svc)
except Exception as e:
    show_error(e)
