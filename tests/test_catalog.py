"""Catalog behaviour on both back-ends: SQLite and a real PostgreSQL server."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from clipsearch.indexer.errors import CatalogError
from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.indexer.storage.schema import SCHEMA_VERSION

from .conftest import make_indexer

pytestmark = pytest.mark.integration


def _rec(name: bytes, **kw) -> PhotoRecord:
    return PhotoRecord(b"/photos/" + name, 10, 1_000_000_000, "indexed", content_hash=name.hex(), **kw)


def test_batch_write_spaces_generations_and_removal(catalog_url: str) -> None:
    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k1", "tiny", "spec", 4)
    assert cat.ensure_space("k1", "tiny", "spec", 4) == sid
    with pytest.raises(CatalogError):
        cat.ensure_space("k1", "tiny", "spec", 8)
    vecs = np.eye(4, dtype=np.float32)
    cat.write_batch(sid, [_rec(b"a.jpg"), _rec(b"b\xff.jpg"), _rec(b"c.jpg", width=5)], {0: vecs[0], 1: vecs[1]})
    space = cat.space(sid)
    assert space.count == 2 and space.generation == 1
    known = cat.known_files()
    assert b"/photos/b\xff.jpg" in known  # lossless non-UTF-8 path
    got = cat.vectors_for(sid, [known[b"/photos/a.jpg"].id])
    assert np.allclose(next(iter(got.values())), vecs[0])
    cat.remove_photos([known[b"/photos/a.jpg"].id])
    assert cat.space(sid).count == 1 and cat.space(sid).generation == 2
    ids, out = next(cat.iter_vectors(sid))
    assert ids.tolist() == [known[b"/photos/b\xff.jpg"].id] and np.allclose(out[0], vecs[1])
    assert cat.counts_by_status() == {"indexed": 2, "failed": 0, "unsupported": 0, "empty": 0}
    cat.dispose()


def test_schema_version_is_recorded_and_newer_catalogs_are_refused(catalog_url: str) -> None:
    from sqlalchemy import update

    from clipsearch.indexer.storage.schema import meta

    cat = Catalog(catalog_url)
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
    with cat.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    cat.dispose()
    with pytest.raises(CatalogError, match="newer"):
        Catalog(catalog_url)


@pytest.mark.parametrize("killed_midway", [False, True])
def test_a_v1_catalog_migrates_with_its_tags(catalog_url: str, killed_midway: bool) -> None:
    """v1 stored label strings on every tag row; v2 keeps them in tag_labels. Opening a v1 catalog migrates it,
    tags, exports and tag filters unchanged, also when an earlier migration was killed after copying the old rows
    aside and dropping the table (SQLite runs that DDL outside the transaction)."""
    from sqlalchemy import insert, update

    from clipsearch.indexer.storage.annotations import TagStore
    from clipsearch.indexer.storage.filters import PhotoFilter, filter_ids
    from clipsearch.indexer.storage.schema import TAGS_V1, meta, tag_labels, tags

    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k", "test", "test", 4)
    half = np.ones(4, np.float32) / 2
    cat.write_batch(sid, [_rec(b"a.jpg"), _rec(b"b.jpg")], {0: half, 1: half})
    a, b = sorted(cat.embedded_ids(sid))
    with cat.engine.begin() as conn:  # turn it into what clipsearch v1 wrote
        tags.drop(conn)
        tag_labels.drop(conn)
        TAGS_V1.create(conn)
        conn.execute(insert(TAGS_V1), [
            {"photo_id": a, "label_set": "pets", "label": "cat", "score": 0.9, "space_id": sid},
            {"photo_id": b, "label_set": "pets", "label": "dog", "score": 0.8, "space_id": sid},
            {"photo_id": b, "label_set": "scenes", "label": "beach", "score": 0.7, "space_id": sid}])
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="1"))
    if killed_midway:
        with cat.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE tags_v1 AS SELECT * FROM tags")
            conn.exec_driver_sql("DROP TABLE tags")
    cat.dispose()

    cat = Catalog(catalog_url)
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION) == "2"
    store = TagStore(cat)
    assert [(r.photo_id, r.label_set, r.label, round(r.score, 3)) for r in store.rows()] == [
        (a, "pets", "cat", 0.9), (b, "scenes", "beach", 0.7), (b, "pets", "dog", 0.8)]
    assert store.label_sets() == {"pets": 2, "scenes": 1}
    assert store.labels() == ["beach", "cat", "dog"]
    assert filter_ids(cat, sid, PhotoFilter(tags=("dog",))).tolist() == [b]
    assert store.remove_set("pets") == 2 and store.labels() == ["beach"]
    cat.dispose()


def test_full_pipeline_on_each_backend(catalog_url, library, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.config import AppConfig

    cfg = AppConfig(home=tmp_path / "home", db_url=catalog_url, model="x", device="cpu")
    ix = make_indexer(cfg, tiny_encoder)
    assert ix.run([library]).indexed == 8
    assert make_indexer(cfg, tiny_encoder).run([library]).unchanged == 8
    (library / "a/p0.jpg").rename(library / "moved.jpg")
    r = make_indexer(cfg, tiny_encoder).run([library])
    assert r.moved == 1 and r.indexed == 0
    ix.catalog.dispose()


def test_a_catalog_left_half_created_by_a_killed_run_opens(tmp_path) -> None:
    """SQLite DDL is not atomic under the driver's defaults: a kill during creation can leave some tables behind."""
    import sqlite3

    db = tmp_path / "c.db"
    with sqlite3.connect(db) as raw:
        raw.execute('CREATE TABLE meta ("key" VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL)')
    cat = Catalog(f"sqlite:///{db}")
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
    sid = cat.ensure_space("k", "test", "test", 4)
    cat.write_batch(sid, [_rec(b"/p/a.jpg")], {0: np.ones(4, np.float32) / 2})
    assert cat.counts_by_status().get("indexed") == 1


def test_tag_bulk_write_on_every_backend(catalog_url: str) -> None:
    """The tag writer goes through the driver's executemany (its own placeholder style): SQLite and PostgreSQL."""
    from clipsearch.indexer.storage.annotations import TagStore

    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k", "test", "test", 4)
    half = np.ones(4, np.float32) / 2
    cat.write_batch(sid, [_rec(b"a.jpg"), _rec(b"b.jpg")], {0: half, 1: half})
    ids = np.array(sorted(cat.embedded_ids(sid)), np.int64)
    store = TagStore(cat)
    assert store.replace_set("s", sid, ids, np.array([1, 0]), np.array([0.9, 0.6], np.float32), ["cat", "dog"]) == 2
    assert store.replace_set("s", sid, ids[:1], np.array([0]), np.array([0.7], np.float32), ["cat"]) == 1
    assert [(r.label, round(r.score, 3)) for r in store.rows("s")] == [("cat", 0.7)]
    cat.dispose()


def test_tag_writer_replaces_a_set_whole_or_keeps_the_previous_one(catalog_url: str) -> None:
    """Streamed chunks land in one transaction; a failure on either side (the scoring caller or the database)
    leaves the previous run of the label set as it was."""
    from clipsearch.indexer.storage.annotations import TagStore

    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k", "test", "test", 4)
    half = np.ones(4, np.float32) / 2
    cat.write_batch(sid, [_rec(b"a.jpg"), _rec(b"b.jpg"), _rec(b"c.jpg")], {0: half, 1: half, 2: half})
    ids = np.array(sorted(cat.embedded_ids(sid)), np.int64)
    store = TagStore(cat)
    with store.writer("s", sid, ["cat", "dog"]) as w:
        w.add(ids[:2], np.array([0, 1]), np.array([0.9, 0.8], np.float32))
        w.add(ids[2:], np.array([1]), np.array([0.7], np.float32))
    assert w.written == 3
    before = [(r.photo_id, r.label, round(r.score, 3)) for r in store.rows("s")]
    assert sorted(before) == [(ids[0], "cat", 0.9), (ids[1], "dog", 0.8), (ids[2], "dog", 0.7)]
    with pytest.raises(RuntimeError, match="scoring failed"), store.writer("s", sid, ["bird"]) as w:
        w.add(ids, np.zeros(3, np.int64), np.full(3, 0.5, np.float32))
        raise RuntimeError("scoring failed")
    assert [(r.photo_id, r.label, round(r.score, 3)) for r in store.rows("s")] == before
    with pytest.raises(IntegrityError), store.writer("s", sid, ["bird"]) as w:  # no such photo
        w.add(np.array([int(ids.max()) + 100]), np.array([0]), np.array([0.5], np.float32))
    assert [(r.photo_id, r.label, round(r.score, 3)) for r in store.rows("s")] == before
    cat.dispose()


@pytest.mark.parametrize("made_by", ["v2", "v1"])
def test_a_catalog_without_its_version_row_opens_as_the_version_its_tables_show(catalog_url: str, made_by: str) -> None:
    """A creation killed after its CREATE TABLEs (SQLite commits each one) but before the version row: the next
    open must neither run the v1 migration on v2 tables (it failed with 'no such column: label_set') nor forget
    to migrate a v1 catalog."""
    from sqlalchemy import delete, insert

    from clipsearch.indexer.storage.annotations import TagStore
    from clipsearch.indexer.storage.schema import TAGS_V1, meta, tag_labels, tags

    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k", "test", "test", 4)
    cat.write_batch(sid, [_rec(b"a.jpg")], {0: np.ones(4, np.float32) / 2})
    (a,) = cat.embedded_ids(sid)
    with cat.engine.begin() as conn:
        if made_by == "v1":
            tags.drop(conn)
            tag_labels.drop(conn)
            TAGS_V1.create(conn)
            conn.execute(insert(TAGS_V1), [{"photo_id": a, "label_set": "pets", "label": "cat", "score": 0.9,
                                            "space_id": sid}])
        conn.execute(delete(meta).where(meta.c.key == "schema_version"))
    cat.dispose()
    for _ in range(2):  # and the version is on record afterwards
        cat = Catalog(catalog_url)
        assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert cat.counts_by_status()["indexed"] == 1
        assert [(r.label_set, r.label) for r in TagStore(cat).rows()] == ([("pets", "cat")] if made_by == "v1" else [])
        cat.dispose()
