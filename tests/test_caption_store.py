"""Captions kept in the catalog (issue 18): the store on SQLite and PostgreSQL (replace, stale after a content
change, gone with the photo, searched by words), `caption:` queries, and captioning that writes nothing when the
captioner fails."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.errors import ClipsearchError, PhotoNotFound, UsageError
from clipsearch.indexer.storage.caption_store import CaptionStore
from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.indexer.storage.filters import PhotoFilter
from clipsearch.search.caption_search import caption_hits, caption_page, captions_of, split_caption_query
from clipsearch.search.captions import caption_library

from .fakes import FakeEncoder, populate


def _catalog(url: str, n: int = 5) -> Catalog:
    cat = Catalog(url)
    recs = [PhotoRecord(f"/p/{i}.jpg".encode(), 1, 1, "indexed", content_hash=f"h{i}") for i in range(n)]
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), recs, {})
    return cat


def test_store_round_trip_search_stale_and_removal_on_both_catalogs(catalog_url: str) -> None:
    cat = _catalog(catalog_url)
    store = CaptionStore(cat)
    CaptionStore(cat)  # opening again is harmless
    assert store.put({1: "a red circle on grass", 2: "a blue circle", 3: "Café on the corner"}, "demo") == 3
    assert {i for i, _ in store.search("circle")} == {1, 2}
    assert [i for i, _ in store.search("circle red")] == [1]  # every word, any order
    assert [i for i, _ in store.search("RED, circle!")] == [1] and store.search("red square") == []
    assert [i for i, _ in store.search("CAFÉ corner")] == [3]  # words as written, any letters, any case
    assert store.search("!!!") == [] and all(s > 0 for _, s in store.search("circle"))
    assert store.photos_needing("demo") == [4, 5] and store.photos_needing("coca") == [1, 2, 3, 4, 5]
    assert store.photos_needing("demo", redo=True) == [1, 2, 3, 4, 5]
    assert store.captions_of([1, 2, 99]) == {1: "a red circle on grass", 2: "a blue circle"}
    store.put({1: "a green star"}, "demo")  # replaced, not added
    assert store.search("red") == [] and [i for i, _ in store.search("green star")] == [1]
    store.put({1: "a red star"}, "coca")  # another captioner keeps its own caption beside it
    assert [i for i, _ in store.search("star")] == [1] and store.count() == 3 and store.count("coca") == 1
    assert store.captions_of([1]) == {1: "a red star"} and store.captions_of([1], "demo") == {1: "a green star"}
    cat.write_batch(cat.ensure_space("k", "l", "m", 4),
                    [PhotoRecord(b"/p/1.jpg", 2, 2, "indexed", content_hash="new", id=2)], {})
    assert store.search("blue") == [] and store.captions_of([2]) == {}  # the photo changed since its caption
    assert store.photos_needing("demo") == [2, 4, 5]
    cat.remove_photos([1])
    assert store.search("star") == [] and store.put({1: "gone meanwhile"}, "demo") == 0
    with cat.engine.connect() as conn:
        left = conn.exec_driver_sql("SELECT count(*) FROM caption_texts WHERE photo_id = 1").scalar_one()
    assert left == 0  # no orphan captions
    cat.dispose()


def test_the_sqlite_word_index_follows_cascading_deletes(tmp_path: Path) -> None:
    cat = _catalog(f"sqlite:///{tmp_path / 'cat.db'}")
    store = CaptionStore(cat)
    store.put({1: "a red circle", 2: "a red star"}, "demo")
    store.put({1: "a red square"}, "demo")
    cat.remove_photos([2])
    con = sqlite3.connect(tmp_path / "cat.db")
    assert con.execute("SELECT rowid FROM caption_texts_fts WHERE caption_texts_fts MATCH 'red'").fetchall() == \
        con.execute("SELECT id FROM caption_texts").fetchall()
    con.execute("INSERT INTO caption_texts_fts(caption_texts_fts) VALUES ('integrity-check')")
    con.close()
    cat.dispose()


def test_caption_queries(tmp_path: Path) -> None:
    assert split_caption_query('caption:"red circle" caption:grass').words == "red circle grass"
    assert split_caption_query("a red circle").words is None
    q = split_caption_query('CAPTION:dog on a beach')
    assert (q.words, q.rest) == ("dog", "on a beach")
    assert split_caption_query("recaption:x").words is None
    cat = _catalog(f"sqlite:///{tmp_path / 'cat.db'}", 4)
    CaptionStore(cat).put({1: "a red circle", 2: "a red circle on grass", 3: "a blue star"}, "demo")
    assert caption_hits(cat, "a red circle") is None  # not a caption query: the CLIP search goes on
    assert {i for i, _ in caption_hits(cat, 'caption:"red circle"')} == {1, 2}
    assert [i for i, _ in caption_hits(cat, "caption:grass")] == [2] and caption_hits(cat, "caption:dog") == []
    for bad in ('caption:""', "caption:!!!", "caption:red a dog"):
        with pytest.raises(UsageError) as caught:
            caption_hits(cat, bad)
        assert "\n" not in str(caught.value)
    assert captions_of(cat, [3, 4]) == {3: "a blue star"}
    cat.dispose()


def test_caption_page_pages_filters_and_sorts(tmp_path: Path) -> None:
    photos = [(f"/p/{d}/{i}.jpg", "x", datetime(2020, 1, 1 + i)) for i, d in enumerate("aabb")]
    cat, _ = populate(tmp_path, photos)
    sid = cat.ensure_space(FakeEncoder.space.key, "fake", "fake", 64)
    CaptionStore(cat).put({1: "red circle", 2: "red circle red", 3: "red star", 4: "blue star"}, "demo")
    first = caption_page(cat, "caption:red", k=2)
    rest = caption_page(cat, "caption:red", k=2, offset=2)
    assert first.has_more and not rest.has_more and [h.rank for h in rest.hits] == [3]
    assert sorted(h.id for h in first.hits + rest.hits) == [1, 2, 3] and first.hits[0].path.startswith("/p/")
    by_date = caption_page(cat, "caption:red", k=5, sort="date")
    assert [h.id for h in by_date.hits] == [3, 2, 1]
    only_b = caption_page(cat, "caption:red", k=5, filters=PhotoFilter(folder="/p/b"), space_id=sid)
    assert [h.id for h in only_b.hits] == [3]
    assert caption_page(cat, "red", k=5) is None
    cat.dispose()


class _Broken:
    """An embedding captioner that fails halfway, as an out-of-memory error would."""

    def caption_vectors(self, vectors: np.ndarray) -> list[str]:
        raise RuntimeError("CUDA out of memory")


class _Echo:
    def caption_vectors(self, vectors: np.ndarray) -> list[str]:
        return [f"caption {float(v[0]):.3f}" for v in vectors]


def test_nothing_is_written_when_captioning_fails(tmp_path: Path) -> None:
    cat, _ = populate(tmp_path, [("/p/1.jpg", "red star", None), ("/p/2.jpg", "blue circle", None)])
    sid = cat.ensure_space(FakeEncoder.space.key, "fake", "fake", 64)
    before = set(sqlite3.connect(tmp_path / "cat.db").iterdump())
    CaptionStore(cat)  # the tables themselves may be created; no caption row may be
    for ids in (None, [1, 2]):
        with pytest.raises(ClipsearchError, match="nothing was stored") as caught:
            caption_library(cat, _Broken(), "broken", sid, ids=ids)
        assert "\n" not in str(caught.value)
    with pytest.raises(PhotoNotFound):
        caption_library(cat, _Echo(), "echo", sid, ids=[1, 99])
    assert CaptionStore(cat).count() == 0 and before <= set(sqlite3.connect(tmp_path / "cat.db").iterdump())
    got = caption_library(cat, _Echo(), "echo", sid, batch=1)  # --all, a batch (one photo here) per transaction
    assert sorted(got) == [1, 2] and CaptionStore(cat).captions_of([1, 2]) == got
    assert caption_library(cat, _Echo(), "echo", sid) == {}  # nothing left to caption
    assert sorted(caption_library(cat, _Echo(), "echo", sid, redo=True)) == [1, 2]
    cat.dispose()
