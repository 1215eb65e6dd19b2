"""Zero-shot page: classify one image with labels (+ templates); batch-tag the library with preview and undo.

Labels come from a text box or an uploaded file and templates from a text area, passed to the service as text:
nothing typed here names a file on the server, and nothing is written to a temporary file.
"""

from __future__ import annotations

import os

import streamlit as st

from clipsearch.ui.state import UPLOAD_TYPES, service, show_error, upload_bytes
from clipsearch.ui.widgets import labels_input

st.title("Zero-shot")
try:
    svc = service()
    st.subheader("Classify an image")
    upload = st.file_uploader("Image", type=UPLOAD_TYPES, key="zs_upload")
    photo_id = st.number_input("…or a catalogued photo id", min_value=0, value=0, step=1, key="zs_id")
    labels = labels_input("Labels", "circle, square, triangle, star, hexagon, cross", key="zs_labels")
    templates = st.text_area("Prompt templates (one per line, with {}; empty = default ensemble)", key="zs_tmpl")
    multi = st.checkbox("Multi-label", key="zs_multi")
    if st.button("Classify", key="zs_go"):
        ref = upload_bytes(upload) or (int(photo_id) if photo_id else None)
        if ref is None:
            st.warning("Upload an image or give a photo id.")
        else:
            (res,) = svc.classify([ref], labels.value(), templates or None, multi_label=multi, k=10)
            st.bar_chart({x.label: x.score for x in res.labels}, horizontal=True)
            st.success(f"Prediction: {', '.join(res.chosen) or 'none above threshold'}")

    st.divider()
    st.subheader("Tag the library")
    with st.form("tag_form"):
        t_labels = labels_input("Labels", "", key="tag_labels")
        t_name = st.text_input("Label set name", "zeroshot", key="tag_name")
        t_thr = st.slider("Minimum probability", 0.0, 1.0, 0.5, key="tag_thr")
        t_multi = st.checkbox("Multi-label", key="tag_multi")
        t_folder = st.text_input("Only this folder (optional)", key="tag_folder")
        preview, apply = st.columns(2)
        do_preview = preview.form_submit_button("Preview")
        do_apply = apply.form_submit_button("Apply")
    if do_preview or do_apply:
        from clipsearch.indexer.storage.filters import PhotoFilter

        bar = st.progress(0.0, text="tagging…")
        result = svc.tag(t_labels.value(), t_name, t_thr, t_multi, PhotoFilter(folder=t_folder or None),
                         dry_run=not do_apply,
                         on_progress=lambda done, total: bar.progress(min(1.0, done / max(1, total))))
        bar.progress(1.0, text="done")
        verb = "Would tag" if result.dry_run else f"Tagged ({result.written} tags written)"
        st.write(f"{verb}: {result.photos_considered} photos considered")
        st.table([{"label": k, "photos": v, "examples": ", ".join(os.path.basename(p)
                                                               for p in result.examples.get(k, []))}
                  for k, v in result.counts.items()])
    sets = svc.tags.label_sets()
    if sets:
        c1, c2 = st.columns(2)
        undo = c1.selectbox("Label set", list(sets), key="tag_undo_set")
        if c2.button(f"Undo '{undo}'", key="tag_undo"):
            st.info(f"Removed {svc.remove_tags(undo)} tags of '{undo}'.")
        for fmt in ("csv", "json"):
            st.download_button(f"Download tags ({fmt.upper()})", lambda fmt=fmt: svc.tags_document(fmt),
                               f"tags.{fmt}", key=f"dl_{fmt}")
except Exception as e:
    show_error(e)
