"""Local engine vs Ray engine: photos/s on the same folder, same model and batch, side by side in one run.

Each run indexes the folder from scratch into a fresh home (catalog + index) through `Indexer`, once with the local
engine (LocalExecutor: a decode process pool feeding the in-process model) and once per Ray worker count
(RayExecutor on a local Ray instance). Ray's start-up (`ray.init`) is a fixed cost, timed once and reported
separately; each run's time still includes starting its workers (decode pool, or encode actors loading the model),
and the run's steady rate (from its first committed batch to its last) is printed beside the end-to-end rate.

    python bench/ray_scaling.py [--photos DIR] [--count 1000] [--size 1600x1200] [--model ViT-B-32:none]
                                [--batch-size 32] [--workers 1,2] [--rounds 1]
    python bench/ray_scaling.py --commit-only DB_URL [--rows 20000]   # the driver's commit rate alone
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# torch and ray are imported inside main(): decode workers are spawned and re-import this script's top level.


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs (smooth gradients, coarse detail, sensor noise) of one size, deterministic."""
    rng = np.random.default_rng(0)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    for i in range(count):
        small = rng.integers(0, 255, (max(1, h // 50), max(1, w // 50), 3), dtype=np.uint8)
        detail = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), np.float32)
        arr = np.clip(0.5 * base + 0.5 * detail + rng.normal(0, 6, (h, w, 1)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"IMG_{i:05d}.jpg", quality=90)


class TreeCpu:
    """CPU seconds used by this process and its descendants while the block runs (Linux /proc, sampled).

    On a shared machine wall-clock rates drift with other people's load; CPU seconds per photo drift far less.
    The tree covers the local engine's decode workers and, for the Ray engine, the local Ray instance's daemons and
    actors (children of its raylet, a child of this process). Ray's raylet does not account its dead workers'
    time to itself (their CPU vanishes with them), so each process is sampled every 0.2 s and its last reading kept:
    a process that exits loses at most its last 0.2 s.
    """

    def __enter__(self) -> TreeCpu:
        self.base = _tree_cpu()
        self.last = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.last.update(_tree_cpu())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(_tree_cpu())

    @property
    def seconds(self) -> float:
        ticks = sum(cpu - self.base.get(pid, 0) for pid, cpu in self.last.items())
        return ticks / os.sysconf("SC_CLK_TCK")


def _tree_cpu() -> dict[int, int]:
    """utime + stime (clock ticks) of this process and each living descendant."""
    procs: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, frontier = {os.getpid()}, {os.getpid()}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier} - tree
        tree |= frontier
    return {p: procs[p][1] for p in tree if p in procs}


class Clock:
    """Indexer progress hook: when the first and the last batch were committed, and how many photos by then."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.marks.append((time.perf_counter(), done))

    def first_batch_s(self) -> float:
        return self.marks[0][0] - self.t0 if self.marks else float("nan")

    def steady_rate(self) -> float:
        """Photos/s from the first committed batch to the last (worker start-up excluded)."""
        if len(self.marks) < 3:
            return float("nan")
        (t1, d1), (t2, d2) = self.marks[0], self.marks[-2]  # the last mark is the run's final call
        return (d2 - d1) / (t2 - t1) if t2 > t1 else float("nan")


def index_once(lib: Path, home: Path, model: str, enc: Any, batch_size: int, executor: Any) -> dict[str, float]:
    """Index `lib` into a fresh `home` with `executor`; photos/s end to end and steady."""
    from clipsearch.indexer.app import open_parts
    from clipsearch.indexer.config import AppConfig, IndexOptions
    from clipsearch.indexer.pipeline import Indexer

    parts = open_parts(AppConfig(home=home, model=model, device="cpu"))
    ix = Indexer(parts.catalog, parts.store, enc, home, IndexOptions(batch_size=batch_size), executor=executor)
    clock = Clock()
    with TreeCpu() as cpu:
        rep = ix.run([lib], on_progress=clock)
    parts.catalog.dispose()
    assert not rep.failed and rep.indexed > 0, rep.as_dict()
    return {"indexed": rep.indexed, "seconds": rep.seconds, "e2e": rep.indexed / rep.seconds,
            "steady": clock.steady_rate(), "first_batch_s": clock.first_batch_s(),
            "commit_rows_s": rep.indexed / max(rep.stage_seconds["write"], 1e-9),
            "per_cpu_s": rep.indexed / cpu.seconds}


def commit_rate(url: str, rows: int, batch_size: int, dim: int = 512) -> None:
    """Rows/s of the driver's commit alone (Catalog.write_batch, one transaction per batch of new photos with
    `dim`-d vectors) into the catalog at `url`, and the catalog's bytes per photo on PostgreSQL."""
    from clipsearch.indexer.status import PhotoStatus
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord

    cat = Catalog(url)
    space = cat.ensure_space(f"bench{dim}", "bench", "bench", dim)
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(batch_size, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    t, cpu = time.perf_counter(), time.process_time()
    for start in range(0, rows, batch_size):
        recs = [PhotoRecord(path_bytes=f"/photos/2024/{i // 1000:05d}/IMG_{i:09d}.jpg".encode(), size=3_500_000,
                            mtime_ns=1_700_000_000_000_000_000 + i, status=PhotoStatus.INDEXED,
                            content_hash=f"{i:032x}", width=4000, height=3000, format="JPEG",
                            camera_make="Canon", camera_model="EOS 5D")
                for i in range(start, min(rows, start + batch_size))]
        cat.write_batch(space, recs, dict(enumerate(vec[: len(recs)])))
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    print(f"commit into {url.split('://')[0]}: {rows} photos in {dt:.1f} s = {rows / dt:.0f} photos/s (batch "
          f"{batch_size}, {dim}-d vectors); the driver's own CPU time: {rows / dcpu:.0f} photos per CPU-second")
    if url.startswith("postgresql"):
        import sqlalchemy as sa

        with cat.engine.connect() as conn:
            for table in ("photos", "embeddings"):
                size = conn.execute(sa.text(f"SELECT pg_total_relation_size('{table}')")).scalar()
                print(f"  {table}: {size / rows:.0f} bytes per photo with its indexes ({size / 2**20:.1f} MiB)")
    cat.dispose()


def versions() -> str:
    import ray
    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}"


def run_all(args: argparse.Namespace, lib: Path, tmp: Path) -> dict[str, list[dict[str, float]]]:
    from clipsearch.indexer.executors import LocalExecutor
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.indexer.ray_executor import RayExecutor

    enc = create_encoder(args.model, "cpu")
    engines: dict[str, Callable[[], Any]] = {"local": lambda: LocalExecutor()}
    for n in args.workers:
        engines[f"ray x{n}"] = lambda n=n: RayExecutor(workers=n)
    t = time.perf_counter()
    RayExecutor().connect()
    print(f"ray start-up (ray.init, local instance): {time.perf_counter() - t:.2f} s (fixed, not in any rate below)")
    out: dict[str, list[dict[str, float]]] = {k: [] for k in engines}
    for r in range(args.rounds):  # alternate engines, so that drift in the machine's speed hits them alike
        for name, make in engines.items():
            res = index_once(lib, tmp / f"home-{name.replace(' ', '')}-{r}", args.model, enc, args.batch_size, make())
            out[name].append(res)
            print(f"round {r + 1} {name:8s}: {res['indexed']} photos in {res['seconds']:6.1f} s  end-to-end "
                  f"{res['e2e']:6.2f} photos/s  steady {res['steady']:6.2f} photos/s  first batch after "
                  f"{res['first_batch_s']:.1f} s  {res['per_cpu_s']:.2f} photos per CPU-second  (driver commits "
                  f"{res['commit_rows_s']:.0f} rows/s; load average {os.getloadavg()[0]:.1f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=Path, help="keep the generated JPEGs in this folder and reuse them")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--size", default="1600x1200", help="JPEG size WxH")
    ap.add_argument("--model", default="ViT-B-32:none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="1,2", help="Ray encode-actor counts to measure, comma-separated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--commit-only", metavar="DB_URL",
                    help="measure only the driver's commit rate into this catalog (synthetic rows, no model)")
    ap.add_argument("--rows", type=int, default=20_000, help="rows for --commit-only")
    args = ap.parse_args()
    if args.commit_only:
        commit_rate(args.commit_only, args.rows, args.batch_size)
        return
    args.workers = [int(x) for x in args.workers.split(",")]
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lib = args.photos or tmp / "photos"
        lib.mkdir(parents=True, exist_ok=True)
        if len(list(lib.glob("IMG_*.jpg"))) != args.count:
            for f in lib.glob("IMG_*.jpg"):
                f.unlink()
            t = time.perf_counter()
            make_jpegs(lib, args.count, (w, h))
            print(f"generated {args.count} {w}x{h} JPEGs in {time.perf_counter() - t:.1f} s")
        print(f"{versions()}; model {args.model} on CPU, batch {args.batch_size}, {args.count} photos {w}x{h}")
        out = run_all(args, lib, tmp)
    cols = ("e2e", "steady", "per_cpu_s")
    local = {c: statistics.median(r[c] for r in out["local"]) for c in cols}
    print("\nmedians     end-to-end photos/s  vs local | steady photos/s  vs local | photos per CPU-s  vs local")
    for name, runs in out.items():
        med = {c: statistics.median(r[c] for r in runs) for c in cols}
        print(f"{name:10s}  " + " | ".join(f"{med[c]:17.2f}  {med[c] / local[c]:8.3f}" for c in cols))


if __name__ == "__main__":
    main()
