"""The UI never reads a server file because of what a user typed (issue 12.1), checked through AppTest with the
tiny model and a real catalog: a path typed into any Labels box is a label, not a file; a query cannot name an
image file; indexing is limited to the roots the UI was started with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from .conftest import TINY, make_photo
from .test_ui_apptest import PAGES, make_ui_library

pytestmark = pytest.mark.ui
SECRET = "TOPSECRET-7f3a9c-do-not-show"


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    """A file only the server can read, whose lines must never reach a page."""
    path = tmp_path / "secret.txt"
    path.write_text(f"{SECRET}\nsecond-line-{SECRET}\n")
    return path


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory, tiny_encoder):
    return make_ui_library(tmp_path_factory.mktemp("ui-files"), tiny_encoder)


@pytest.fixture()
def page(ui_home, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_HOME", str(ui_home[0]))
    monkeypatch.setenv("CLIPSEARCH_MODEL", TINY)
    monkeypatch.delenv("CLIPSEARCH_ROOTS", raising=False)

    def load(name: str) -> AppTest:
        return AppTest.from_file(str(PAGES / f"{name}_page.py"), default_timeout=120).run()

    return load


def page_bytes(at: AppTest) -> bytes:
    """Everything the page sends to the browser: every element's message, tables and charts included."""
    return b"".join(node.proto.SerializeToString() for node in at._tree if getattr(node, "proto", None))


def assert_not_shown(at: AppTest, *secrets: str) -> None:
    assert not at.exception
    sent = page_bytes(at)
    for s in secrets:
        assert s.encode() not in sent


def test_image_page_labels_box_is_text_never_a_file(page, secret) -> None:
    at = page("image")
    at.number_input(key="img_id").set_value(1).run()
    for typed, hidden in ((str(secret), SECRET), ("/etc/passwd", "root:")):
        at.text_input(key="img_labels").input(typed).run()
        assert not at.error
        assert_not_shown(at, hidden)
        assert any(typed in m.value for m in at.markdown)  # the typed path is ranked as a label, as text
        assert typed.encode() in page_bytes(at)  # (what is shown is in the dump)


def test_zeroshot_classify_labels_box_is_text_never_a_file(page, secret) -> None:
    at = page("zeroshot")
    at.number_input(key="zs_id").set_value(2).run()
    at.text_input(key="zs_labels").input(f"{secret}, /etc/passwd").run()
    at.button(key="zs_go").click().run()
    assert at.success and "Prediction" in at.success[0].value
    assert_not_shown(at, SECRET, "root:")


def test_zeroshot_tag_labels_box_is_text_never_a_file(page, secret) -> None:
    at = page("zeroshot")
    at.text_input(key="tag_labels").input(f"{secret}, /etc/passwd")
    at.slider(key="tag_thr").set_value(0.0)
    at.button[[b.label for b in at.button].index("Preview")].click().run()
    assert any("Preview: would tag" in m.value for m in at.success)
    assert_not_shown(at, SECRET, "root:")
    assert set(at.dataframe[0].value["label"]) == {str(secret), "/etc/passwd"}
    assert str(secret).encode() in page_bytes(at)  # tables are in the dump too


def test_a_label_file_is_uploaded_not_named(page) -> None:
    """The one way to use a label file from the UI: upload it. Blank and repeated lines are dropped."""
    at = page("image")
    at.number_input(key="img_id").set_value(1).run()
    at.file_uploader(key="img_labels_file").set_value(("labels.txt", b"red circle\n\nblue square\nred circle\n",
                                                     "text/plain")).run()
    ranked = [m.value for m in at.markdown if "—" in m.value]
    assert sorted(r.split("— ", 1)[1] for r in ranked) == ["blue square", "red circle"]
    assert at.info and at.info[0].value == "labels.txt: 2 labels used; 1 blank and 1 repeated lines ignored."
    at.file_uploader(key="img_labels_file").set_value(("bad.txt", b"\xff\xfe\x00bad", "text/plain")).run()
    assert at.error and "not UTF-8 text" in at.error[0].value and not at.exception


def test_search_box_refuses_image_file_terms_without_saying_whether_they_exist(page, ui_home) -> None:
    at = page("search")
    existing = ui_home[1] / "a" / "ph0.jpg"  # a catalogued photo, readable by the server
    messages = []
    for path in (existing, ui_home[1] / "a" / "missing.jpg"):
        at.text_input(key="query").input(f'"a photo" + {path}').run()
        assert at.error and not at.exception
        messages.append(at.error[0].value.replace(str(path), "PATH"))
        assert not [c for c in at.caption if ".jpg" in c.value]  # no results
    assert messages[0] == messages[1] and "cannot be used in a query" in messages[0]
    at.text_input(key="query").input('"a photo" + #1').run()  # a catalogued photo by id stays allowed
    assert not at.error and [c for c in at.caption if ".jpg" in c.value]


def test_library_indexing_is_off_without_roots(page) -> None:
    at = page("library")
    assert any("clipsearch ui --roots" in i.value for i in at.info)
    assert "lib_index" not in [b.key for b in at.button]


def test_library_refuses_folders_outside_the_roots(page, monkeypatch, tmp_path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    make_photo(allowed / "in.jpg", 5)
    make_photo(outside / "out.jpg", 6)
    os.symlink(outside, allowed / "link")
    monkeypatch.setenv("CLIPSEARCH_ROOTS", str(allowed))
    at = page("library")
    for typed in (str(outside), f"{allowed}/../outside", str(allowed / "link"), "/etc", "relative/dir"):
        at.text_input(key="lib_folder").input(typed).run()
        at.button(key="lib_index").click().run()
        assert at.error and not at.exception, typed
        assert "outside the folders" in at.error[0].value or "full path" in at.error[0].value, typed
        assert "index_proc" not in at.session_state
    assert {m.label: m.value for m in at.metric}["Indexed"] == "10"  # nothing was indexed
