"""Text in photos: the text: query syntax, fusion with CLIP, the full-text store on SQLite and PostgreSQL, and the
engine on rendered words (skipped when rapidocr-onnxruntime is not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from clipsearch.indexer.ingest.ocr import OcrLine, OcrResult, available
from clipsearch.search.ocr_search import TextQuery, fuse, highlight, split_text_query

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
needs_engine = pytest.mark.skipif(not available(), reason="rapidocr-onnxruntime is not installed")


def test_text_terms_are_split_from_the_clip_query() -> None:
    assert split_text_query('text:"invoice 2024"') == TextQuery("invoice 2024", "")
    q = split_text_query('receipt text:"Invoice 2024" on a table TEXT:total')
    assert q.text == "Invoice 2024 total" and q.rest == "receipt on a table"
    assert split_text_query("a dog on grass") == TextQuery(None, "a dog on grass")


def test_fusion_lifts_photos_found_by_both() -> None:
    clip = [(1, 0.31), (2, 0.30), (3, 0.29)]
    ocr = [(3, 9.0), (7, 4.0)]
    ranked = [pid for pid, _ in fuse(clip, ocr)]
    assert ranked[0] == 3 and set(ranked) == {1, 2, 3, 7}
    assert [pid for pid, _ in fuse(clip, [])] == [1, 2, 3]


def test_highlight_spans_of_query_words() -> None:
    text = "INVOICE no. 17\nTotal 2024"
    assert [text[a:b] for a, b in highlight(text, "invoice 2024")] == ["INVOICE", "2024"]


def _result(*lines: str, status: str = "ok", reason: str | None = None) -> OcrResult:
    return OcrResult(status, tuple(OcrLine(t, 0.9, (1, 2, 30, 10)) for t in lines), reason)


def test_store_searches_words_and_phrases_on_both_catalogs(catalog_url: str) -> None:
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
    from clipsearch.indexer.storage.ocr_store import OcrStore

    cat = Catalog(catalog_url)
    recs = [PhotoRecord(f"/p/{i}.jpg".encode(), 1, 1, "indexed", content_hash=f"h{i}") for i in range(5)]
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), recs, {})
    store = OcrStore(cat)
    OcrStore(cat)  # opening again is harmless
    store.put({1: _result("INVOICE 2024", "Total 17.50"), 2: _result("2024 invoice draft"),
               3: _result("Harbour café"), 4: _result(status="failed", reason="OCR engine error: boom")}, "test")
    assert [i for i, _ in store.search("invoice 2024")] == [1]  # the phrase, in order
    assert {i for i, _ in store.search("invoice 2024", phrase=False)} == {1, 2}
    assert [i for i, _ in store.search("HARBOUR")] == [3]
    assert store.search("!!!") == [] and store.search("absent") == []
    assert [i for i, _ in store.search("harbovr")] == [3]  # one character misread by the engine still matches
    assert store.search("harbovr", fuzzy=False) == [] and store.search("2025") == []  # short words match exactly
    assert [i for i, _ in store.photos_needing()] == [5]
    assert [i for i, _ in store.photos_needing(retry_failed=True)] == [4, 5]
    assert store.failures()[0]["reason"] == "OCR engine error: boom"
    assert store.texts_of([1])[1]["lines"][0][:2] == ["INVOICE 2024", 0.9]
    store.put({1: _result("receipt")}, "test")  # replaced, not added
    assert store.search("invoice 2024", fuzzy=False) == [] and [i for i, _ in store.search("receipt")] == [1]
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), [PhotoRecord(b"/p/2.jpg", 2, 2, "indexed",
                                                                     content_hash="new", id=3)], {})
    assert store.search("harbour") == []  # the photo changed since it was read
    cat.remove_photos([1])
    assert store.search("receipt") == []
    if cat.engine.dialect.name == "sqlite":  # the words left the full-text index too, not only the answers
        with cat.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT rowid FROM ocr_texts_fts WHERE ocr_texts_fts MATCH "
                                        "'receipt OR invoice OR harbour'").all() == [(2,), (3,)]
    cat.dispose()


def test_a_catalog_with_the_old_sqlite_text_index_is_moved_to_the_one_that_follows_deletes(tmp_path: Path) -> None:
    """Catalogs written before the index followed ocr_texts kept removed photos' words in `ocr_fts`: opening the
    store drops it and builds the new index from the stored texts, so nothing read before is lost."""
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
    from clipsearch.indexer.storage.ocr_store import OcrStore

    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    recs = [PhotoRecord(f"/p/{i}.jpg".encode(), 1, 1, "indexed", content_hash=f"h{i}") for i in range(3)]
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), recs, {})
    OcrStore(cat).put({1: _result("INVOICE 2024"), 2: _result("Harbour café"), 3: _result("stale words")}, "test")
    with cat.engine.begin() as conn:  # what an older version left: a standalone table, a removed photo's words
        conn.exec_driver_sql("DROP TABLE ocr_texts_fts")
        conn.exec_driver_sql("CREATE VIRTUAL TABLE ocr_fts USING fts5(text, photo_id UNINDEXED)")
        conn.exec_driver_sql("INSERT INTO ocr_fts VALUES ('INVOICE 2024', 1), ('Harbour café', 2), ('gone', 9)")
    store = OcrStore(cat)
    assert [i for i, _ in store.search("invoice 2024")] == [1] and [i for i, _ in store.search("harbour")] == [2]
    assert [i for i, _ in store.search("stale")] == [3]  # read before, though the old index had lost it
    with cat.engine.connect() as conn:
        names = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")}
    assert "ocr_fts" not in names and "ocr_texts_fts" in names
    cat.remove_photos([2])
    assert store.search("harbour") == [] and [i for i, _ in OcrStore(cat).search("stale")] == [3]
    cat.dispose()


def _text_photo(path: Path, words: str, angle: float = 0) -> Path:
    im = Image.new("RGB", (480, 240), (225, 215, 190))
    ImageDraw.Draw(im).text((40, 90), words, fill=(20, 20, 60), font=ImageFont.truetype(FONT, 40))
    im.rotate(angle, fillcolor=(225, 215, 190)).save(path, quality=92)
    return path


@needs_engine
@pytest.mark.integration
def test_ocr_pass_over_an_indexed_library(tmp_path: Path, app_config, tiny_encoder) -> None:
    from clipsearch.indexer.ingest.ocr import OcrEngine
    from clipsearch.indexer.storage.ocr_store import OcrStore
    from clipsearch.search.ocr_search import run_ocr

    from .conftest import make_indexer, make_photo

    root = tmp_path / "photos"
    root.mkdir()
    _text_photo(root / "sign.jpg", "HARBOUR 2024", angle=8)
    make_photo(root / "plain.jpg", 1)
    make_photo(root / "gone.jpg", 2)
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([root])
    (root / "gone.jpg").unlink()  # unreadable now: a failed OCR row with the reason, the vector stays
    counts = run_ocr(ix.catalog, OcrEngine(threads=1))
    assert counts == {"ok": 2, "failed": 1}
    store = OcrStore(ix.catalog)
    rows = {Path(r["path"]).name: i for i, r in ix.catalog.photos_by_id([1, 2, 3]).items()}
    assert [i for i, _ in store.search("harbour 2024")] == [rows["sign.jpg"]]
    failed = store.failures()
    assert len(failed) == 1 and failed[0]["path"].endswith("gone.jpg") and "unreadable" in failed[0]["reason"]
    assert rows["gone.jpg"] in ix.catalog.embedded_ids(ix.catalog.spaces()[0].id)
    assert run_ocr(ix.catalog, OcrEngine(threads=1)) == {}  # nothing left to read
    ix.catalog.dispose()


@needs_engine
def test_engine_failure_is_a_result_not_an_exception() -> None:
    from clipsearch.indexer.ingest.ocr import OcrEngine

    engine = OcrEngine(threads=1)
    bad = engine.read_bytes(b"not an image")
    assert bad.status == "failed" and bad.reason and bad.text == ""
    blank = engine.read_image(Image.fromarray(np.full((60, 80, 3), 255, np.uint8)))
    assert blank.status == "ok" and blank.text == ""


@needs_engine
@pytest.mark.integration
def test_a_photo_that_hangs_its_worker_is_killed_and_recorded_while_the_others_are_read(tmp_path: Path) -> None:
    """A read that never returns (here a FIFO with no writer where a photo was, as a stalled network mount would
    block) costs that photo, recorded as a timeout with the reason, not the pass: the other photos of its task are
    read again one by one in a fresh pool."""
    import os
    import time

    from clipsearch.indexer.ingest.ocr import read_many

    words = ["HARBOUR", "INVOICE", "GARDEN", "STATION", "MARKET", "BRIDGE", "TICKET"]
    items = [(i + 1, bytes(_text_photo(tmp_path / f"{w.lower()}.jpg", w))) for i, w in enumerate(words)]
    fifo = tmp_path / "stalled.jpg"
    os.mkfifo(fifo)
    items.insert(3, (99, bytes(fifo)))  # 8 items on 2 workers: tasks of 2, so the hung one shares its task
    start = time.monotonic()
    got: dict[int, object] = {}
    for part in read_many(items, workers=2, hard_limit_s=8):
        got.update(part)
    assert sorted(got) == sorted(i for i, _ in items) and time.monotonic() - start < 120
    hung = got.pop(99)
    assert hung.status == "timeout" and "did not finish in 8 s: its worker was stopped" in hung.reason
    assert {i: (r.status, r.text) for i, r in got.items()} == {i + 1: ("ok", w) for i, w in enumerate(words)}
