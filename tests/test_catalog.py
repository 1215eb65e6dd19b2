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


def test_a_large_mixed_batch_pairs_every_row_with_its_own_vector(catalog_url: str) -> None:
    """New rows are inserted in one statement: each path still gets its own id and vector, beside changed rows."""
    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k1", "tiny", "spec", 8)
    rng = np.random.default_rng(0)
    first = rng.normal(size=(300, 8)).astype(np.float32)
    cat.write_batch(sid, [_rec(f"{i:03d}.jpg".encode()) for i in range(300)], dict(enumerate(first)))
    known = cat.known_files()
    changed = [PhotoRecord(b"/photos/007.jpg", 11, 2, "indexed", content_hash="new", id=known[b"/photos/007.jpg"].id),
               _rec(b"new-a.jpg"), _rec(b"new-b.jpg"), PhotoRecord(b"/photos/broken.jpg", 1, 1, "failed", reason="x")]
    second = rng.normal(size=(3, 8)).astype(np.float32)
    cat.write_batch(sid, changed, {0: second[0], 1: second[1], 2: second[2]})
    known = cat.known_files()
    want = {f"/photos/{i:03d}.jpg".encode(): first[i] for i in range(300)}
    want |= {b"/photos/007.jpg": second[0], b"/photos/new-a.jpg": second[1], b"/photos/new-b.jpg": second[2]}
    got = cat.vectors_for(sid, [known[p].id for p in want])
    for path, vec in want.items():
        np.testing.assert_allclose(got[known[path].id], vec, rtol=1e-6)
    assert known[b"/photos/broken.jpg"].status == "failed" and cat.space(sid).count == 302
    assert known[b"/photos/007.jpg"].id == 8  # a changed photo keeps its id
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
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
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


def test_the_change_record_lists_what_changed_since_a_generation(catalog_url: str) -> None:
    """The vector store applies only what changed: every write, copy, change and removal shows up in the right
    space after the generation it happened in, and a generation bumps once per transaction."""
    from clipsearch.indexer.storage import changes

    cat = Catalog(catalog_url)
    a, b = cat.ensure_space("a", "a", "a", 4), cat.ensure_space("b", "b", "b", 4)
    vecs = np.eye(4, dtype=np.float32)
    cat.write_batch(a, [_rec(b"p.jpg"), _rec(b"q.jpg")], {0: vecs[0], 1: vecs[1]})
    p, q = sorted(cat.embedded_ids(a))
    cat.write_batch(b, [], {}, extra_vectors={p: vecs[2]})
    assert (cat.space(a).generation, cat.space(b).generation) == (1, 1)

    changed = PhotoRecord(b"/photos/p.jpg", 11, 2_000_000_000, "indexed", content_hash="new", id=p)
    cat.write_batch(a, [changed], {0: vecs[3]}, copies=[(q, _rec(b"copy.jpg"))])  # p's b vector goes too
    (r,) = set(cat.embedded_ids(a)) - {p, q}
    cat.remove_photos([q])
    assert (cat.space(a).generation, cat.space(b).generation) == (3, 2)

    def since(space_id: int, generation: int) -> tuple[list[int], dict[int, int]]:
        ups = {int(i): int(np.argmax(v)) for ids, vs in changes.upserts_since(cat.engine, space_id, generation)
               for i, v in zip(ids, vs, strict=True)}
        return changes.removed_since(cat.engine, space_id, generation).tolist(), ups

    assert since(a, 1) == ([p, q], {p: 3, r: 1})
    assert since(a, 2) == ([q], {})
    assert since(b, 1) == ([p], {})
    assert since(a, 3) == ([], {})
    summary = changes.summarize(cat.engine, a, 1)
    assert (summary.generation, summary.upserts, summary.removals) == (3, 2, 2)
    assert changes.prune(cat.engine, a, 2) == 1  # p's old vector, removed at generation 2
    assert changes.summarize(cat.engine, a, 1) is None and cat.space(a).diff_from == 2
    assert since(a, 2) == ([q], {})
    cat.dispose()


@pytest.mark.parametrize("killed_midway", [False, True])
def test_a_v2_catalog_migrates_to_the_change_record(catalog_url: str, killed_midway: bool) -> None:
    """v3 adds embeddings.seq, spaces.diff_from and embedding_removals. A v2 catalog opens, keeps its vectors, and
    records changes from its current generation on (an index written by v2 predates that: it is rebuilt once)."""
    from sqlalchemy import update

    from clipsearch.indexer.storage import changes
    from clipsearch.indexer.storage.schema import meta

    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k", "test", "test", 4)
    cat.write_batch(sid, [_rec(b"a.jpg"), _rec(b"b.jpg")], {0: np.eye(4, dtype=np.float32)[0],
                                                            1: np.eye(4, dtype=np.float32)[1]})
    with cat.engine.begin() as conn:  # turn it into what clipsearch v2 wrote
        conn.exec_driver_sql("DROP INDEX ix_embeddings_seq")
        conn.exec_driver_sql("ALTER TABLE embeddings DROP COLUMN seq")
        conn.exec_driver_sql("ALTER TABLE spaces DROP COLUMN diff_from")
        conn.exec_driver_sql("DROP TABLE embedding_removals")
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="2"))
        if killed_midway:  # an earlier open added the column, then died before recording v3
            conn.exec_driver_sql("ALTER TABLE embeddings ADD COLUMN seq BIGINT NOT NULL DEFAULT 0")
    cat.dispose()

    cat = Catalog(catalog_url)
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
    space = cat.space(sid)
    assert (space.count, space.generation, space.diff_from) == (2, 1, 1)
    assert changes.summarize(cat.engine, sid, 0) is None  # older than the record: rebuild
    cat.remove_photos([min(cat.embedded_ids(sid))])
    cat.write_batch(sid, [_rec(b"c.jpg")], {0: np.eye(4, dtype=np.float32)[2]})
    summary = changes.summarize(cat.engine, sid, 1)
    assert (summary.generation, summary.upserts, summary.removals) == (3, 1, 1)
    cat.dispose()


def test_known_files_and_vectors_can_be_read_for_some_folders_only(catalog_url: str) -> None:
    """A run over one folder plans from that folder's rows (a range scan), not from every row of the library."""
    cat = Catalog(catalog_url)
    sid = cat.ensure_space("k", "test", "test", 4)
    paths = [b"/lib/a/1.jpg", b"/lib/a/sub/\xff.jpg", b"/lib/a0.jpg", b"/lib/ab/2.jpg", b"/lib/b/3.jpg", b"/z.jpg"]
    cat.write_batch(sid, [PhotoRecord(p, 1, 1, "indexed") for p in paths], {0: np.ones(4, np.float32) / 2})
    assert set(cat.known_files(under=[b"/lib/a"])) == {b"/lib/a/1.jpg", b"/lib/a/sub/\xff.jpg"}
    assert set(cat.known_files(under=[b"/lib/a/", b"/lib/b"])) == {b"/lib/a/1.jpg", b"/lib/a/sub/\xff.jpg",
                                                                   b"/lib/b/3.jpg"}
    assert cat.known_files(under=[]) == {} and len(cat.known_files()) == len(paths)
    ids = {p: k.id for p, k in cat.known_files().items()}
    assert cat.embedded_ids(sid, among=[ids[b"/lib/a/1.jpg"], ids[b"/z.jpg"]]) == {ids[b"/lib/a/1.jpg"]}
    cat.dispose()
