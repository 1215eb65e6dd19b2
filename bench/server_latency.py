"""Warm query latency through the query server: HTTP request in, JSON with paths out, at 100k photos.

Setup (not timed): N synthetic photos with clustered, L2-normalised vectors in the model's embedding space are
written to a fresh SQLite catalog through Catalog.write_batch and the vector index is synced (what an indexing run
writes and does; the files themselves do not exist, nothing here reads them). Then `clipsearch serve` runs in its
own process (ui.server.serve), loads the model, answers its warm-up query and announces itself in HOME/server.json.

Timed, side by side in one run, with varied text queries (k=20):
  * HTTP keep-alive: one connection (a UI or a script), request → parsed JSON with 20 paths;
  * HTTP new connection per query (what the CLI's stdlib client does);
  * in-process SearchService.search on the same catalog (no HTTP), and the text encoding alone.

    python bench/server_latency.py [--n 100000] [--model ViT-B-32:none] [--backend auto] [--queries 200]
                                   [--workdir DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from clipsearch.indexer.app import open_parts
from clipsearch.indexer.config import AppConfig
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.ui.client import find_server, server_file

SERVE = ("import sys\nfrom clipsearch.indexer.config import load_config\nfrom clipsearch.ui.server import serve\n"
         "serve(load_config(home=sys.argv[1], model=sys.argv[2], device='cpu', backend=sys.argv[3]), '127.0.0.1', 0)\n")
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["dog on a beach", "cat on a sofa", "mountain at sunset", "city street at night", "birthday cake",
          "bicycle", "snowy forest", "boat on a lake", "plate of pasta", "child playing football"]


def fill(cat: Catalog, space_id: int, n: int, dim: int, batch: int = 5000) -> None:
    """N photo rows with clustered vectors (a mixture of 2,000 directions plus noise, like real CLIP embeddings)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2000, dim)).astype("f4")
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    base = datetime(2015, 1, 1)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        vecs = centers[rng.integers(0, len(centers), m)] + rng.normal(0, 0.9 / np.sqrt(dim), (m, dim)).astype("f4")
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        records = [PhotoRecord(f"/photos/{(start + i) // 1000:03d}/IMG_{start + i:07d}.jpg".encode(), 3_000_000,
                               1_600_000_000_000_000_000 + start + i, "indexed", content_hash=f"{start + i:064x}",
                               width=4000, height=3000, format="JPEG", taken_at=base + timedelta(hours=start + i))
                   for i in range(m)]
        cat.write_batch(space_id, records, {i: vecs[i] for i in range(m)})


def timed_http(url: str, queries: list[str], keep_alive: bool, inside: list[float] | None = None) -> list[float]:
    """Milliseconds from sending the request to holding the parsed JSON (20 hits with paths) per query; `inside`
    collects the server's own time per query (its Server-Timing header), so the HTTP hop is the difference."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60) if keep_alive else None
    out = []
    for q in queries:
        t = time.perf_counter()
        c = conn or http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        c.request("GET", f"/api/search?q={urllib.parse.quote(q)}&k=20")
        resp = c.getresponse()
        hits = json.loads(resp.read())
        out.append((time.perf_counter() - t) * 1000)
        if inside is not None:
            inside.append(float(resp.getheader("server-timing", "app;dur=nan").split("dur=")[1]))
        if not keep_alive:
            c.close()
        assert resp.status == 200 and len(hits) == 20 and hits[0]["path"].startswith("/photos/"), hits
    if conn:
        conn.close()
    return out


def timed_get(url: str, paths: list[str]) -> list[float]:
    """Keep-alive GETs to JSON: /api/similar/{id} is the server's path without text encoding or text relevance
    (a stored vector → vector search → catalog rows), /api/health the HTTP stack alone (uvicorn, FastAPI, guard)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    out = []
    for path in paths:
        t = time.perf_counter()
        conn.request("GET", path)
        json.loads(conn.getresponse().read())
        out.append((time.perf_counter() - t) * 1000)
    conn.close()
    return out


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in ms: unlike wall time, barely moved by other load."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def report(label: str, ms: list[float]) -> None:
    print(f"{label:44s} p50 {np.percentile(ms, 50):7.2f} ms   p95 {np.percentile(ms, 95):7.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="ViT-B-32:none")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--backend", default="auto", help="auto (ONNX Runtime on CPU), onnx or torch")
    ap.add_argument("--workdir", type=Path, help="keep the catalog here and reuse it (setup once)")
    args = ap.parse_args()
    enc = create_encoder(args.model, "cpu", args.backend)
    with tempfile.TemporaryDirectory() as scratch:
        home = (args.workdir or Path(scratch)) / "home"
        config = AppConfig(home=home, model=args.model, device="cpu", backend=args.backend)
        home.mkdir(parents=True, exist_ok=True)
        cat = Catalog(config.resolved_db_url)
        sid = cat.ensure_space(enc.space.key, enc.space.label, enc.spec, enc.space.dim)
        cat.set_meta("last_model", enc.spec)
        if cat.space(sid).count != args.n:
            t = time.perf_counter()
            fill(cat, sid, args.n, enc.space.dim)
            print(f"setup: {args.n} photos x {enc.space.dim}-d written in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        open_parts(config).store.sync(cat.space(sid))  # what an indexing run does after its commits
        print(f"setup: vector index synced with the catalog in {time.perf_counter() - t:.1f}s")
        server_file(config).unlink(missing_ok=True)
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(home), args.model, args.backend])
        try:
            while find_server(config) is None:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with {proc.returncode}")
                time.sleep(0.2)
            client = find_server(config)
            print(f"server up (model loaded, index built or loaded, warm-up query) in {time.perf_counter() - t:.1f}s")
            queries = [f"a photo of a {c} {w}" + " " * (i // 80) for i, (c, w) in
                       enumerate((COLOURS[i % 8], THINGS[i % 10]) for i in range(args.queries))]
            timed_http(client.url, queries[:10], keep_alive=True)  # warm the paths (page cache, first requests)
            print(f"{args.n} photos, model {args.model} ({type(enc).__name__}), {args.queries} queries, k=20")
            inside: list[float] = []
            cpu, own = cpu_ms(proc.pid), time.process_time()
            total = timed_http(client.url, queries, keep_alive=True, inside=inside)
            cpu, own = (cpu_ms(proc.pid) - cpu) / len(queries), (time.process_time() - own) * 1000 / len(queries)
            report("HTTP keep-alive: request → JSON with paths", total)
            report("  of which inside the server app", inside)
            report("  HTTP hop (client total - server app)", [a - b for a, b in zip(total, inside, strict=True)])
            print(f"{'  CPU per query: server process, client':44s} {cpu:7.2f} ms, {own:.2f} ms")
            report("HTTP new connection per query (CLI client)", timed_http(client.url, queries, keep_alive=False))
            report("HTTP keep-alive GET /api/similar/{id} (no text)", timed_get(client.url, [
                f"/api/similar/{1 + (i * 7919) % args.n}?k=20" for i in range(len(queries))]))
            report("HTTP keep-alive GET /api/health (no work)", timed_get(client.url, ["/api/health"] * len(queries)))
        finally:
            proc.terminate()
            proc.wait(60)
        in_process(config, enc, queries)


def in_process(config: AppConfig, enc: object, queries: list[str]) -> None:
    """The same queries without HTTP (the server stopped first, so the two never compete for the cores)."""
    from clipsearch.search.service import SearchService

    parts = open_parts(config)
    svc = SearchService(parts.catalog, parts.store, enc, config.cache_dir)
    svc.search(queries[0], k=20)
    total, encode, cpu_total, cpu_encode = [], [], 0.0, 0.0
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        svc.search(q, k=20)
        total.append((time.perf_counter() - t) * 1000)
        t, cpu_total = time.perf_counter(), cpu_total + time.process_time() - c
        c = time.process_time()
        enc.encode_texts([q])  # type: ignore[attr-defined]
        encode.append((time.perf_counter() - t) * 1000)
        cpu_encode += time.process_time() - c
    report("in-process SearchService.search (no HTTP)", total)
    report("of which text encoding alone", encode)
    n = len(queries)
    print(f"{'  CPU per query: search, encoding alone':44s} {cpu_total * 1000 / n:7.2f} ms, "
          f"{cpu_encode * 1000 / n:.2f} ms")


if __name__ == "__main__":
    main()
