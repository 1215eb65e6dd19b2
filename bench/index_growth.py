"""Index growth: what adding and removing photos costs as the library grows, end to end through the store.

A clipsearch home (``--workdir``: catalog.db + indexes/) is filled with N synthetic photos whose 512-d vectors are
clustered unit vectors (2,000 directions plus noise), written into the catalog in batches of 50,000 (never held
at once; re-runs continue where the last one stopped). The space is the ``--model``'s (``ViT-B-32:none``: the
model is only loaded for ``--index-run``), so the real indexer can add photos to the same space. Then, in rounds:

* add 10: 10 photos committed through ``Catalog.write_batch``, then ``VectorStore.sync`` (the index stage of
  ``clipsearch index``) timed; remove 10: ``Catalog.remove_photos`` then ``sync`` timed;
* warm queries through ``VectorStore.search`` (p50/p95) and recall@10 against exact search over the catalog;
* ``--rebuild``: a full build from the catalog; ``--rss``: the queries again in a fresh process that only opens the
  catalog and the index, reporting its peak RSS; ``--index-run``: the whole ``clipsearch index`` run of 10 new
  JPEGs into this home against the same run into an empty home, alternating.

    python bench/index_growth.py --n 1000000 --workdir /tmp/growth-1m --rebuild --index-run
    python bench/index_growth.py --n 10000000 --workdir /tmp/growth-10m --rss --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.indexer.storage.index_files import read_through
from clipsearch.indexer.storage.store import StoreOptions, VectorStore

DIM = 512


def centers(dim: int) -> np.ndarray:
    """The fixed cluster directions of the synthetic library."""
    c = np.random.default_rng(0).normal(size=(2000, dim)).astype("f4")
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(n: int, rng: np.random.Generator, c: np.ndarray) -> np.ndarray:
    """n unit vectors near random cluster centres (as bench/vector_search.py)."""
    x = c[rng.integers(0, len(c), n)] + rng.normal(0, 0.6 / np.sqrt(c.shape[1]) * 1.5, (n, c.shape[1])).astype("f4")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(db: Path, sid: int, n: int, batch: int = 50_000) -> None:
    """Write synthetic photos (ids 1..n) with their vectors in transactions of `batch` rows, each one catalog
    generation with its change record, as the indexer's commits make them.

    Setup, not measured: it writes through its own SQLite connection without a journal and with a 1 GiB cache
    (WAL would write the ~40 GB of 10M vectors twice); the catalog returns to WAL when it is next opened."""
    c, now = centers(DIM), "2026-01-01 00:00:00.000000"
    con = sqlite3.connect(db, isolation_level=None)
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-1048576"):
        con.execute(f"PRAGMA {pragma}")
    have = con.execute("SELECT COUNT(*) FROM embeddings WHERE space_id = ?", (sid,)).fetchone()[0]
    t0 = time.perf_counter()
    for start in range(have, n, batch):
        m = min(batch, n - start)
        x = clustered(m, np.random.default_rng(1000 + start // batch), c).astype("<f4")
        con.execute("BEGIN")
        con.execute("UPDATE spaces SET generation = generation + 1 WHERE id = ?", (sid,))
        seq = con.execute("SELECT generation FROM spaces WHERE id = ?", (sid,)).fetchone()[0]
        con.executemany(
            "INSERT INTO photos (id, path_bytes, path, folder, size, mtime_ns, status, date, updated_at) "
            "VALUES (?, ?, ?, '/synthetic', 1, 1, 'indexed', ?, ?)",
            [(start + i + 1, f"/synthetic/{start + i + 1}.jpg".encode(), f"/synthetic/{start + i + 1}.jpg",
              now, now) for i in range(m)])
        con.executemany("INSERT INTO embeddings (photo_id, space_id, vector, seq) VALUES (?, ?, ?, ?)",
                        [(start + i + 1, sid, x[i].tobytes(), seq) for i in range(m)])
        con.execute("COMMIT")
        if (start // batch) % 20 == 19:
            print(f"  filled {start + m}/{n} in {time.perf_counter() - t0:.0f}s", flush=True)
    con.close()
    if n > have:
        print(f"fill: {n - have} photos written in {time.perf_counter() - t0:.1f}s")


def new_catalog(db: Path, page_size: int | None) -> None:
    """Create the SQLite file with a page size of our choosing (only possible before its first table)."""
    if page_size and not db.exists():
        con = sqlite3.connect(db)
        con.execute(f"PRAGMA page_size={int(page_size)}")
        con.execute("CREATE TABLE bench_page_size (x)")
        con.commit()
        con.close()


def ground_truth(cat: Catalog, sid: int, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids per query, streaming the catalog's vectors (memory: one chunk plus k per query)."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for ids, vecs in cat.iter_vectors(sid):
        s = q @ vecs.T
        part = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        i = np.concatenate([best_i, ids[part]], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def run_queries(store: VectorStore, cat: Catalog, sid: int, q: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """Warm queries one at a time through the store; latency percentiles and recall@k against `truth`."""
    space = cat.space(sid, with_count=False)
    manifest = store.read_manifest(space) or {}
    for name in [manifest.get("file"), *(s["vecs"] for s in manifest.get("base", {}).get("rerank", []))]:
        if name:
            read_through(store.dir / name)  # warm: the index in the page cache, as in a serving process
    for row in q[:10]:
        store.search(space, row[None], k)  # warm: index loaded, lists touched once
    lat, found = [], []
    for row in q:
        t0 = time.perf_counter()
        ids = store.search(cat.space(sid, with_count=False), row[None], k)[0][0]
        lat.append((time.perf_counter() - t0) * 1000)
        found.append(ids)
    rec = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)), "recall": rec}


def add_and_remove(cat: Catalog, sid: int, store: VectorStore, rounds: int) -> dict:
    """Rounds of: commit 10 new photos then sync; remove 10 photos then sync. Median seconds of each sync, and of
    the vector count the pipeline takes before it (`catalog.space(id)` counts the space: O(library))."""
    c, kinds = centers(DIM), set()
    times: dict[str, list[float]] = {"add10_s": [], "remove10_s": [], "count_s": []}
    rng = np.random.default_rng(int(time.time()))
    top = cat.space(sid).count  # synthetic photos hold ids 1..n

    def timed_sync(key: str) -> None:
        t0 = time.perf_counter()
        space = cat.space(sid)  # what the pipeline passes (counted)
        t1 = time.perf_counter()
        store.sync(space)
        times["count_s"].append(t1 - t0)
        times[key].append(time.perf_counter() - t1)

    for r in range(rounds):
        names = [f"/bench-added/{time.time_ns()}-{r}-{i}.jpg" for i in range(10)]
        recs = [PhotoRecord(p.encode(), 1, 1, "indexed", content_hash=p) for p in names]
        cat.write_batch(sid, recs, dict(enumerate(clustered(10, rng, c))))
        timed_sync("add10_s")
        candidates = [int(v) for v in rng.integers(1, top, 40)]
        present = cat.vectors_for(sid, candidates)
        cat.remove_photos([v for v in dict.fromkeys(candidates) if v in present][:10])
        timed_sync("remove10_s")
        kinds.add(store.read_manifest(cat.space(sid))["index_type"])
    out: dict = {k: float(np.median(v)) for k, v in times.items()}
    out.update({f"{k}_all": [round(x, 3) for x in v] for k, v in times.items() if k != "count_s"})
    return {**out, "index_types": sorted(kinds), "stats": vars(store.stats)}


def bulk_add(cat: Catalog, sid: int, store: VectorStore, n: int) -> dict:
    """An import of n photos (commits of 1,000, as indexing batches) then one sync: past `delta_max` changes the
    delta is merged into a new base file (read, add, write; no training)."""
    c, rng, merges = centers(DIM), np.random.default_rng(int(time.time())), store.stats.merges
    for start in range(0, n, 1000):
        names = [f"/bench-bulk/{time.time_ns()}-{start + i}.jpg" for i in range(min(1000, n - start))]
        recs = [PhotoRecord(p.encode(), 1, 1, "indexed", content_hash=p) for p in names]
        cat.write_batch(sid, recs, dict(enumerate(clustered(len(recs), rng, c))))
    t0 = time.perf_counter()
    store.sync(cat.space(sid, with_count=False))
    return {"photos": n, "sync_s": time.perf_counter() - t0, "merged": store.stats.merges > merges}


def write_jpegs(folder: Path, n: int, seed: int) -> None:
    """n small photo-like JPEGs (640x480)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{seed}-{i}.jpg", quality=85)


def index_runs(workdir: Path, model: str, rounds: int) -> dict:
    """The whole `clipsearch index` run of 10 new photos into this home vs an empty home, alternating rounds."""
    from clipsearch.indexer.app import build_indexer
    from clipsearch.indexer.config import AppConfig, IndexOptions

    full, empty, stage = [], [], []
    opts = IndexOptions(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for home, out in ((workdir, full), (Path(tmp) / f"empty{r}", empty)):
                photos = Path(tmp) / f"photos-{len(full)}-{len(empty)}"
                write_jpegs(photos, 10, seed=time.time_ns() % 2**31)
                t0 = time.perf_counter()
                report = build_indexer(AppConfig(home=home, model=model, device="cpu"), opts).run([photos])
                out.append(time.perf_counter() - t0)
                if home == workdir:
                    stage.append(report.stage_seconds.get("index", float("nan")))
    return {"run_full_s": float(np.median(full)), "run_empty_s": float(np.median(empty)),
            "ratio": float(np.median(full) / np.median(empty)), "index_stage_s": float(np.median(stage)),
            "run_full_all": [round(x, 2) for x in full], "run_empty_all": [round(x, 2) for x in empty]}


def query_process(workdir: Path, sid: int, k: int) -> None:
    """Child of --rss: open catalog + index, run the saved queries, print figures and this process's RSS."""
    saved = np.load(workdir / "queries.npz")
    cat = Catalog(f"sqlite:///{workdir / 'catalog.db'}")
    store = VectorStore(workdir / "indexes", cat, StoreOptions(auto_rebuild=False))
    out = run_queries(store, cat, sid, saved["q"], saved["truth"], k)
    status = {line.split(":")[0]: line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith("Vm")}
    # VmHWM, not ru_maxrss: the latter keeps the parent's high-water mark across fork + exec
    out.update(peak_rss_mb=int(status["VmHWM"]) / 1024, rss_mb=int(status["VmRSS"]) / 1024,
               index_type=store.read_manifest(cat.space(sid))["index_type"], vectors=store.count(cat.space(sid)))
    print(json.dumps(out))


def space_of(cat: Catalog, model: str) -> int:
    """The model's space in this catalog (the model is loaded once to learn its key, then remembered)."""
    known = cat.get_meta(f"bench_space:{model}")
    if known:
        return int(known)
    from clipsearch.indexer.model.factory import create_encoder

    enc = create_encoder(model, "cpu")
    assert enc.space.dim == DIM, f"{model} gives {enc.space.dim}-d vectors; this bench writes {DIM}-d"
    sid = cat.ensure_space(enc.space.key, enc.space.label, enc.spec, enc.space.dim)
    cat.set_meta(f"bench_space:{model}", str(sid))
    cat.set_meta("last_model", enc.spec)
    return sid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--model", default="ViT-B-32:none")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rebuild", action="store_true", help="time a full build from the catalog")
    ap.add_argument("--bulk", type=int, default=0, help="then time one sync after importing this many photos")
    ap.add_argument("--rss", action="store_true", help="queries again in a fresh process; report its RSS")
    ap.add_argument("--index-run", action="store_true", help="time whole `clipsearch index` runs of 10 photos")
    ap.add_argument("--page-size", type=int, help="SQLite page size of a new catalog (16384 packs 7 vectors a page "
                    "where the default 4096 holds one: 10M vectors take ~24 GB instead of ~41 GB)")
    ap.add_argument("--query-process", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.query_process is not None:
        return query_process(args.workdir, args.query_process, args.k)
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    db = args.workdir / "catalog.db"
    new_catalog(db, args.page_size)
    cat = Catalog(f"sqlite:///{db}")
    sid = space_of(cat, args.model)
    cat.dispose()
    fill(db, sid, args.n)
    cat = Catalog(f"sqlite:///{db}")
    store = VectorStore(args.workdir / "indexes", cat)
    result: dict = {"n": cat.space(sid).count}
    t0 = time.perf_counter()
    store.sync(cat.space(sid))  # the first build on a fresh workdir; a catch-up on a re-run
    result["first_sync_s"] = time.perf_counter() - t0
    if args.rebuild:
        t0 = time.perf_counter()
        store.rebuild(cat.space(sid))
        result["full_build_s"] = time.perf_counter() - t0
    result.update(add_and_remove(cat, sid, store, args.rounds))
    q = clustered(args.queries, np.random.default_rng(7), centers(DIM))
    t0 = time.perf_counter()
    truth = ground_truth(cat, sid, q, args.k)
    result["truth_s"] = time.perf_counter() - t0
    result["query"] = run_queries(store, cat, sid, q, truth, args.k)
    if args.rss:
        np.savez(args.workdir / "queries.npz", q=q, truth=truth)
        child = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--k", str(args.k),
                                "--query-process", str(sid)], capture_output=True, text=True, check=True)
        result["fresh_process"] = json.loads(child.stdout.strip().splitlines()[-1])
    if args.bulk:
        result["bulk"] = bulk_add(cat, sid, store, args.bulk)
    if args.index_run:
        result["index_run"] = index_runs(args.workdir, args.model, args.rounds)
    print(json.dumps(result, indent=2))
    print(f"machine: {os.cpu_count()} cpus; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
