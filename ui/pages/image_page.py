"""Image page: upload a photo or pick a catalogued one → similar photos and image→text ranking."""

from __future__ import annotations

import streamlit as st

from clipsearch.ui.state import UPLOAD_TYPES, service, show_error, upload_bytes
from clipsearch.ui.widgets import labels_input, result_grid

st.title("Image")
try:
    svc = service()
    upload = st.file_uploader("Upload a photo", type=UPLOAD_TYPES, key="img_upload")
    photo_id = st.number_input("…or a catalogued photo id", min_value=0, value=0, step=1, key="img_id")
    ref = upload_bytes(upload) or (int(photo_id) if photo_id else None)
    if ref is not None:
        if isinstance(ref, int):
            st.image(svc.thumbnail(ref), width=240)
        else:
            st.image(ref, width=240)
        source = st.radio("Rank texts from", ["labels", "vocabulary", "caption collection"], horizontal=True,
                          key="img_source")
        if source == "labels":
            labels = labels_input("Labels (comma-separated)", ", ".join(svc.default_labels()), key="img_labels")
            if labels.note():
                st.info(labels.note())
            ranked = svc.describe(ref, labels=labels.value(), k=10)
        elif source == "vocabulary":
            ranked = svc.describe(ref, vocab="imagenet", k=10)
        else:
            names = svc.texts.names(svc.space(require_photos=False).id)
            name = st.selectbox("Collection", names, key="img_texts")
            ranked = svc.describe(ref, texts=name, k=10) if name else []
            if not names:
                st.info("No caption collections yet: add one with `clipsearch texts add FILE --name NAME`.")
        st.subheader("Best matching texts")
        for r in ranked:
            st.write(f"{r.score:.3f} — {r.label}")
        st.subheader("Similar photos")
        result_grid(svc, svc.similar(ref, 8), "i")
except Exception as e:
    show_error(e)
