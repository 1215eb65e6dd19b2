"""Issues 17 and 18 in the Streamlit UI, through AppTest: near-duplicate stacks on the Search page, the text read in
photos on result cards and in the lightbox, searching by a region of a photo, "why did it match", captions and
questions in the lightbox, and the Duplicates page. A small sample library indexed with the bundled demo model
(its caption and question models read that space) with one resized copy; a tiny-model library with words rendered
into two photos and OCR run over it; each feature's error as one line on the page."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps
from streamlit.testing.v1 import AppTest

from clipsearch.indexer.ingest.ocr import available as ocr_available

from .conftest import TINY, make_indexer, make_photo
from .test_ui_server_files import SECRET, page_bytes

pytestmark = pytest.mark.ui
PAGES = Path(__file__).resolve().parent.parent / "ui" / "pages"
HL = ":orange-background["


@dataclass(frozen=True)
class DemoLibrary:
    home: Path
    items: dict[str, Any]  # file stem -> SampleItem (what the photo shows)
    original: str  # file name of the photo with a resized copy
    original_id: int
    copy_id: int  # copy.jpg, half its size


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory) -> DemoLibrary:
    """16 sample photos and a half-size copy of one, indexed with the demo model."""
    from clipsearch.indexer.config import AppConfig
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.indexer.model.sample import make_sample
    from clipsearch.search.captions import catalogued_id

    base = tmp_path_factory.mktemp("ui-demo")
    rows = make_sample(base / "photos", 16, seed=7)
    items = {Path(rel).stem: item for rel, item in rows}
    original = next(p for p in sorted((base / "photos").rglob("s7_*")) if p.suffix in (".jpg", ".png"))
    im = ImageOps.exif_transpose(Image.open(original))
    im.convert("RGB").resize((im.width // 2, im.height // 2)).save(original.parent / "copy.jpg", quality=90)
    items["copy"] = items[original.stem]
    cfg = AppConfig(home=base / "home", model="demo", device="cpu")
    ix = make_indexer(cfg, create_encoder("demo", "cpu", backend="torch"), workers=0)
    ix.run([base / "photos"])
    ids = [catalogued_id(ix.catalog, str(p)) for p in (original, original.parent / "copy.jpg")]
    ix.catalog.dispose()
    return DemoLibrary(cfg.home, items, original.name, ids[0], ids[1])


@pytest.fixture(scope="module")
def text_home(tmp_path_factory, tiny_encoder) -> Path:
    """A tiny-model library of two photos with words in them and two without, OCR run over it."""
    if not ocr_available():
        pytest.skip("rapidocr-onnxruntime is not installed")
    from clipsearch.indexer.config import AppConfig
    from clipsearch.indexer.ingest.ocr import OcrEngine
    from clipsearch.search.ocr_search import run_ocr

    from .test_ocr_cli import text_photo

    base = tmp_path_factory.mktemp("ui-text")
    text_photo(base / "photos" / "invoice.jpg", "INVOICE 2024")
    text_photo(base / "photos" / "harbour.jpg", "HARBOUR CAFE")
    make_photo(base / "photos" / "plain1.jpg", 1)
    make_photo(base / "photos" / "plain2.jpg", 2)
    cfg = AppConfig(home=base / "home", model=TINY, device="cpu")
    ix = make_indexer(cfg, tiny_encoder)
    ix.run([base / "photos"])
    assert run_ocr(ix.catalog, OcrEngine(threads=1)) == {"ok": 4}
    ix.catalog.dispose()
    return cfg.home


def app(monkeypatch, home: Path, model: str, name: str) -> AppTest:
    monkeypatch.setenv("CLIPSEARCH_HOME", str(home))
    monkeypatch.setenv("CLIPSEARCH_MODEL", model)
    monkeypatch.setenv("CLIPSEARCH_BACKEND", "torch")  # no ONNX export for a test
    return AppTest.from_file(str(PAGES / f"{name}_page.py"), default_timeout=120).run()


def search(at: AppTest, query: str, per_page: int = 40) -> AppTest:
    at.sidebar.select_slider(key="f_k").set_value(per_page)
    return at.text_input(key="query").input(query).run()


def cards(at: AppTest, grid: str = "s") -> list[int]:
    """Photo ids of the result cards, in order (from their "Open" buttons)."""
    return [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith(f"{grid}-open-")]


def open_photo(at: AppTest, photo_id: int) -> AppTest:
    return at.button(key=f"s-open-{photo_id}").click().run()


def texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def name_of(at: AppTest, photo_id: int) -> str:
    return next(c.value for c in at.caption if c.value.startswith(f"#{photo_id} · ")).rsplit("/", 1)[1]


def test_stack_toggle_folds_the_copy_into_one_card_with_a_badge(monkeypatch, demo_home) -> None:
    at = search(app(monkeypatch, demo_home.home, "demo", "search"), "a photo")
    flat = cards(at)
    assert len(flat) == 17 and "near-duplicate" not in texts(at)
    at.sidebar.toggle(key="f_stack").set_value(True).run()
    stacked = cards(at)
    assert not at.exception and not at.error and len(stacked) == 16
    assert sum("+1 near-duplicate]" in m.value for m in at.markdown) == 1
    (kept,) = {demo_home.original_id, demo_home.copy_id} & set(stacked)
    open_photo(at, kept)  # the lightbox shows the copy folded under it
    assert any("Near-duplicates in this stack" in m.value for m in at.markdown)
    other = ({demo_home.original_id, demo_home.copy_id} - {kept}).pop()
    assert f"#{other}" in [c.value for c in at.caption]
    assert list((demo_home.home / "cache").glob("duplicates-*.json"))  # grouped on demand, kept for next time


def test_stacks_on_a_big_library_ask_for_clipsearch_duplicates(monkeypatch, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.config import AppConfig
    from clipsearch.search import service as service_module

    for i in range(3):
        make_photo(tmp_path / "photos" / f"p{i}.jpg", i)
    cfg = AppConfig(home=tmp_path / "home", model=TINY, device="cpu")
    make_indexer(cfg, tiny_encoder).run([tmp_path / "photos"])
    monkeypatch.setattr(service_module, "SearchOptions",
                        functools.partial(service_module.SearchOptions, stack_on_demand=2))
    at = search(app(monkeypatch, cfg.home, TINY, "search"), "a photo")
    at.sidebar.toggle(key="f_stack").set_value(True).run()
    assert at.error and "run clipsearch duplicates" in at.error[0].value and "\n" not in at.error[0].value
    assert not at.exception


@pytest.mark.skipif(not ocr_available(), reason="rapidocr-onnxruntime is not installed")
def test_text_in_photos_is_shown_with_the_query_words_highlighted(monkeypatch, text_home) -> None:
    at = search(app(monkeypatch, text_home, TINY, "search"), 'text:"invoice 2024"')
    (hit,) = cards(at)
    card = [m.value for m in at.markdown if ":material/text_fields:" in m.value]
    assert card == [f":material/text_fields: {HL}INVOICE] {HL}2024]"]
    open_photo(at, hit)
    assert not at.toggle(key="lb-region").value and "lb-why" not in [t.key for t in at.toggle]  # words: no heatmap
    assert any(m.value.startswith("**Text in the photo** (words of the query") and f"{HL}INVOICE]" in m.value
               for m in at.markdown)
    at = search(at, "harbour")  # a plain query fused with the text read: the match is highlighted too
    harbour = cards(at)[0]
    assert any(f"{HL}HARBOUR] CAFE" in m.value for m in at.markdown)
    other = cards(at)[-1]
    at.button(key=f"s-more-{other}").click().run()  # found by a photo: the stored text as it is, no highlight
    open_photo(at, harbour)
    shown = [m.value for m in at.markdown if m.value.startswith("**Text in the photo**")]
    assert len(shown) == 1 and "HARBOUR" in shown[0] and HL not in shown[0]
    assert "lb-why" not in [t.key for t in at.toggle] and not at.exception


def test_why_did_it_match_shows_a_heatmap_for_text_queries(monkeypatch, demo_home) -> None:
    at = search(app(monkeypatch, demo_home.home, "demo", "search"), "a red circle")
    open_photo(at, cards(at)[0])
    images = len(at.get("image"))
    assert images >= 5  # the results, the photo and photos like it
    at.toggle(key="lb-why").set_value(True).run()
    assert not at.exception and not at.error
    assert any(c.value.startswith("Where 'a red circle' matches") and "gradcam" in c.value for c in at.caption)
    assert len(at.get("image")) == images  # the heatmap instead of the photo
    at.toggle(key="lb-why").set_value(False).run()
    assert not any(c.value.startswith("Where '") for c in at.caption)


def test_caption_and_questions_in_the_lightbox(monkeypatch, demo_home, tmp_path) -> None:
    home = demo_home.home
    at = search(app(monkeypatch, home, "demo", "search"), "a photo")
    pid = cards(at)[0]
    open_photo(at, pid)
    item = demo_home.items[Path(name_of(at, pid)).stem]
    assert "**Caption:** none yet" in texts(at)
    at.button(key="lb-caption").click().run()
    caption = next(m.value for m in at.markdown if m.value.startswith("**Caption:**"))
    assert item.shape in caption and item.colour in caption, (caption, item)
    from clipsearch.indexer.storage.catalog import Catalog
    from clipsearch.search.caption_search import captions_of

    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    assert captions_of(cat, [pid])[pid] in caption  # stored: caption:WORDS finds it
    cat.dispose()
    at.text_input(key="lb-ask").input("what colour is the shape?").run()
    answer = next(m.value for m in at.markdown if m.value.startswith("**Answer:**"))
    assert f"**Answer:** {item.colour} · confidence" in answer and not at.error
    at.text_input(key="lb-ask").input("is the shape on the left or the right?").run()
    answer = next(m.value for m in at.markdown if m.value.startswith("**Answer:**"))
    assert ("left" in answer or "right" in answer) and "heatmap" in answer and not at.exception
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{SECRET}\n")
    at.text_input(key="lb-ask").input(str(secret)).run()  # a question, never a file to read
    assert any(m.value.startswith("**Answer:**") for m in at.markdown) and not at.error
    assert SECRET.encode() not in page_bytes(at)


def test_caption_and_questions_need_a_model_for_the_library(monkeypatch, text_home) -> None:
    at = search(app(monkeypatch, text_home, TINY, "search"), "a photo")
    open_photo(at, cards(at)[0])
    at.button(key="lb-caption").click().run()
    assert at.error and "--model demo" in at.error[0].value and "\n" not in at.error[0].value
    at.text_input(key="lb-ask").input("what colour is it?").run()
    assert len(at.error) == 1 and "question model 'demo'" in at.error[0].value
    assert len(cards(at)) == 4 and not at.exception  # the rest of the page stays


def test_search_by_a_region_of_the_photo(monkeypatch, demo_home) -> None:
    at = search(app(monkeypatch, demo_home.home, "demo", "search"), "a photo")
    pid = cards(at)[0]
    open_photo(at, pid)
    at.toggle(key="lb-region").set_value(True).run()
    at.slider(key="lb-region-x").set_value((40, 40)).run()  # a box without width
    at.button(key="lb-region-go").click().run()
    assert at.error and "has no area" in at.error[0].value and not at.exception
    assert not any("Photos like this region" in s.value for s in at.subheader)  # still in the lightbox
    at.slider(key="lb-region-x").set_value((10, 90))
    at.slider(key="lb-region-y").set_value((5, 95)).run()
    at.button(key="lb-region-go").click().run()
    assert not at.exception and not at.error
    assert [s.value for s in at.main.subheader] == [f"Photos like this region of #{pid}"]
    assert pid not in cards(at) and len(cards(at)) == 16
    at.button(key="clear-similar").click().run()
    assert not at.main.subheader and len(cards(at)) == 17


def test_duplicates_page_shows_groups_side_by_side(monkeypatch, demo_home) -> None:
    home, original = demo_home.home, demo_home.original
    at = app(monkeypatch, home, "demo", "duplicates")
    assert at.slider(key="dup_thr").value == 0.9 and at.slider(key="dup_phash").value == 6
    assert any("never deletes" in c.value for c in at.caption)
    at.button(key="dup_go").click().run()
    assert not at.exception and not at.error
    assert at.success and at.success[0].value.startswith("1 group of duplicates · 2 photos")
    assert [s.value for s in at.main.subheader] == ["Group 1: 2 photos (near-duplicates)"]
    badges = [m.value for m in at.markdown if "badge[" in m.value]
    assert len(badges) == 2 and "keep (suggested)" in badges[0] and "copy" in badges[1]
    details = [c.value for c in at.caption if " — " in c.value]
    assert details[0].startswith(original) and details[1].startswith("copy.jpg")  # the bigger one is kept
    assert any(" kB · " in c.value and " × " in c.value for c in at.caption)
    assert list((home / "cache").glob("duplicates-*.json"))  # stacking reuses them
    at.slider(key="dup_thr").set_value(1.0).run()
    assert at.success  # the result stays until found again


def test_duplicates_page_on_an_empty_library(monkeypatch, tmp_path) -> None:
    at = app(monkeypatch, tmp_path / "empty", TINY, "duplicates")
    at.button(key="dup_go").click().run()
    assert at.error and "no photos are indexed" in at.error[0].value and not at.exception
