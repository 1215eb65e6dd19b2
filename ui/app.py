"""clipsearch Streamlit app: navigation over thin pages (ui/pages/*). Start it with `clipsearch ui`."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="clipsearch", page_icon="🔎", layout="wide")
pages = Path(__file__).parent / "pages"
nav = st.navigation([
    st.Page(pages / "search_page.py", title="Search", icon="🔎", default=True),
    st.Page(pages / "image_page.py", title="Image", icon="🖼️"),
    st.Page(pages / "zeroshot_page.py", title="Zero-shot", icon="🏷️"),
    st.Page(pages / "library_page.py", title="Library", icon="📚"),
])
nav.run()
