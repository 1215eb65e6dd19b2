"""Warm query latency through the query server: HTTP request in, JSON with paths out, at 100k photos.

Setup (not timed): N synthetic photos with clustered, L2-normalised vectors in the model's embedding space are
written to a fresh SQLite catalog through Catalog.write_batch and the vector index is synced (what an indexing run
writes and does; the files themselves do not exist, nothing here reads them). Then `clipsearch serve` runs in its
own process (ui.server.serve), loads the model, answers its warm-up query and announces itself in HOME/server.json.

A text query's relevance labels embed its contrast texts ("a photo of a red dog" → "a photo of a blue dog", "a photo
of a red cat", ...; search/relevance.py) through the process's text cache (search/text_cache.py), so the cost of a
query depends on what the process has seen before. Picking a large group's alternatives (the 32 objects most like
the query's best photos) needs that group's entries embedded: once per machine and model (search/zeroshot.py
LabelVectors, in the model cache's labels/ folder, which an index run warms); the server uses that folder as a
server does, the in-process run an empty one of its own, filled by its untimed warm-up queries. (Before commit
285b69f the label cache was per home and keyed by the group less the named entry, so every query naming a new
object embedded ~1,020 object names: ~1,063 texts and 4-6 s a query.) Three classes of queries (k=20), in this
order in every process (the server, then the in-process run, which repeats the same sequence):
  * new (`--new` of them): "{template} {colour} {object}" with a distinct object of the reference vocabulary
    (search/data/reference_vocab.txt) and a distinct template + colour prefix per query, so that neither the
    colour contrasts (same object, other colours) nor the object contrasts (same prefix, other objects) were
    embedded before;
  * related (`--queries`): "a photo of a {colour} {object}" over a small pool of objects, after one untimed query
    per pool object and per colour: new combinations of words the process has seen, which share most of their
    contrasts;
  * repeat (`--queries`): the related queries again, word for word.
The number of texts each class sends to the encoder per query (the query itself, contrasts missing from the text
cache, label vectors missing from the label cache) comes from the in-process run.

Timed, side by side in one run:
  * HTTP keep-alive: one connection (a UI or a script), request → parsed JSON with 20 paths, per class; the
    server's own time per query (its Server-Timing header) and its CPU time per query;
  * HTTP new connection per query (what the CLI's stdlib client does), on repeats;
  * HTTP GET /api/similar/{id} (no text) and /api/health (no work);
  * in-process SearchService.search on the same catalog (no HTTP), per class, split with time.perf_counter around
    the service's parts: query encoding (SearchService.query_vector), relevance (Relevance.label_photos, of which
    contrast texts through the text cache and label vectors for the alternatives), vector index search
    (VectorStore.search), catalog reads (vectors_for, photos_by_id) and the rest.

    python bench/server_latency.py [--n 100000] [--model ViT-B-32:none] [--backend auto] [--new 20]
                                   [--queries 100] [--workdir DIR] [--blas-threads N]

`--blas-threads 1` runs numpy's BLAS (the relevance step's and the ranking's small matrix products) on one thread
(OPENBLAS_NUM_THREADS in the server, threadpoolctl in-process): on a machine whose cores other processes keep busy,
a two-thread product waits for a descheduled thread, and a warm query took 50 ms instead of 8 ms (RESULTS.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from clipsearch.indexer.app import open_parts
from clipsearch.indexer.config import AppConfig
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
from clipsearch.search.relevance import GENERAL_VOCAB, load_vocab, named_entries
from clipsearch.ui.client import find_server, server_file

SERVE = ("import sys\nfrom clipsearch.indexer.config import load_config\nfrom clipsearch.ui.server import serve\n"
         "serve(load_config(home=sys.argv[1], model=sys.argv[2], device='cpu', backend=sys.argv[3]), '127.0.0.1', 0)\n")
# Prefixes of the "new" queries: each template with each colour once ("photo", "picture", "image" are stop words;
# the query must name exactly one object and one colour of the vocabulary, checked in query_sets).
TEMPLATES = [f"{a} {b} of a".strip() for b in ("photo", "picture", "image", "snapshot") for a in
             ("a", "a close-up", "a blurry", "a cropped", "a grainy", "a sharp", "a tilted", "a faded", "a zoomed")]
RELATED = "a photo of a"


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



def query_sets(n: int, n_new: int) -> dict[str, list[str]]:
    """Queries per class (see the module docstring), plus 'warm' (warm-up queries, disjoint from the others) and
    'prime' (the untimed queries that introduce the related queries' words)."""
    vocab = load_vocab(GENERAL_VOCAB)
    colours = list(vocab.groups["colour"])

    def names(query: str, colour: str, thing: str) -> bool:
        got = {g: e for g, (e, _) in named_entries(query, vocab).items()}
        return got == {"object": thing, "colour": colour}

    objects = [o for o in vocab.groups["object"] if o.isalpha() and names(f"a photo of a {colours[0]} {o}",
                                                                          colours[0], o)]
    prefixes = [(t, c) for t in TEMPLATES for c in colours]
    if n_new + 3 > min(len(prefixes), len(objects) - 20 - n // 10):
        raise SystemExit(f"--new {n_new}: at most {min(len(prefixes), len(objects) - 20 - n // 10) - 3} new queries")
    new = [f"{t} {c} {o}" for (t, c), o in zip(prefixes, objects, strict=False)]
    assert all(names(q, c, o) for q, (_, c), o in zip(new, prefixes, objects, strict=False)), new
    pool = objects[-(2 + int(np.ceil(n / (len(colours) - 1)))):]  # the related queries' objects, unused by 'new'
    prime = [f"{RELATED} {colours[0]} {o}" for o in pool] + [f"{RELATED} {c} {pool[0]}" for c in colours[1:]]
    related = [f"{RELATED} {c} {o}" for o in pool[1:] for c in colours[1:]][:n]
    return {"warm": new[n_new: n_new + 3], "new": new[:n_new], "prime": prime, "related": related, "repeat": related}


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
    ap.add_argument("--new", type=int, default=20, help="new queries (each embeds its ~40 contrast texts)")
    ap.add_argument("--queries", type=int, default=100, help="related queries, and as many repeats")
    ap.add_argument("--backend", default="auto", help="auto (ONNX Runtime on CPU), onnx or torch")
    ap.add_argument("--workdir", type=Path, help="keep the catalog here and reuse it (setup once)")
    ap.add_argument("--blas-threads", type=int, help="numpy's BLAS threads in the server and the in-process run "
                                                     "(default: the library's own, one per core)")
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
        shutil.rmtree(config.cache_dir, ignore_errors=True)  # no per-home files from an earlier run
        t = time.perf_counter()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.blas_threads)} if args.blas_threads else None
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(home), args.model, args.backend], env=env)
        try:
            while find_server(config) is None:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with {proc.returncode}")
                time.sleep(0.2)
            client = find_server(config)
            print(f"server up (model loaded, index built or loaded, warm-up query) in {time.perf_counter() - t:.1f}s")
            sets = query_sets(args.queries, args.new)
            timed_http(client.url, sets["warm"], keep_alive=True)  # warm the paths (page cache, first requests)
            print(f"{args.n} photos, model {args.model} ({type(enc).__name__}), {args.new} new queries, "
                  f"{args.queries} related and repeated, k=20; load average {os.getloadavg()[0]:.2f}")
            for name in ("new", "related", "repeat"):
                if name == "related":
                    timed_http(client.url, sets["prime"], keep_alive=True)
                inside: list[float] = []
                cpu, own = cpu_ms(proc.pid), time.process_time()
                total = timed_http(client.url, sets[name], keep_alive=True, inside=inside)
                n = len(sets[name])
                cpu, own = (cpu_ms(proc.pid) - cpu) / n, (time.process_time() - own) * 1000 / n
                report(f"HTTP keep-alive, {name} queries: request → JSON", total)
                report("  of which inside the server app", inside)
                report("  HTTP hop (client total - server app)", [a - b for a, b in zip(total, inside, strict=True)])
                print(f"{'  CPU per query: server process, client':44s} {cpu:7.2f} ms, {own:.2f} ms")
            report("HTTP new connection per query, repeats", timed_http(client.url, sets["repeat"], keep_alive=False))
            report("HTTP keep-alive GET /api/similar/{id} (no text)", timed_get(client.url, [
                f"/api/similar/{1 + (i * 7919) % args.n}?k=20" for i in range(args.queries)]))
            report("HTTP keep-alive GET /api/health (no work)", timed_get(client.url, ["/api/health"] * args.queries))
        finally:
            proc.terminate()
            proc.wait(60)
        print(f"load average {os.getloadavg()[0]:.2f}")
        with tempfile.TemporaryDirectory() as labels, threadpool_limits(args.blas_threads, "blas"):
            in_process(config, enc, sets, Path(labels))
        print(f"load average {os.getloadavg()[0]:.2f}")


PARTS = ("query encoding", "relevance", "  of which label vectors (alternatives)", "vector index search",
         "catalog reads", "rest (ranking, paging, OCR fusion, ...)")  # the split printed per class, in this order


class Parts:
    """Wall time spent inside named methods of the service's parts (perf_counter around each call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, attr: str, key: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[key] += time.perf_counter() - t

        setattr(obj, attr, timed)


def in_process(config: AppConfig, enc: Any, sets: dict[str, list[str]], cache_dir: Path) -> None:
    """The same query sequence without HTTP (the server stopped first, so the two never compete for the cores),
    with the time of each query split over the service's parts; an empty label cache of its own (`cache_dir`)."""
    from clipsearch.search.service import SearchService

    parts = open_parts(config)
    svc = SearchService(parts.catalog, parts.store, enc, cache_dir)
    svc.search("a photo", k=1)  # the server's own warm-up (ui.server_io.warm)
    sent = [0]  # texts sent to the encoder, whatever asks (query, text cache, label cache)
    encode_texts = enc.encode_texts

    def counted(texts: list[str]) -> Any:
        sent[0] += len(texts)
        return encode_texts(texts)

    enc.encode_texts = counted
    timer = Parts()
    timer.wrap(svc, "query_vector", "query encoding")
    timer.wrap(svc.relevance, "label_photos", "relevance")
    timer.wrap(svc.relevance, "text_vectors", "text cache (query text, contrasts)")
    timer.wrap(svc.relevance, "label_vectors", "  of which label vectors (alternatives)")
    timer.wrap(svc.store, "search", "vector index search")
    timer.wrap(svc.catalog, "vectors_for", "catalog reads")
    timer.wrap(svc.catalog, "photos_by_id", "catalog reads")
    for q in sets["warm"]:
        svc.search(q, k=20)
    for name in ("new", "related", "repeat"):
        if name == "related":
            for q in sets["prime"]:
                svc.search(q, k=20)
        timer.seconds.clear()
        encoded, total, cpu = sent[0], [], time.process_time()
        for q in sets[name]:
            t = time.perf_counter()
            svc.search(q, k=20)
            total.append((time.perf_counter() - t) * 1000)
        n = len(sets[name])
        cpu = (time.process_time() - cpu) * 1000 / n
        report(f"in-process SearchService.search, {name}", total)
        print(f"{'  texts sent to the encoder per query':44s} {(sent[0] - encoded) / n:7.1f}, CPU {cpu:.2f} ms a query")
        whole = sum(total) / 1000
        split = {k: timer.seconds.get(k, 0.0) for k in PARTS}
        split[PARTS[-1]] = whole - sum(split[k] for k in PARTS if not k.startswith(" "))
        for key, sec in split.items():
            print(f"    {key:46s} {sec * 1000 / n:8.2f} ms a query  {sec / whole:6.1%}")
        print(f"    {'(text cache: the query text and the contrasts)':46s} "
              f"{timer.seconds.get('text cache (query text, contrasts)', 0) * 1000 / n:8.2f} ms a query")


if __name__ == "__main__":
    main()
