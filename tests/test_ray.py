"""The Ray Data engine on a local Ray instance: same rows, statuses and vectors as the local engine; faults.

One Ray instance (`ray.init(num_cpus=2)`) serves the module. Each Ray run starts its own pool of encode actors
(each imports torch and builds the tiny model: a few seconds), so the module keeps the number of runs small.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.errors import ClusterError
from clipsearch.indexer.executors import EmbedContext, EmbedTask, LocalExecutor

from .conftest import TINY, TINY2, make_indexer, make_photo

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'clipsearch[ray]')")

pytestmark = pytest.mark.integration

_IGNORED = {"id", "updated_at"}  # row id (commit order differs between engines) and the time of the write


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for the module (no dashboard), shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def _make_library(root: Path, n: int, size: tuple[int, int] = (96, 72)) -> Path:
    """Good photos in three formats, one with EXIF date and camera, plus a corrupt JPEG, a non-image, an empty file."""
    for i in range(n):
        make_photo(root / f"d{i % 3}" / f"p{i:03d}.jpg", i, size=size)
    make_photo(root / "other/q.png", 1000, size=size)
    make_photo(root / "other/r.webp", 1001, size=size)
    exif = Image.Exif()
    exif[271], exif[272], exif[306] = "Canon", "EOS 5D", "2021:05:06 07:08:09"
    make_photo(root / "other/exif.jpg", 1002, size=size, exif=exif)
    good = (root / "d0/p000.jpg").read_bytes()
    (root / "bad").mkdir()
    (root / "bad/trunc.jpg").write_bytes(good[: len(good) // 3])
    (root / "bad/notes.jpg").write_text("not an image at all")
    (root / "bad/zero.png").write_bytes(b"")
    return root


def _rows(ix) -> dict[str, dict]:
    """Catalog rows by path, without the fields that legitimately differ between two runs."""
    ids = [k.id for k in ix.catalog.known_files().values()]
    return {r["path"]: {k: v for k, v in r.items() if k not in _IGNORED} for r in ix.catalog.photos_by_id(ids).values()}


def _vectors(ix) -> dict[str, np.ndarray]:
    (space,) = ix.catalog.spaces()
    ids = {k.id: os.fsdecode(p) for p, k in ix.catalog.known_files().items()}
    return {ids[i]: v for i, v in ix.catalog.vectors_for(space.id, list(ids)).items()}


def _ray_indexer(config, encoder, **executor_kw):
    from clipsearch.indexer.ray_executor import RayExecutor

    ix = make_indexer(config, encoder, batch_size=4)
    ix.executor = RayExecutor(backend="torch", **executor_kw)  # the backend of `tiny_encoder`, the local run's
    return ix


def test_ray_engine_gives_the_local_engines_rows_statuses_and_vectors(ray_cluster, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.config import AppConfig

    root = _make_library(tmp_path / "photos", 20)
    local = make_indexer(AppConfig(home=tmp_path / "h-local", model=TINY, device="cpu"), tiny_encoder, batch_size=4)
    local.executor = LocalExecutor(workers=1)
    rep_local = local.run([root])
    ray_ix = _ray_indexer(AppConfig(home=tmp_path / "h-ray", model=TINY, device="cpu"), tiny_encoder, workers=2)
    rep_ray = ray_ix.run([root])

    assert rep_ray.indexed == rep_local.indexed == 23
    assert rep_ray.failed == rep_local.failed and sum(rep_ray.failed.values()) == 3
    rows_local, rows_ray = _rows(local), _rows(ray_ix)
    assert rows_ray == rows_local
    exif_row = rows_ray[str(root / "other/exif.jpg")]
    assert (exif_row["camera_make"], exif_row["taken_at"].year) == ("Canon", 2021)
    assert rows_ray[str(root / "bad/trunc.jpg")]["status"] == "failed"
    assert rows_ray[str(root / "bad/notes.jpg")]["status"] == "unsupported"
    assert rows_ray[str(root / "bad/zero.png")]["status"] == "empty"
    v_local, v_ray = _vectors(local), _vectors(ray_ix)
    assert v_local.keys() == v_ray.keys() and len(v_ray) == 23
    assert min(float(v_local[p] @ v_ray[p]) for p in v_ray) > 0.9999
    assert ray_ix.catalog.spaces()[0].count == 23

    # a move and a copy on the Ray engine: recognised by content hash on the workers, no new embedding
    shutil.move(root / "d1/p001.jpg", root / "d2/moved.jpg")
    shutil.copy(root / "d0/p003.jpg", root / "d0/copy.jpg")
    again = ray_ix.run([root])
    assert (again.indexed, again.moved, again.reused, again.removed) == (0, 1, 1, 0)
    assert ray_ix.catalog.spaces()[0].count == 24


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (this test's own Ray processes, never another session's)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _encode_actor_pids() -> list[int]:
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"EncodeActor" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process through /proc")
def test_an_encode_actor_killed_mid_run_loses_and_duplicates_nothing(ray_cluster, tmp_path, app_config,
                                                                     tiny_encoder) -> None:
    root = _make_library(tmp_path / "photos", 160, size=(480, 360))
    ix = _ray_indexer(app_config, tiny_encoder, workers=1)
    killed: list[tuple[int, int]] = []
    successors: set[int] = set()

    def kill_once(done: int, total: int) -> None:
        if done >= total:
            return
        pids = _encode_actor_pids()
        if killed:
            successors.update(p for p in pids if p != killed[0][0])
            return
        assert pids, "no encode actor process found"
        os.kill(pids[0], signal.SIGKILL)  # the worker dies as a crashed node would: Ray restarts it, retries
        killed.append((pids[0], done))

    report = ix.run([root], on_progress=kill_once)
    assert killed and killed[0][1] < 166, "the actor was not killed mid-run"
    assert successors, "no restarted actor finished the run"
    assert report.indexed == 163 and sum(report.failed.values()) == 3  # nothing lost, nothing twice
    assert ix.catalog.spaces()[0].count == 163
    assert len(ix.catalog.known_files()) == 166


def test_a_killed_driver_loses_only_batches_in_flight_and_a_rerun_completes(ray_cluster, tmp_path, app_config,
                                                                            tiny_encoder) -> None:
    root = _make_library(tmp_path / "photos", 160, size=(480, 360))
    address = ray_cluster.get_runtime_context().gcs_address
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from clipsearch.indexer.app import open_parts
        from clipsearch.indexer.config import AppConfig, IndexOptions
        from clipsearch.indexer.pipeline import Indexer
        from clipsearch.indexer.ray_executor import RayExecutor

        cfg = AppConfig(home=Path({str(app_config.home)!r}), model={TINY!r}, device="cpu")
        parts = open_parts(cfg)
        from clipsearch.indexer.model.factory import create_encoder
        enc = create_encoder({TINY!r}, "cpu", "torch")
        ix = Indexer(parts.catalog, parts.store, enc, cfg.home, IndexOptions(batch_size=4),
                     executor=RayExecutor(address={address!r}, workers=1, backend="torch"))
        ix.run([Path({str(root)!r})], on_progress=lambda d, t: print(d, flush=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # kill the driver once a few batches are committed
            if line.strip().isdigit() and int(line) >= 12:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from clipsearch.indexer.storage.catalog import Catalog

    cat = Catalog(app_config.resolved_db_url)
    committed = sum(s.count for s in cat.spaces())
    cat.dispose()
    assert 0 < committed < 163

    ix = _ray_indexer(app_config, tiny_encoder, workers=1)
    report = ix.run([root])
    assert report.indexed == 163 - committed  # the re-run embeds exactly what the killed run had not committed
    assert ix.catalog.spaces()[0].count == 163


def test_an_unreadable_file_is_failed_with_the_nodes_reason(ray_cluster, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.ray_executor import RayExecutor

    good = make_photo(tmp_path / "good.jpg", 1)
    tasks = [EmbedTask(0, os.fsencode(good)), EmbedTask(1, os.fsencode(tmp_path / "gone.jpg"))]
    ctx = EmbedContext(TINY, tiny_encoder.preprocess_spec, 100_000_000, frozenset(), batch_size=4)
    seen = []
    executor = RayExecutor(workers=1, backend="torch", on_progress=seen.append)
    batches = list(executor.run(tasks, ctx, lambda: tiny_encoder))
    results = {r.key: r for batch in batches for r in batch}
    assert results[0].decoded.status == "indexed" and results[0].vector is not None
    assert results[0].decoded.pixels is None  # only vectors travel back to the driver
    assert results[1].decoded.status == "failed" and results[1].vector is None
    assert results[1].decoded.reason == "unreadable: No such file or directory"
    assert (seen[-1].done, seen[-1].total, seen[-1].failed) == (2, 2, 1) and seen[-1].eta_seconds == 0


def test_an_unreachable_address_is_one_line_before_any_work() -> None:
    from clipsearch.indexer.ray_executor import RayExecutor

    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        t = time.perf_counter()
        with pytest.raises(ClusterError) as err:
            RayExecutor(address=address).connect()
        assert time.perf_counter() - t < 10
        assert "cannot reach the Ray cluster at" in str(err.value) and "\n" not in str(err.value)


def test_without_ray_installed_the_error_names_the_extra(monkeypatch) -> None:
    from clipsearch.indexer.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ClusterError, match=r"pip install 'clipsearch\[ray\]'"):
        RayExecutor().connect()


def test_nothing_imports_ray_unless_the_ray_engine_runs() -> None:
    code = ("import sys, clipsearch, clipsearch.indexer.pipeline, clipsearch.indexer.ray_executor, "
            "clipsearch.indexer.ray_stages; assert 'ray' not in sys.modules, 'ray was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_actor_whose_model_is_another_space_refuses_to_embed(ray_cluster, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.errors import UsageError
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.indexer.ray_executor import RayExecutor

    other = create_encoder(TINY2, "cpu", "torch")  # the driver's space differs from what the nodes load
    ctx = EmbedContext(TINY, tiny_encoder.preprocess_spec, 100_000_000, frozenset(), batch_size=4)
    task = EmbedTask(0, os.fsencode(make_photo(tmp_path / "a.jpg", 1)))
    with pytest.raises(UsageError, match="the nodes must share the same weights") as err:
        list(RayExecutor(workers=1, backend="torch").run([task], ctx, lambda: other))
    assert "\n" not in str(err.value)


def test_gpus_the_cluster_does_not_have_are_an_error_not_a_hang(ray_cluster, tmp_path, tiny_encoder) -> None:
    from clipsearch.indexer.ray_executor import RayExecutor

    ctx = EmbedContext(TINY, tiny_encoder.preprocess_spec, 100_000_000, frozenset(), batch_size=4)
    task = EmbedTask(0, os.fsencode(make_photo(tmp_path / "a.jpg", 1)))
    with pytest.raises(ClusterError, match=r"more GPUs than the Ray cluster has \(0\)"):
        list(RayExecutor(gpus_per_worker=1).run([task], ctx, lambda: tiny_encoder))


def test_an_int8_model_embeds_on_cpu_actors_and_refuses_gpus_on_the_driver(ray_cluster, tmp_path) -> None:
    """An int8 space runs on ONNX Runtime on CPUs only: its actors embed exactly as the local int8 encoder does,
    and --gpus-per-worker with it is one line before any actor starts."""
    from clipsearch.indexer.errors import UsageError
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.indexer.ray_executor import RayExecutor

    int8 = create_encoder(TINY + "@int8", "cpu", "onnx")  # quantized into the session's model cache once
    ctx = EmbedContext(TINY + "@int8", int8.preprocess_spec, 100_000_000, frozenset(), batch_size=4)
    tasks = [EmbedTask(i, os.fsencode(make_photo(tmp_path / f"{i}.jpg", i))) for i in range(3)]
    with pytest.raises(UsageError, match="cannot use --gpus-per-worker") as err:
        list(RayExecutor(gpus_per_worker=1).run(tasks, ctx, lambda: int8))
    assert "\n" not in str(err.value)
    got = {r.key: r.vector for b in RayExecutor(workers=1).run(tasks, ctx, lambda: int8) for r in b}
    local = {r.key: r.vector for b in LocalExecutor(workers=0).run(tasks, ctx, lambda: int8) for r in b}
    assert sorted(got) == [0, 1, 2] and all(float(got[k] @ local[k]) > 0.9999 for k in got)


def test_shipped_jpeg_bytes_ride_a_ray_dataset_to_the_stage_that_decodes_them(ray_cluster, tmp_path,
                                                                               tiny_encoder) -> None:
    """With GPU actors, decode tasks ship plain JPEGs as bytes (pickled PendingJpegs in an object column); here a
    stage standing in for the actors decodes them with the same tensor path on the CPU (this cluster has no GPU)."""
    import pickle
    from dataclasses import replace

    import pyarrow as pa
    import ray

    from clipsearch.indexer.ingest.decode import decode_file
    from clipsearch.indexer.ray_stages import decode_batch

    paths = sorted(p for p in _make_library(tmp_path / "photos", 6).rglob("*") if p.is_file())
    spec = tiny_encoder.preprocess_spec

    def decode_shipped(batch: dict) -> dict:
        import pickle

        from clipsearch.indexer.ingest.gpu_decode import TensorJpegDecoder

        rows = np.flatnonzero(batch["has_jpeg"])
        results = TensorJpegDecoder("cpu", spec).decode([pickle.loads(bytes(batch["jpeg"][i])) for i in rows])
        pixels = np.array(batch["pixels"])
        for i, result in zip(rows, results, strict=True):
            pixels[i] = result.pixels
        return {"key": batch["key"], "meta": batch["meta"], "has": batch["has_pixels"] | batch["has_jpeg"],
                "shipped": batch["has_jpeg"], "pixels": pixels}

    table = pa.table({"key": pa.array(range(len(paths)), pa.int64()), "path": pa.array([bytes(p) for p in paths]),
                      "reuse": pa.array([True] * len(paths))})
    ds = ray.data.from_arrow([table]).map_batches(
        decode_batch, batch_size=None, batch_format="numpy",
        fn_kwargs={"preprocess": spec, "max_pixels": 100_000_000, "ship_jpeg": True},
    ).map_batches(decode_shipped, batch_size=4, batch_format="numpy")
    out = {int(k): (pickle.loads(bytes(m)), bool(h), bool(s), px) for b in ds.iter_batches(batch_format="numpy")
           for k, m, h, s, px in zip(b["key"], b["meta"], b["has"], b["shipped"], b["pixels"], strict=True)}
    assert sorted(out) == list(range(len(paths)))
    assert sum(s for _, _, s, _ in out.values()) == 7  # the six JPEGs and the one with EXIF: not the broken ones
    for k, path in enumerate(paths):
        cpu = decode_file(path, spec)
        meta, has, _, pixels = out[k]
        assert meta == replace(cpu, pixels=None) and has == (cpu.pixels is not None), path.name
        if has:
            assert np.abs(pixels.astype(int) - cpu.pixels.astype(int)).mean() < 3, path.name
