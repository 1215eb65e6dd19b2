"""Vector store: in-place adds and removals, index type by size, filters with an intact top-k, streaming.

Small synthetic spaces (16-d) with thresholds scaled down so that every index type is exercised in seconds.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.indexer.storage.store import StoreOptions, VectorStore

pytestmark = pytest.mark.integration

DIM = 16
# exhaustive probing makes IVF-Flat exact, so results can be compared with brute force
SMALL = StoreOptions(exact_max=200, pq_min=2000, delta_max=40, nprobe=10_000, pq_nprobe=10_000, rerank=400)
STORE_LOG = "clipsearch.indexer.storage.store"
_names = itertools.count()


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random L2-normalised vectors."""
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_catalog(tmp_path, key: str = "k") -> tuple[Catalog, int]:
    """A SQLite catalog with one empty space."""
    cat = Catalog(f"sqlite:///{tmp_path / 'cat.db'}")
    return cat, cat.ensure_space(key, f"space {key}", "test", DIM)


def add(cat: Catalog, sid: int, n: int, rng: np.random.Generator, tag: str = "") -> None:
    """Commit n new photos with random vectors in one catalog transaction."""
    names = [f"{tag}{next(_names)}" for _ in range(n)]
    recs = [PhotoRecord(f"/p/{name}.jpg".encode(), 1, 1, "indexed", content_hash=name) for name in names]
    cat.write_batch(sid, recs, dict(enumerate(unit(rng, n))))


def catalog_vectors(cat: Catalog, sid: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (id, vector) of the space, from the catalog (the truth)."""
    parts = list(cat.iter_vectors(sid))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def exact(cat: Catalog, sid: int, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[int]]:
    """Brute-force top-k ids per query row."""
    ids, vecs = catalog_vectors(cat, sid)
    if allowed is not None:
        keep = np.isin(ids, allowed)
        ids, vecs = ids[keep], vecs[keep]
    scores = q @ vecs.T
    return [ids[np.argsort(-row, kind="stable")[:k]].tolist() for row in scores]


def assert_matches_exact(store: VectorStore, cat: Catalog, sid: int, q: np.ndarray, k: int = 10,
                         allowed: np.ndarray | None = None) -> None:
    got = store.search(cat.space(sid, with_count=False), q, k, allowed)
    want = exact(cat, sid, q, k, allowed)
    assert [g[0].tolist() for g in got] == want


def test_adds_removals_and_changes_apply_in_place_without_rebuilding(tmp_path) -> None:
    rng = np.random.default_rng(0)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 150, rng)
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    store.sync(cat.space(sid))
    assert store.stats.full_builds == 1
    add(cat, sid, 10, rng)
    cat.remove_photos([3, 4, 5])
    path = next(p for p, f in cat.known_files().items() if f.id == 7)
    changed = PhotoRecord(path, 2, 2, "indexed", content_hash="new", id=7)  # same photo, new content
    cat.write_batch(sid, [changed], {0: unit(rng, 1)[0]})
    store.sync(cat.space(sid))
    q = unit(rng, 5)
    assert_matches_exact(store, cat, sid, q)
    assert store.stats.full_builds == 1 and store.stats.delta_writes == 1
    assert store.stats.upserts_applied == 11 and store.stats.removals_applied == 4  # photo 7's old vector went
    assert store.count(cat.space(sid)) == cat.space(sid).count == 157
    manifest = store.read_manifest(cat.space(sid))
    assert manifest["generation"] == cat.space(sid).generation and manifest["count"] == 157
    fresh = VectorStore(tmp_path / "idx", cat, SMALL)  # another process opens the files as written
    assert_matches_exact(fresh, cat, sid, q)
    assert fresh.stats.full_builds == 0 and fresh.stats.answered_behind == 0


def test_a_query_never_rebuilds_when_the_files_lag(tmp_path, caplog) -> None:
    rng = np.random.default_rng(1)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 100, rng)
    VectorStore(tmp_path / "idx", cat, SMALL).sync(cat.space(sid))
    before = (tmp_path / "idx" / "k.manifest.json").read_bytes()
    add(cat, sid, 5, rng)
    cat.remove_photos([1])
    reader = VectorStore(tmp_path / "idx", cat, SMALL)
    with caplog.at_level(logging.INFO, logger=STORE_LOG):
        assert_matches_exact(reader, cat, sid, unit(rng, 3))
    assert reader.stats.full_builds == 0 and reader.stats.answered_behind == 1
    assert (tmp_path / "idx" / "k.manifest.json").read_bytes() == before  # a query writes nothing
    assert any("behind the catalog" in r.getMessage() and "5 written and 1 removed" in r.getMessage()
               for r in caplog.records)


def test_a_space_never_written_is_searched_from_memory(tmp_path) -> None:
    rng = np.random.default_rng(2)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 30, rng)
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    assert_matches_exact(store, cat, sid, unit(rng, 2))
    add(cat, sid, 3, rng)
    assert_matches_exact(store, cat, sid, unit(rng, 2))
    assert store.stats.full_builds == 0 and store.stats.upserts_applied == 33  # incremental: 30, then 3
    assert store.read_manifest(cat.space(sid)) is None


def test_index_type_follows_size_and_retrains_only_past_thresholds(tmp_path) -> None:
    rng = np.random.default_rng(3)
    cat, sid = make_catalog(tmp_path)
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    steps = [(150, "flat", 1), (100, "ivf", 2), (30, "ivf", 2), (30, "ivf", 2), (800, "ivf", 3), (1200, "ivf", 4)]
    kinds = []
    for n, family, builds in steps:
        add(cat, sid, n, rng)
        store.sync(cat.space(sid))
        kind = store.read_manifest(cat.space(sid))["index_type"]
        kinds.append(kind)
        assert kind.startswith(family) and store.stats.full_builds == builds, (n, kind, store.stats)
        if "pq" not in kind:
            assert_matches_exact(store, cat, sid, unit(rng, 3))
    assert store.stats.merges == 1  # 60 changes > delta_max: merged into the trained IVF, not retrained
    assert "pq" in kinds[-1] and "pq" not in kinds[-2]  # 2310 vectors >= pq_min


def test_ivf_pq_reranks_exactly_from_float16_vectors(tmp_path) -> None:
    rng = np.random.default_rng(4)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 2500, rng)
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    store.sync(cat.space(sid))
    add(cat, sid, 20, rng)
    cat.remove_photos([10, 11])
    store.sync(cat.space(sid))
    add(cat, sid, 30, rng)  # over delta_max: merged, with a second re-rank segment
    store.sync(cat.space(sid))
    assert store.stats.merges == 1 and len(store.read_manifest(cat.space(sid))["base"]["rerank"]) == 2
    q = unit(rng, 20)
    got = store.search(cat.space(sid), q, 10)
    want = exact(cat, sid, q, 10)
    recall = np.mean([len(set(g[0].tolist()) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.95
    ids, vecs = catalog_vectors(cat, sid)
    by_id = dict(zip(ids.tolist(), vecs, strict=True))
    for (hit_ids, scores), row in zip(got, q, strict=True):  # scores are exact up to float16 rounding
        assert np.allclose(scores, [by_id[i] @ row for i in hit_ids.tolist()], atol=3e-3)
    assert not {10, 11} & {i for g in got for i in g[0].tolist()}


@pytest.mark.parametrize("size", [150, 1000, 2500])  # flat, IVF-Flat, IVF-PQ
def test_filters_keep_an_intact_top_k_at_every_size(tmp_path, size) -> None:
    rng = np.random.default_rng(5)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, size, rng)
    opts = StoreOptions(exact_max=200, pq_min=2000, delta_max=1000, nprobe=2, pq_nprobe=2, rerank=50)
    store = VectorStore(tmp_path / "idx", cat, opts)
    store.sync(cat.space(sid))
    add(cat, sid, 20, rng)  # some hits live in the delta ...
    cat.remove_photos(list(range(1, size, 7)))  # ... and some base vectors are hidden
    store.sync(cat.space(sid))
    live, _ = catalog_vectors(cat, sid)
    q = unit(rng, 4)
    for n_allowed in (1, 7, 40, len(live) // 10):
        allowed = np.sort(rng.choice(np.arange(1, size + 21), n_allowed, replace=False))
        got = store.search(cat.space(sid), q, 10, allowed)
        want = exact(cat, sid, q, 10, allowed)
        assert [len(g[0]) for g in got] == [len(w) for w in want] == [min(10, int(np.isin(allowed, live).sum()))] * 4
        if size < 2000 or n_allowed <= opts.rerank:  # exact, or every allowed vector is re-ranked exactly
            assert [g[0].tolist() for g in got] == want, (size, n_allowed)
        else:  # IVF-PQ ranks candidates by code (2 bytes a vector here): recall, not identity
            assert np.mean([len(set(g[0].tolist()) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) >= 0.9


@pytest.mark.parametrize("size", [150, 1000, 2500])
def test_streamed_vectors_are_the_catalogs_after_in_place_changes(tmp_path, size) -> None:
    """Tagging streams vectors from the index files; with a delta and hidden ids they must still be exactly the
    catalog's (IVF-PQ streams its float16 copies)."""
    rng = np.random.default_rng(6)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, size, rng)
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    store.sync(cat.space(sid))
    add(cat, sid, 15, rng)
    cat.remove_photos([2, 9])
    store.sync(cat.space(sid))
    chunks = list(store.iter_vectors(cat.space(sid), batch=333))
    ids = np.concatenate([c[0] for c in chunks])
    vecs = np.concatenate([c[1] for c in chunks])
    want_ids, want_vecs = catalog_vectors(cat, sid)
    order = np.argsort(ids)
    assert np.array_equal(ids[order], want_ids)
    assert np.allclose(vecs[order], want_vecs, atol=0 if size < 2000 else 2e-3)
    assert store.index_for(cat.space(sid)).ntotal == len(want_ids)


def test_optimize_retrains_and_prunes_the_removal_record(tmp_path, caplog) -> None:
    rng = np.random.default_rng(7)
    cat, sid = make_catalog(tmp_path)
    add(cat, sid, 300, rng)
    old = VectorStore(tmp_path / "old", cat, SMALL)  # an index elsewhere (another home on a shared catalog)
    old.sync(cat.space(sid))
    store = VectorStore(tmp_path / "idx", cat, SMALL)
    store.sync(cat.space(sid))
    cat.remove_photos(list(range(1, 50)))
    add(cat, sid, 10, rng)
    report = store.optimize(cat.space(sid))
    assert report.vectors == 261 and report.pruned_removals == 49 and report.index_type.startswith("ivf")
    assert store.read_manifest(cat.space(sid))["delta"] is None
    assert_matches_exact(store, cat, sid, unit(rng, 3))
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        old.sync(cat.space(sid))  # its generation predates the pruned record: rebuilt, with one warning
    assert old.stats.full_builds == 2 and len(caplog.records) == 1
    assert_matches_exact(old, cat, sid, unit(rng, 3))


def test_index_type_changes_at_thresholds_without_flapping() -> None:
    """Past a size class the index is retrained at once; below one only after shrinking 4x (hysteresis)."""
    from clipsearch.indexer.storage.index_kinds import Kind, choose_kind, needs_retrain

    def why(current: Kind, trained: int, count: int) -> str | None:
        return needs_retrain(current, trained, count, choose_kind(count, 512, 50_000, 2_000_000, 4096), 4.0)

    flat, ivf = Kind("flat"), Kind("ivf-flat", 1000)
    assert why(flat, 40_000, 50_000) is None and why(flat, 40_000, 50_001)  # upward: at once
    assert why(ivf, 50_001, 49_000) is None and why(ivf, 50_001, 12_000)  # downward: only after shrinking 4x
    assert why(ivf, 60_000, 240_000) is None and why(ivf, 60_000, 240_001)  # the trained IVF serves up to 4x
    assert why(ivf, 1_000_000, 2_000_000).startswith("2000000 vectors call for ivf4096-pq128")


@pytest.mark.gpu
def test_an_index_trained_on_the_gpu_searches_like_one_trained_on_the_cpu(monkeypatch) -> None:
    """faiss-gpu trains the coarse quantizer on the GPU; the written index is a CPU index with the same recall."""
    import faiss

    from clipsearch.indexer.storage import index_kinds
    from clipsearch.indexer.storage.index_kinds import Kind, empty_index, gpu_count

    if not gpu_count():
        pytest.skip("no GPU that FAISS can use (faiss-cpu, or no CUDA device)")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 64)).astype("f4")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kind = Kind("ivf-flat", nlist=64)
    gpu = empty_index(kind, 64, x[:5000])
    monkeypatch.setattr(index_kinds, "gpu_count", lambda: 0)
    cpu = empty_index(kind, 64, x[:5000])
    truth = faiss.IndexFlatIP(64)
    truth.add(x)
    _, want = truth.search(x[:100], 10)
    for index in (gpu, cpu):
        index.add(x)
        index.nprobe = 16
        _, got = index.search(x[:100], 10)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)]) >= 0.95
        faiss.serialize_index(index)  # a plain CPU index: it can be written


def test_faiss_cpu_reports_no_gpu_and_trains_on_the_cpu() -> None:
    from clipsearch.indexer.storage.index_kinds import Kind, empty_index, gpu_count

    assert gpu_count() == 0  # this test suite's faiss-cpu (the gpu test above covers faiss-gpu)
    x = np.random.default_rng(1).normal(size=(2000, 16)).astype("f4")
    index = empty_index(Kind("ivf-flat", nlist=8), 16, x)
    assert index.is_trained and index.nlist == 8
