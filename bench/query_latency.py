"""Text-query latency end to end on a warm service: encode + vector search + catalog metadata + tags.

Indexes a generated sample library with the given model (default: the bundled demo model), warms the service,
then times repeated `SearchService.search` calls with varied queries and reports p50/p95, plus the share spent
encoding the text.

    python bench/query_latency.py [--model demo] [--count 600] [--queries 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clipsearch.indexer.app import open_parts
from clipsearch.indexer.config import AppConfig, IndexOptions
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.sample import COLOURS, SHAPES, make_sample
from clipsearch.indexer.pipeline import Indexer
from clipsearch.search.service import SearchService


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--count", type=int, default=600)
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    enc = create_encoder(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "lib"
        make_sample(lib, args.count, seed=3)
        cfg = AppConfig(home=Path(tmp) / "home", model=args.model)
        parts = open_parts(cfg)
        Indexer(parts.catalog, parts.store, enc, cfg.home, IndexOptions()).run([lib])
        svc = SearchService(parts.catalog, parts.store, enc)
        queries = [f"a {c} {s} on grass" for c in COLOURS for s in SHAPES]
        svc.search(queries[0])  # warm: index loaded, calibration sample cached
        total, encode = [], []
        for i in range(args.queries):
            q = queries[i % len(queries)] + (" " * (i // len(queries)))
            t = time.perf_counter()
            enc.encode_texts([q])
            encode.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            svc.search(q, k=20)
            total.append((time.perf_counter() - t) * 1000)
        print(f"{args.count} photos, model {args.model}, {args.queries} queries, k=20")
        print(f"end to end : p50 {np.percentile(total, 50):6.2f} ms  p95 {np.percentile(total, 95):6.2f} ms")
        print(f"text encode: p50 {np.percentile(encode, 50):6.2f} ms  (part of the above)")


if __name__ == "__main__":
    main()
