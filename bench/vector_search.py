"""Vector search of the store's index kinds: p50/p95 latency of the vector part and recall@10 against exact search.

Builds the index kinds the store uses (index_kinds.py: IVF-Flat above exact_max, IVF-PQ with float16 re-rank
above pq_min) in memory from synthetic L2-normalised 512-d vectors and searches them through the store's own
search code (index_state.SpaceIndex: selectors, re-rank, delta merge). The data is clustered (a mixture of 2,000
directions plus noise), like real CLIP embeddings, rather than uniform on the sphere (where no index structure
helps). Queries are held-out points. For the store end to end (catalog, files, adds) see bench/index_growth.py.

    python bench/vector_search.py [--n 1000000] [--queries 200] [--kind ivf-flat|ivf-pq] [--nprobe 48 64]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from clipsearch.indexer.storage.index_build import StoreOptions
from clipsearch.indexer.storage.index_kinds import Kind, Segment, choose_kind, empty_index, sample_size
from clipsearch.indexer.storage.index_state import Base, Delta, Knobs, SpaceIndex


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """n unit vectors near random cluster centres (the synthetic stand-in for CLIP embeddings)."""
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.6 / np.sqrt(dim) * 1.5, (n, dim)).astype("f4")
    faiss.normalize_L2(x)
    return x


def timed(search, queries: np.ndarray, label: str) -> np.ndarray:
    """Run one query at a time; print p50/p95; return the ids found."""
    lat, out = [], []
    for row in queries:
        t0 = time.perf_counter()
        out.append(search(row[None]))
        lat.append((time.perf_counter() - t0) * 1000)
    print(f"{label:44s} p50 {np.percentile(lat, 50):7.2f} ms  p95 {np.percentile(lat, 95):7.2f} ms")
    return np.array(out)


def recall(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the true top-k found."""
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kind", choices=["auto", "ivf-flat", "ivf-pq"], default="auto")
    ap.add_argument("--nprobe", type=int, nargs="*", help="nprobe values to try (default: the store's)")
    ap.add_argument("--rerank", type=int, nargs="*", help="IVF-PQ re-rank candidate counts to try")
    ap.add_argument("--pq-m", type=int, help="IVF-PQ bytes per vector (default: the store's, dim / 8)")
    ap.add_argument("--clusters", type=int, default=2000,
                    help="cluster directions; fewer at 1M mimics the neighbour density of a larger library")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)).astype("f4")
    faiss.normalize_L2(centers)
    t = time.perf_counter()
    x = np.empty((args.n, args.dim), "f4")
    for i in range(0, args.n, 100_000):
        x[i : i + 100_000] = clustered(min(100_000, args.n - i), args.dim, rng, centers)
    q = clustered(args.queries, args.dim, rng, centers)
    print(f"data: {args.n} x {args.dim} in {time.perf_counter() - t:.1f}s; threads={faiss.omp_get_max_threads()}")

    o = StoreOptions()
    kind = choose_kind(args.n, args.dim, o.exact_max, 0 if args.kind == "ivf-pq" else o.pq_min, o.pq_nlist_max)
    if args.kind == "ivf-flat":
        kind = Kind("ivf-flat", kind.nlist)
    if args.pq_m and kind.family == "ivf-pq":
        kind = Kind("ivf-pq", kind.nlist, args.pq_m)
    t = time.perf_counter()
    sample = x[np.sort(rng.choice(args.n, size=sample_size(kind, args.n, o.train_per_list), replace=False))]
    index = empty_index(kind, args.dim, sample)
    ids = np.arange(args.n, dtype=np.int64)
    for i in range(0, args.n, 100_000):
        index.add_with_ids(x[i : i + 100_000], ids[i : i + 100_000])
    build = time.perf_counter() - t
    segments = [Segment(ids, x.astype("f2"), ("", ""))] if kind.family == "ivf-pq" else []
    base = Base(index, kind, ids, segments, 0, args.n, {})

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(x)
    truth = timed(lambda row: exact.search(row, args.k)[1][0], q, "exact (IndexFlatIP)")
    default = o.nprobe if kind.family == "ivf-flat" else o.pq_nprobe
    for nprobe in args.nprobe or [default]:
        for rerank in (args.rerank or [o.rerank]) if kind.family == "ivf-pq" else [0]:
            state = SpaceIndex(base, Delta.empty(args.dim), 0, 0, args.dim, Knobs(nprobe, nprobe, rerank))
            label = f"{kind.label} nprobe={nprobe}" + (f" rerank={rerank}" if rerank else "")
            got = timed(lambda row, s=state: s.search(row, args.k)[0][0], q, label)
            print(f"    recall@{args.k} vs exact: {recall(got, truth, args.k):.4f}")
    print(f"index build (training on {len(sample)} + adding {args.n}): {build:.1f}s")


if __name__ == "__main__":
    main()
