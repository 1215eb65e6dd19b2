"""clipsearch Streamlit app: navigation over thin pages (ui/pages/*). Start it with `clipsearch ui`."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

# The toolbar's Deploy button is for Streamlit Cloud, not for a photo library. `clipsearch ui` passes
# --client.toolbarMode minimal; started any other way, the option is set here once per process and the first run
# repeated, since the browser reads it when a run starts.
if st.get_option("client.toolbarMode") != "minimal":
    st.set_option("client.toolbarMode", "minimal")
    st.rerun()

# Material icons ship with Streamlit's font; emoji need a colour-emoji font that headless or minimal systems lack.
st.set_page_config(page_title="clipsearch", page_icon=":material/image_search:", layout="wide")
pages = Path(__file__).parent / "pages"
nav = st.navigation([
    st.Page(pages / "search_page.py", title="Search", icon=":material/search:", default=True),
    st.Page(pages / "image_page.py", title="Image", icon=":material/image:"),
    st.Page(pages / "zeroshot_page.py", title="Zero-shot", icon=":material/label:"),
    st.Page(pages / "duplicates_page.py", title="Duplicates", icon=":material/content_copy:"),
    st.Page(pages / "library_page.py", title="Library", icon=":material/photo_library:"),
])
nav.run()
