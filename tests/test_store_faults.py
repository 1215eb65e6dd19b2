"""Vector store faults: a writer killed between catalog commit and index write (or during the write), damaged,
missing and foreign files, strict mode, and readers beside a writer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clipsearch.indexer.errors import IndexUnavailable
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.store import StoreOptions, VectorStore

from .test_store import SMALL, STORE_LOG, add, assert_matches_exact, catalog_vectors, make_catalog, unit

pytestmark = pytest.mark.integration

_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
    from clipsearch.indexer.storage import store as store_module
    from clipsearch.indexer.storage.store import StoreOptions, VectorStore

    url, index_dir, sid, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cat = Catalog(url)
    rng = np.random.default_rng(11)
    v = rng.normal(size=(5, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cat.write_batch(sid, [PhotoRecord(f"/new/{i}.jpg".encode(), 1, 1, "indexed", content_hash=f"n{i}")
                          for i in range(5)], dict(enumerate(v)))
    cat.remove_photos([1, 2])
    if when == "before-index-write":
        os._exit(0)  # the catalog has committed; the index never hears of it
    def killed(*args, **kwargs):
        os._exit(0)  # files of the new delta are on disk, the manifest that would name them is not
    store_module.write_manifest = killed
    VectorStore(index_dir, cat, StoreOptions(exact_max=200, delta_max=40)).sync(cat.space(sid))
""")


@pytest.mark.parametrize("when", ["before-index-write", "during-index-write"])
def test_a_killed_writer_is_repaired_on_next_open_by_applying_only_the_difference(tmp_path, caplog, when) -> None:
    rng = np.random.default_rng(8)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 100, rng)
    VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    run = subprocess.run([sys.executable, "-c", _WRITER, cat.url, str(tmp_path / "idx"), str(sid), when],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    left = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(left) == (5 if when == "during-index-write" else 4)  # + a delta file that no manifest names
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    with caplog.at_level(logging.INFO, logger=STORE_LOG):
        store.sync(cat.space(sid))
    assert store.stats.full_builds == 0
    assert (store.stats.upserts_applied, store.stats.removals_applied) == (5, 2)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "index for space k: applied 5 written and 2 removed vectors"]
    assert_matches_exact(store, cat, sid, unit(rng, 4))
    assert len(list((tmp_path / "idx").iterdir())) == 5  # manifest, lock, base, ids, delta: the stray file went


def _index_two_spaces(tmp_path) -> tuple[Catalog, int, int]:
    """A catalog with spaces 'a' and 'b' of the same dimension, each indexed."""
    rng = np.random.default_rng(9)
    cat, a = make_catalog(tmp_path, "a")
    b = cat.ensure_space("b", "space b", "test", 16)
    add(cat, a, 120, rng, "a")
    add(cat, b, 80, rng, "b")
    for sid in (a, b):
        VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    return cat, a, b


def _damage(tmp_path, how: str, cat: Catalog) -> None:
    idx = tmp_path / "idx"
    manifest = json.loads((idx / "a.manifest.json").read_text())
    base = idx / manifest["base"]["file"]
    if how == "truncated":
        base.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    elif how == "garbage":
        base.write_bytes(os.urandom(base.stat().st_size))
    elif how == "missing":
        base.unlink()
    elif how == "ids missing":
        (idx / manifest["base"]["ids_file"]).unlink()
    elif how == "foreign manifest":  # space b's manifest (and files) in a's place
        shutil.copy(idx / "b.manifest.json", idx / "a.manifest.json")
    elif how == "foreign file":  # space b's index file under a's name
        shutil.copy(idx / json.loads((idx / "b.manifest.json").read_text())["base"]["file"], base)
    elif how == "ahead":
        manifest["generation"] += 5
        (idx / "a.manifest.json").write_text(json.dumps(manifest))
    elif how == "count":
        manifest["count"] += 1
        (idx / "a.manifest.json").write_text(json.dumps(manifest))
    elif how == "old version":
        manifest["manifest_version"] = 1
        (idx / "a.manifest.json").write_text(json.dumps(manifest))
    elif how == "other catalog":
        other = Catalog(f"sqlite:///{tmp_path / 'other.db'}")
        manifest["catalog_id"] = other.identity()
        (idx / "a.manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing", "ids missing", "foreign manifest",
                                 "foreign file", "ahead", "count", "old version", "other catalog"])
def test_a_bad_index_is_detected_on_open_and_rebuilt_with_one_log_line(tmp_path, caplog, how) -> None:
    cat, a, b = _index_two_spaces(tmp_path)
    _damage(tmp_path, how, cat)
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    q = unit(np.random.default_rng(10), 4)
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert_matches_exact(store, cat, a, q)  # never answered from b's vectors
    assert store.stats.full_builds == 1
    assert len(caplog.records) == 1 and "building it from the catalog" in caplog.records[0].getMessage()
    a_ids = set(catalog_vectors(cat, a)[0].tolist())
    assert {int(i) for hits, _ in store.search(cat.space(a), q, 1000) for i in hits} == a_ids
    strict = VectorStore(tmp_path / "idx", cat, StoreOptions(auto_rebuild=False))
    assert strict.count(cat.space(a)) == len(a_ids)  # the repaired files load as written


def test_a_damaged_delta_costs_a_catch_up_not_a_rebuild(tmp_path, caplog) -> None:
    rng = np.random.default_rng(12)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 100, rng)
    VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    add(cat, sid, 7, rng)
    VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    delta = tmp_path / "idx" / json.loads((tmp_path / "idx" / "k.manifest.json").read_text())["delta"]["file"]
    delta.write_bytes(delta.read_bytes()[:100])
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        store.sync(cat.space(sid))
    assert store.stats.full_builds == 0 and store.stats.upserts_applied == 7
    assert len(caplog.records) == 1 and "re-applying" in caplog.records[0].getMessage()
    assert_matches_exact(store, cat, sid, unit(rng, 3))


def test_strict_mode_answers_a_lagging_index_but_refuses_a_damaged_one(tmp_path) -> None:
    rng = np.random.default_rng(13)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 60, rng)
    VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    cat.remove_photos([1])
    strict = VectorStore(tmp_path / "idx", cat, StoreOptions(auto_rebuild=False))
    assert strict.count(cat.space(sid)) == 59
    manifest = json.loads((tmp_path / "idx" / "k.manifest.json").read_text())
    (tmp_path / "idx" / manifest["base"]["file"]).write_bytes(b"garbage")
    with pytest.raises(IndexUnavailable, match="reindex"):
        VectorStore(tmp_path / "idx", cat, StoreOptions(auto_rebuild=False)).count(cat.space(sid))


_GROWER = textwrap.dedent("""
    import sys
    import numpy as np
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
    from clipsearch.indexer.storage.store import StoreOptions, VectorStore

    url, index_dir, sid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cat = Catalog(url)
    store = VectorStore(index_dir, cat, StoreOptions(exact_max=200, delta_max=25))
    rng = np.random.default_rng(14)
    for batch in range(1, 31):
        v = rng.normal(size=(10, 16)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        cat.write_batch(sid, [PhotoRecord(f"/g/{batch}-{i}.jpg".encode(), 1, 1, "indexed", content_hash=f"{batch}-{i}")
                              for i in range(10)], dict(enumerate(v)))
        store.sync(cat.space(sid))
    print(store.stats.merges)
""")


def test_readers_beside_a_writer_see_whole_generations_and_never_a_torn_index(tmp_path, caplog) -> None:
    """A writer adds 10 photos per transaction and syncs (merging new bases now and then); readers in this process
    open the files again and again. Every answer must be a whole number of batches, and no reader may find a
    file damaged (it would rebuild: a warning and a full build)."""
    rng = np.random.default_rng(15)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 10, rng)
    VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    writer = subprocess.Popen([sys.executable, "-c", _GROWER, cat.url, str(tmp_path / "idx"), str(sid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    q = unit(rng, 1)
    seen, readers = set(), 0
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        while writer.poll() is None or readers < 5:
            store = VectorStore(tmp_path / "idx", cat, StoreOptions(exact_max=200, delta_max=25))
            ids = store.search(cat.space(sid), q, 10_000)[0][0]
            assert len(ids) % 10 == 0 and len(set(ids.tolist())) == len(ids)
            assert store.stats.full_builds == 0
            seen.add(len(ids))
            readers += 1
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert int(out) >= 5 and len(seen) >= 3  # bases were replaced while readers read
    assert not caplog.records
