"""Vector search at a million photos: p50/p95 latency of the vector part and recall@10 against exact search.

Uses the store's own index policy (VectorStore.new_index: IVF-Flat above exact_max, nprobe from StoreOptions) on
synthetic L2-normalised 512-d vectors. The data is clustered (a mixture of 2,000 directions plus noise), like real
CLIP embeddings, rather than uniform on the sphere (where no index structure helps). Queries are held-out points.

    python bench/vector_search.py [--n 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from clipsearch.indexer.storage.store import StoreOptions, VectorStore


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.6 / np.sqrt(dim) * 1.5, (n, dim)).astype("f4")
    faiss.normalize_L2(x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2000, args.dim)).astype("f4")
    faiss.normalize_L2(centers)
    t = time.perf_counter()
    x = np.empty((args.n, args.dim), "f4")
    for i in range(0, args.n, 100_000):
        x[i : i + 100_000] = clustered(min(100_000, args.n - i), args.dim, rng, centers)
    q = clustered(args.queries, args.dim, rng, centers)
    print(f"data: {args.n} x {args.dim} in {time.perf_counter() - t:.1f}s; threads={faiss.omp_get_max_threads()}")

    store = VectorStore(Path("/nonexistent"), catalog=None, options=StoreOptions())  # type: ignore[arg-type]
    t = time.perf_counter()
    sample = x[rng.choice(args.n, size=min(args.n, 262_144), replace=False)]
    ann, kind = store.new_index(args.dim, args.n, sample)
    ids = np.arange(args.n, dtype=np.int64)
    ann.add_with_ids(x, ids)
    build = time.perf_counter() - t
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
    exact.add_with_ids(x, ids)

    def timed(index, label):
        lat, out = [], []
        for row in q:
            t0 = time.perf_counter()
            _, i = index.search(row[None], args.k)
            lat.append((time.perf_counter() - t0) * 1000)
            out.append(i[0])
        print(f"{label:28s} p50 {np.percentile(lat, 50):7.2f} ms  p95 {np.percentile(lat, 95):7.2f} ms")
        return np.array(out)

    truth = timed(exact, "exact (IndexFlatIP)")
    got = timed(ann, f"{kind} nprobe={store.options.nprobe}")
    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got, truth, strict=True)])
    print(f"recall@{args.k} of {kind} vs exact: {recall:.4f}   (index build {build:.1f}s)")


if __name__ == "__main__":
    main()
