"""Decode-worker entry points. Torch-free on purpose: spawned workers import only this and indexer.decode,
so they start in a fraction of a second instead of loading torch.

Workers live and die with the process that started them. On Linux each asks the kernel for SIGKILL when its
parent dies (PR_SET_PDEATHSIG), so a SIGKILLed or crashed indexer leaves no orphan decoding on; a worker whose
parent died before it could ask exits at once. With the workers gone, multiprocessing's resource tracker exits
too: it ends when the last holder of its pipe (the parent and every worker) has gone. Workers ignore SIGINT, so
Ctrl-C in a terminal (sent to the whole process group) reaches only the parent, which stops after the batch in
flight and shuts the pool down; `sigint_held_off` covers a worker's start-up, before `init_worker` runs. SIGTERM
keeps its default, as the pool uses it to end the workers of a broken pool.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clipsearch.indexer.ingest.decode import DecodeResult, PreprocessSpec, decode_file

log = logging.getLogger(__name__)

_W: dict[str, Any] = {}
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def init_worker(spec: PreprocessSpec, max_pixels: int, reuse: frozenset[str]) -> None:
    """Per-process setup: die with the parent, leave Ctrl-C to it, then the preprocessing spec, bomb limit and
    hashes whose vectors can be reused."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held off by sigint_held_off: now ignored
    _W.update(spec=spec, max_pixels=max_pixels, reuse=reuse)
    try:
        os.nice(5)  # decoding yields to the embedding process when cores are scarce
    except OSError:
        pass


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit now if the parent is gone already.

    `parent_pid` defaults to the multiprocessing parent. The death signal is tied to the parent *thread* that
    spawned us, so a pool must be created by a thread that outlives it (true of the executor, which owns its pool
    within one call). Returns whether the death signal is armed (False off Linux, where orphans rely on the
    pool's own shutdown).
    """
    if parent_pid is None:
        parent = mp.parent_process()
        parent_pid = parent.pid if parent is not None else None
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if not armed:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    return armed


@contextmanager
def sigint_held_off() -> Iterator[None]:
    """Block SIGINT in this thread while it submits to (and so spawns) decode workers: a worker inherits the
    block across exec and keeps it until `init_worker` ignores SIGINT, so a Ctrl-C during its start-up cannot
    kill it and break the pool. A Ctrl-C meant for this process is only delayed: it arrives when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def decode_task(path: bytes, allow_reuse: bool = True) -> DecodeResult:
    """Decode one file with the per-process settings (allow_reuse=False: always decode, never answer "reuse")."""
    return decode_file(path, _W["spec"], _W["max_pixels"], _W["reuse"] if allow_reuse else frozenset())
