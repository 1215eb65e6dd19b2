"""Batch zero-shot tagging of N stored embeddings against L labels, end to end including the catalog writes.

Setup (not timed): N random normalised D-dim vectors written to a fresh SQLite catalog and its vector index built
and written to disk (what an indexing run leaves behind). Timed: one SearchService.tag call in a fresh service, as
a new `clipsearch tag` process would make it (encode the labels with one prompt template, load the index from
disk, read its vectors, matrix products, softmax, write the tags in one transaction). The label encoding alone is
timed after it, for the breakdown. A second fresh call then re-tags the same label set, which first deletes the
million tags of the first run (same transaction), as re-running `clipsearch tag` with the same --name does.

    python bench/tagging.py [--n 1000000] [--labels 1000] [--model ViT-B-32:none]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import delete, insert

from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.schema import embeddings, photos, tag_labels, tags
from clipsearch.indexer.storage.store import VectorStore
from clipsearch.search.service import SearchService


def fill(cat: Catalog, space_id: int, n: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    now = datetime.now()
    with cat.engine.begin() as conn:
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            conn.execute(insert(photos), [{"id": start + i + 1, "path_bytes": f"/p/{start + i}.jpg".encode(),
                                           "path": f"/p/{start + i}.jpg", "folder": "/p", "size": 1, "mtime_ns": 1,
                                           "status": "indexed", "updated_at": now} for i in range(m)])
            v = rng.normal(size=(m, dim)).astype("<f4")
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            conn.execute(insert(embeddings), [{"photo_id": start + i + 1, "space_id": space_id,
                                               "vector": v[i].tobytes()} for i in range(m)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--model", default="ViT-B-32:none")
    ap.add_argument("--workdir", type=Path, help="keep the catalog and index here and reuse them (setup once)")
    args = ap.parse_args()
    enc = create_encoder(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        cat = Catalog(f"sqlite:///{tmp}/cat.db")
        sid = cat.ensure_space(enc.space.key, enc.space.label, enc.spec, enc.space.dim)
        if cat.space(sid).count != args.n:
            t = time.perf_counter()
            fill(cat, sid, args.n, enc.space.dim)
            print(f"setup: {args.n} vectors of {enc.space.dim} dims written in {time.perf_counter() - t:.1f}s")
            t = time.perf_counter()
            VectorStore(tmp / "idx", cat).rebuild(cat.space(sid))
            print(f"setup: index built and written in {time.perf_counter() - t:.1f}s")
        with cat.engine.begin() as conn:  # a clean slate: no tags from an earlier run to replace
            conn.execute(delete(tags))
            conn.execute(delete(tag_labels))
        tmpl = ["a photo of a {}."]
        labels = [f"label number {i}" for i in range(args.labels)]
        svc = SearchService(cat, VectorStore(tmp / "idx", cat), enc)  # fresh: no index loaded, no label cache
        t = time.perf_counter()
        res = svc.tag(labels, name="bench", threshold=0.0, templates=tmpl)
        t_tag = time.perf_counter() - t
        svc = SearchService(cat, VectorStore(tmp / "idx", cat), enc)  # fresh again: a second `clipsearch tag` run
        t = time.perf_counter()
        again = svc.tag(labels, name="bench", threshold=0.0, templates=tmpl)
        t_again = time.perf_counter() - t
        t = time.perf_counter()
        enc.encode_texts([f"a photo of a {lab}." for lab in labels])
        t_labels = time.perf_counter() - t
        print(f"end to end (one `tag` call: labels, index, scores, {res.written} tags written for "
              f"{res.photos_considered} photos): {t_tag:.1f}s")
        print(f"re-run of the same label set (replaces its {again.written} tags in one transaction): {t_again:.1f}s")
        print(f"of which label encoding ({args.labels} labels, 1 template), measured alone after: {t_labels:.1f}s")

if __name__ == "__main__":
    main()
