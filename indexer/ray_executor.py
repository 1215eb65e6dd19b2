"""The Ray Data engine of the embed stage: the same decode code and statuses as the local engine, on a cluster.

Plan and commit stay on the driver (this process); only the embed stage moves. The planned paths become a Ray
Dataset; a `map_batches` CPU task per block decodes files with `indexer.ingest.decode.decode_file` (so a node that
cannot read a photo reports the same `failed` status and reason the local engine would); a pool of encode actors
(`ActorPoolStrategy`, one GPU each when the cluster has GPUs) loads the model once from the model spec and embeds;
the results stream back to the driver (`iter_batches`) and each batch is yielded for one catalog commit. A killed
driver therefore loses at most the batches in flight, and a re-run plans exactly what is missing. Ray restarts a
dead encode actor and retries its batch; the driver also drops any result it already yielded, so a retry can
never commit a photo twice.

Ray is imported only here and only when this executor connects: `import clipsearch` never loads it, and without
it installed the executor raises ClusterError naming the extra to install.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import ClipsearchError, ClusterError, UsageError
from clipsearch.indexer.executors import EmbedContext, EmbedResult, EmbedTask
from clipsearch.indexer.ingest.gpu_decode import GPU_DECODE_MODES
from clipsearch.indexer.model.protocol import Encoder
from clipsearch.indexer.status import PhotoStatus

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 5.0  # an unreachable head node fails here instead of in Ray's minutes of retries
_LOG_EVERY_S = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OUR_ERROR = re.compile(r"^clipsearch\.indexer\.errors\.(\w+): (.+)$", re.M)  # the last line of a worker's traceback
_ANY_ERROR = re.compile(r"^(?:[\w.]+(?:Error|Exception)): .+$", re.M)
_PASSES = 2  # a result Ray never delivered (it should not happen) is asked for once more, then it is an error
_ACTOR_CPUS = 1  # CPUs an encode actor reserves, and on a CPU-only cluster the threads its encoder runs


def import_ray() -> Any:
    """The `ray` module, or a one-line ClusterError saying which extra installs it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of Ray
    except ImportError as e:
        raise ClusterError("the Ray engine needs Ray Data: pip install 'clipsearch[ray]'") from e
    return ray


@dataclass(frozen=True)
class RayProgress:
    """Where a distributed run stands, after each batch the driver receives."""

    done: int  # files with a result (embedded, failed or reused)
    total: int  # files planned for this run
    failed: int  # files with a failure status so far (failed, unsupported, empty)
    seconds: float  # since the first batch was requested (cluster start-up excluded)

    @property
    def photos_per_second(self) -> float:
        """Results per second so far."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current rate; None before the first result."""
        rate = self.photos_per_second
        return (self.total - self.done) / rate if rate > 0 else None


class _Tracker:
    """Counts results; reports through the callback, a tqdm bar (opt-in) and a log line every few seconds."""

    def __init__(self, total: int, bar: bool, on_progress: Callable[[RayProgress], Any] | None) -> None:
        self.total, self.done, self.failed, self.on_progress = total, 0, 0, on_progress
        self.t0 = self.last_log = time.perf_counter()
        self.bar = None
        if bar and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="indexing (ray)", dynamic_ncols=True, smoothing=0.1)

    def update(self, results: list[EmbedResult]) -> None:
        self.done += len(results)
        self.failed += sum(r.decoded.status not in (PhotoStatus.INDEXED, "reuse") for r in results)
        now = time.perf_counter()
        p = RayProgress(self.done, self.total, self.failed, now - self.t0)
        if self.bar is not None:
            self.bar.update(len(results))
            self.bar.set_postfix(failed=self.failed, refresh=False)
        if now - self.last_log >= _LOG_EVERY_S:
            self.last_log = now
            eta = p.eta_seconds
            log.info("ray: %d/%d photos, %.1f photos/s, ETA %s, %d failed", p.done, p.total, p.photos_per_second,
                     f"{eta:.0f} s" if eta is not None else "?", p.failed)
        if self.on_progress is not None:
            self.on_progress(p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RayExecutor:
    """Runs the embed stage on a Ray cluster (Ray Data): decode on CPU tasks, encode on a pool of model actors.

    `address`: None starts a local Ray instance (or joins the one this process already started, or $RAY_ADDRESS);
    "auto" joins the cluster `ray start --head` started on this machine; "HOST:PORT" or "ray://HOST:PORT" a remote
    head node. `workers`: encode actors (None: one per GPU of the cluster, else one per CPU). `gpus_per_worker`:
    GPUs each actor reserves (None: 1 when the cluster has GPUs, else 0 and the model runs on CPU). `backend` and
    `model_cache`: what each actor passes to `create_encoder` (the driver's config; a cache on shared storage lets
    every node reuse one ONNX export or one download). `gpu_decode` (auto | on | off): with GPU actors, decode
    tasks only read, hash and check plain JPEGs and each actor decodes their pixels on its GPU (auto: where the
    node's torchvision can, else on the actor's CPU; on: an actor that cannot is an error; off: never).

    Every decode task and encode actor reserves one CPU. On a CPU-only cluster Ray Data therefore fuses the two
    stages: each actor decodes its own batch, then embeds it, on its own core (with one torch thread), which keeps
    every core busy without decode and model pre-empting each other. With GPUs the stages stay apart: the actors
    hold the GPUs and the remaining CPUs of every node run decode tasks that feed them.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
                 backend: str = "auto", model_cache: str | Path | None = None, progress: bool = False,
                 on_progress: Callable[[RayProgress], Any] | None = None, gpu_decode: str = "auto") -> None:
        if gpu_decode not in GPU_DECODE_MODES:
            raise UsageError(f"--gpu-decode must be one of {', '.join(GPU_DECODE_MODES)} (got {gpu_decode!r})")
        if workers is not None and workers < 1:
            raise UsageError(f"--workers must be at least 1 (got {workers})")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker must not be negative (got {gpus_per_worker})")
        self.address, self.workers, self.gpus_per_worker, self.backend = address, workers, gpus_per_worker, backend
        self.model_cache = str(model_cache) if model_cache is not None else None
        self.progress, self.on_progress, self.gpu_decode = progress, on_progress, gpu_decode
        self._started = False  # this executor started (or joined) Ray and shuts it down on close()

    def connect(self) -> float:
        """Join or start the cluster now (the CLI calls this before planning); returns the seconds it took.

        An unreachable address is a one-line ClusterError before any work starts."""
        ray = import_ray()
        t0 = time.perf_counter()
        local = self.address in (None, "local") and not os.environ.get("RAY_ADDRESS")
        if not local:
            check_reachable(self.address or os.environ["RAY_ADDRESS"])
        if ray.is_initialized():  # this process joined a cluster already (tests, notebooks): use that one
            return 0.0
        kwargs: dict[str, Any] = {"include_dashboard": False} if local else {}
        try:
            ray.init(address=None if local else self.address, logging_level=logging.WARNING, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever Ray raises, the user gets one line
            where = "start a local Ray instance" if local else f"connect to the Ray cluster at {self.address}"
            raise ClusterError(f"cannot {where}: {_first_line(e)}") from e
        self._started = True
        return time.perf_counter() - t0

    def close(self) -> None:
        """Shut down the Ray connection this executor opened (a no-op otherwise)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def run(self, tasks: Sequence[EmbedTask], ctx: EmbedContext,
            encoder: Callable[[], Encoder]) -> Iterator[list[EmbedResult]]:
        """Decode and embed `tasks` on the cluster; yield each batch of results as it reaches the driver."""
        if not tasks:
            return
        self.connect()
        space_key = encoder().space.key  # the driver's space: every actor must produce the same one
        tracker = _Tracker(len(tasks), self.progress, self.on_progress)
        seen: set[int] = set()
        try:
            for _ in range(_PASSES):
                pending = [t for t in tasks if t.key not in seen]
                if not pending:
                    break
                if seen:
                    log.warning("ray: %d results never arrived; asking for them again", len(pending))
                for results in self._stream(pending, ctx, space_key):
                    fresh = [r for r in results if r.key not in seen]  # a retried batch may arrive twice
                    seen.update(r.key for r in fresh)
                    if fresh:
                        tracker.update(fresh)
                        yield fresh
        finally:
            tracker.close()
        if len(seen) < len(tasks):
            raise ClusterError(f"the Ray cluster lost {len(tasks) - len(seen)} results; re-run to index them")

    def _stream(self, tasks: Sequence[EmbedTask], ctx: EmbedContext, space_key: str) -> Iterator[list[EmbedResult]]:
        """One pass of the Ray Data pipeline over `tasks`; Ray's failures become one-line ClusterErrors."""
        ray = import_ray()
        _quiet_ray_data()
        reuse_ref = (ray.put(ctx.reuse_hashes),) if ctx.reuse_hashes else None
        ds = self._dataset(tasks, ctx, space_key, reuse_ref)
        # prefetch 0: a batch reaches the commit as soon as it exists (with 1, each waited for the next one)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
        try:
            while True:
                ts = time.perf_counter()
                try:
                    batch = next(batches, None)
                except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in its own types
                    raise _cluster_error(e) from e
                ctx.stats.decode_wait += time.perf_counter() - ts
                if batch is None:
                    return
                ctx.stats.embed += float(np.sum(batch["embed_s"]))
                yield _results(batch)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a stopped run (SIGTERM, an error in commit) ends the cluster's work now

    def _dataset(self, tasks: Sequence[EmbedTask], ctx: EmbedContext, space_key: str,
                 reuse_ref: tuple[Any, ...] | None) -> Any:
        """planned paths (one block per batch) → decode tasks → encode actors."""
        import pyarrow as pa
        import ray
        from ray.data import ActorPoolStrategy

        from clipsearch.indexer.ray_stages import EncodeActor, decode_batch

        step = max(1, ctx.batch_size)
        blocks = [pa.table({"key": pa.array([t.key for t in part], pa.int64()),
                            "path": pa.array([t.path for t in part], pa.binary()),
                            "reuse": pa.array([t.allow_reuse for t in part], pa.bool_())})
                  for part in (tasks[i : i + step] for i in range(0, len(tasks), step))]
        gpus, workers = self._sizes(ray, ctx.spec)
        workers = min(workers, len(blocks))  # an actor beyond the number of blocks would only load a model
        ship_jpeg = bool(gpus) and self.gpu_decode != "off"  # GPU actors decode the JPEGs' pixels themselves
        decoded = ray.data.from_arrow(blocks).map_batches(
            decode_batch, batch_size=None, batch_format="numpy", num_cpus=1,
            fn_kwargs={"preprocess": ctx.preprocess, "max_pixels": ctx.max_pixels, "reuse_ref": reuse_ref,
                       "ship_jpeg": ship_jpeg})
        return decoded.map_batches(
            EncodeActor, batch_size=step, batch_format="numpy", compute=ActorPoolStrategy(size=workers),
            num_cpus=_ACTOR_CPUS, num_gpus=gpus,
            fn_constructor_kwargs={"spec": ctx.spec, "device": "cuda" if gpus else "cpu", "backend": self.backend,
                                   "model_cache": self.model_cache, "space_key": space_key,
                                   "gpu_decode": self.gpu_decode if ship_jpeg else "off",
                                   "preprocess": ctx.preprocess, "max_pixels": ctx.max_pixels,
                                   "cpu_threads": None if gpus else _ACTOR_CPUS})

    def _sizes(self, ray: Any, spec: str) -> tuple[float, int]:
        """GPUs per encode actor and the number of actors: as set, else from the cluster's resources. More actors
        than the cluster can hold at once would wait for resources forever, so they are capped (with a warning).
        An int8 model runs on CPUs only (onnx_quant): its actors take no GPU, and asking for one is a UsageError
        here, on the driver, before any actor starts."""
        from clipsearch.indexer.model.onnx_quant import is_int8

        have = ray.cluster_resources()
        n_gpus, n_cpus = float(have.get("GPU", 0)), max(1, int(have.get("CPU", 1)))
        if is_int8(spec):
            if self.gpus_per_worker:
                raise UsageError(f"int8 models run on ONNX Runtime on the CPU: {spec} cannot use --gpus-per-worker")
            n_gpus = 0.0
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if n_gpus >= 1 else 0.0)
        if gpus > n_gpus:
            raise ClusterError(f"--gpus-per-worker {gpus:g} asks for more GPUs than the Ray cluster has ({n_gpus:g})")
        fits = min(n_cpus, int(n_gpus // gpus)) if gpus else n_cpus
        if self.workers is None:
            return gpus, max(1, fits)
        if self.workers > fits:
            log.warning("ray: %d workers asked for, the cluster holds %d at a time: running %d", self.workers, fits,
                        fits)
            return gpus, max(1, fits)
        return gpus, self.workers


def _results(batch: dict[str, np.ndarray]) -> list[EmbedResult]:
    """One streamed batch back to EmbedResults (decode metadata, and a vector where one was computed)."""
    vectors, has = batch["vector"], batch["has_vector"]
    return [EmbedResult(int(k), pickle.loads(bytes(m)), np.array(vectors[i], np.float32) if has[i] else None)
            for i, (k, m) in enumerate(zip(batch["key"], batch["meta"], strict=True))]


def check_reachable(address: str) -> None:
    """Raise a one-line ClusterError unless the head node at `address` accepts a TCP connection within seconds."""
    if address.startswith("ray://"):
        host, _, port = address[len("ray://"):].rpartition(":")
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address(address)
        except Exception as e:  # noqa: BLE001 - "auto" with no cluster, a malformed address
            raise ClusterError(f"cannot use Ray address {address!r}: {_first_line(e)}") from e
        if resolved is None:
            raise ClusterError(f"no running Ray cluster found for address {address!r} (start one with "
                               "`ray start --head`)")
        host, _, port = resolved.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {_first_line(e)}") from e


def _cluster_error(e: BaseException) -> ClipsearchError:
    """A typed one-line error for a failed Ray job: the worker's own ClipsearchError when it raised one (Ray hands
    the driver only its traceback text when an actor failed to start), else a ClusterError with the worker's last
    error line."""
    chain: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in chain:
        if isinstance(cause, ClipsearchError):
            return cause
        chain.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = _ANSI.sub("", "\n".join(str(c) for c in chain))
    ours = _OUR_ERROR.findall(text)
    if ours:
        from clipsearch.indexer import errors

        name, message = ours[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, ClipsearchError):
            return cls(message.strip())
    last = _ANY_ERROR.findall(text)
    detail = last[-1].strip() if last else _first_line(e)
    return ClusterError(f"the Ray job failed: {detail} (committed batches are kept; re-run to resume)")


def _first_line(e: BaseException) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return line or type(e).__name__


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars, plan banners and INFO lines would interleave with ours on the driver's
    terminal; its warnings and errors still show."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": by us
