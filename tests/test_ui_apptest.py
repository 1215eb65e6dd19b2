"""Each Streamlit page through AppTest: widgets in, results out, errors as messages (tiny model, real catalog)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from .conftest import TINY, make_indexer, make_photo

pytestmark = pytest.mark.ui
PAGES = Path(__file__).resolve().parent.parent / "ui" / "pages"


def make_ui_library(base: Path, encoder) -> tuple[Path, Path]:
    """(home, photo folder) of an indexed library: 10 photos in a/ and b/ plus one file that is not an image."""
    from clipsearch.indexer.config import AppConfig

    lib = base / "photos"
    for i in range(10):
        make_photo(lib / ("a" if i < 6 else "b") / f"ph{i}.jpg", i)
    (lib / "b" / "broken.jpg").write_bytes(b"nope")
    cfg = AppConfig(home=base / "home", model=TINY, device="cpu")
    make_indexer(cfg, encoder).run([lib])
    return cfg.home, lib


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory, tiny_encoder):
    return make_ui_library(tmp_path_factory.mktemp("ui"), tiny_encoder)


@pytest.fixture()
def page(ui_home, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_HOME", str(ui_home[0]))
    monkeypatch.setenv("CLIPSEARCH_MODEL", TINY)

    def load(name: str) -> AppTest:
        at = AppTest.from_file(str(PAGES / f"{name}_page.py"), default_timeout=120)
        return at.run()

    return load


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def test_search_page_results_paging_more_like_this_and_errors(page, ui_home) -> None:
    at = page("search")
    assert not at.exception
    at.text_input(key="query").input("a photo").run()
    shown = [c for c in captions(at) if ".jpg" in c]
    assert len(shown) == 10 and all("·" in c for c in shown)  # name · score · date
    at.select_slider(key="f_k").set_value(8).run()
    at.button(key="next").click().run()
    assert len([c for c in captions(at) if ".jpg" in c]) == 2
    at.button(key="prev").click().run()
    first = next(b.key for b in at.button if "-more-" in b.key)  # the first hit's "More like this"
    at.button(key=first).click().run()
    assert any("Photos like #" in s.value for s in at.subheader)
    at.button(key="clear-similar").click().run()
    at.sidebar.text_input(key="f_folder").input(str(ui_home[1] / "b")).run()
    assert len([c for c in captions(at) if ".jpg" in c]) == 4
    at.text_input(key="query").input('"unbalanced').run()
    assert at.error and "unbalanced quote" in at.error[0].value and not at.exception


def test_image_page_similar_and_describe(page) -> None:
    at = page("image")
    at.number_input(key="img_id").set_value(1).run()
    assert not at.exception and not at.error
    assert len([c for c in captions(at) if ".jpg" in c]) == 8
    assert any("—" in m.value for m in at.markdown)  # ranked labels
    at.radio(key="img_source").set_value("vocabulary").run()
    assert sum("—" in m.value for m in at.markdown) == 10
    at.number_input(key="img_id").set_value(999).run()
    assert at.error and "999" in at.error[0].value


def test_zeroshot_page_classify_tag_and_undo(page) -> None:
    at = page("zeroshot")
    at.number_input(key="zs_id").set_value(2).run()
    at.text_input(key="zs_labels").input("dog, cat").run()
    at.button(key="zs_go").click().run()
    assert at.success and "Prediction for #2" in at.success[0].value
    at.text_input(key="tag_labels").input("dog, cat")
    at.slider(key="tag_thr").set_value(0.0)
    at.text_input(key="tag_name").input("ui-set")
    at.button[[b.label for b in at.button].index("Preview")].click().run()
    shown = [m.value for m in at.success]
    assert any("Prediction for #2" in v for v in shown)  # the classification stays beside the preview
    assert any("Preview: would tag 10 of 10 photos" in v for v in shown)
    at.button[[b.label for b in at.button].index("Apply")].click().run()
    assert any("Applied to 'ui-set': 10 tags on 10 of 10 photos" in m.value for m in at.success)
    at.button(key="tag_undo").click().run()
    assert at.info and "Removed 10 tags" in at.info[0].value
    at.text_input(key="tag_labels").input(" , ")
    at.button[[b.label for b in at.button].index("Preview")].click().run()
    assert at.error and "empty" in at.error[0].value
    assert any("Prediction for #2" in m.value for m in at.success)  # still there after the other panel's error


def test_zeroshot_label_sets_are_saved_and_reused(page, ui_home) -> None:
    at = page("zeroshot")
    at.text_input(key="zs_labels").input("sunset, forest, harbour").run()
    at.text_input(key="zs_save_name").input("outdoors").run()
    at.button(key="zs_save").click().run()
    assert not at.exception and (ui_home[0] / "label-sets.json").is_file()
    at.text_input(key="zs_labels").input("x").run()
    at.selectbox(key="zs_saved").set_value("outdoors").run()
    assert at.text_input(key="zs_labels").value == "sunset, forest, harbour"
    assert at.text_input(key="tag_labels").value == "sunset, forest, harbour"


def test_library_page_counts_failures_and_indexing(page, ui_home, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_ROOTS", str(tmp_path))  # the UI indexes only under the roots it started with
    at = page("library")
    values = {m.label: m.value for m in at.metric}
    assert values["Indexed"] == "10" and values["Failed"] == "0" and values["Unsupported"] == "1"
    assert at.dataframe  # the failure table
    extra = tmp_path / "more"
    make_photo(extra / "new.jpg", 77)
    at.text_input(key="lib_folder").input(str(extra)).run()
    at.button(key="lib_index").click().run()
    proc = at.session_state["index_proc"]
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    at.run()
    assert at.success and "finished" in at.success[0].value
    assert {m.label: m.value for m in at.metric}["Indexed"] == "11"


def test_pages_show_a_message_for_an_empty_library(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CLIPSEARCH_MODEL", TINY)
    at = AppTest.from_file(str(PAGES / "search_page.py"), default_timeout=120).run()
    at.text_input(key="query").input("anything").run()
    assert at.error and "no photos are indexed" in at.error[0].value and not at.exception


def test_search_page_shows_counts_ranks_badges_and_refuses_bad_queries(page) -> None:
    at = page("search")
    at.text_input(key="query").input("a photo of a dog").run()
    text = " ".join(m.value for m in at.markdown)
    assert "strong" in text and "possible" in text  # the counts line: "N strong · M possible matches"
    assert "1." in text and "match]" in text  # rank and badge of the first result
    at.sidebar.toggle(key="f_strong").set_value(True).run()
    assert not at.exception  # an untrained model has no strong match: a message, not an empty page
    assert [c for c in captions(at) if ".jpg" in c] == [] and "No strong matches" in at.info[0].value
    at.sidebar.toggle(key="f_strong").set_value(False).run()
    at.text_input(key="query").input("x" * 5000).run()
    assert at.error and "at most 1,000" in at.error[0].value and not at.exception
    at.text_input(key="query").input("   ").run()
    assert at.warning and "empty" in at.warning[0].value and not at.exception
    at.text_input(key="query").input("一只猫在海滩上").run()  # another script: searched like any text
    assert not at.exception and not at.error and [c for c in captions(at) if ".jpg" in c]
