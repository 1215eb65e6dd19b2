"""No process outlives `clipsearch index` (issue 12.4): its decode workers and multiprocessing's resource tracker
end with it, whether it is SIGKILLed mid-decode or stopped by SIGTERM; a re-run then completes the library with
every photo indexed exactly once. Processes are counted from /proc (no psutil)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipsearch.indexer.storage.catalog import Catalog

from .conftest import TINY, make_photo

pytestmark = pytest.mark.integration

N_PHOTOS = 200


@pytest.fixture(scope="module")
def big_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos large enough that decoding them keeps two workers busy for seconds (read-only: shared)."""
    root = tmp_path_factory.mktemp("big") / "lib"
    for i in range(N_PHOTOS):
        make_photo(root / f"d{i % 4}" / f"p{i:03d}.jpg", i, size=(1280, 960), quality=92)
    return root


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a live process, None when gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    f = raw.rsplit(b")", 1)[1].split()
    state = f[0].decode()
    return None if state in ("Z", "X") else (state, int(f[1]), int(f[3]), int(f[19]))


def _processes() -> dict[int, tuple[str, int, int, int]]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            found[int(name)] = st
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _descendants(root: int) -> dict[int, int]:
    """pid → start time of every live process in `root`'s session (children, grandchildren, reparented ones)."""
    return {pid: st[3] for pid, st in _processes().items() if st[2] == root and pid != root}


def _survivors(known: dict[int, int], session: int, within: float = 10.0) -> list[str]:
    """The processes among `known` (same pid and start time) or in `session` still alive after `within` s."""
    deadline = time.monotonic() + within
    while True:
        alive = {pid for pid, start in known.items() if (st := _stat(pid)) and st[3] == start}
        alive |= set(_descendants(session))
        if not alive or time.monotonic() > deadline:
            return [f"{pid}: {_cmdline(pid)}" for pid in sorted(alive)]
        time.sleep(0.1)


def _index_cmd(lib: Path, home: Path) -> list[str]:
    return [sys.executable, "-m", "clipsearch", "index", str(lib), "--home", str(home), "--model", TINY,
            "--device", "cpu", "--workers", "2", "--batch-size", "16", "--no-progress", "--json"]


def _start_index(lib: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen(_index_cmd(lib, home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for_workers(proc: subprocess.Popen, n: int = 2) -> dict[int, int]:
    """Once `n` decode workers run, every child of the indexer (workers and resource tracker)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        kids = {pid: st[3] for pid, st in _processes().items() if st[1] == proc.pid}
        if sum("spawn_main" in _cmdline(pid) for pid in kids) >= n:
            return kids
        time.sleep(0.02)
    raise AssertionError(f"no decode workers seen (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}")


def _cleanup(proc: subprocess.Popen, known: dict[int, int]) -> None:
    """Never leak processes into the next test, whatever the assertions said."""
    for pid in [proc.pid, *known, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _catalog(home: Path) -> Catalog:
    return Catalog(f"sqlite:///{home / 'catalog.db'}")


def test_sigkill_mid_decode_leaves_no_child_process(tmp_path: Path, big_library: Path) -> None:
    proc = _start_index(big_library, tmp_path / "home")
    kids: dict[int, int] = {}
    try:
        kids = _wait_for_workers(proc)
        assert any("resource_tracker" in _cmdline(pid) for pid in kids)  # counted with the workers
        os.kill(proc.pid, signal.SIGKILL)  # the indexer only: its children must go on their own
        proc.wait()
        survivors = _survivors(kids, proc.pid)
    finally:
        _cleanup(proc, kids)
    assert survivors == [], f"{len(survivors)} of {len(kids)} children outlived the SIGKILLed indexer"


def test_sigterm_ends_run_without_leftovers_and_rerun_indexes_each_photo_once(tmp_path: Path,
                                                                             big_library: Path) -> None:
    home = tmp_path / "home"
    proc = _start_index(big_library, home)
    kids: dict[int, int] = {}
    try:
        kids = _wait_for_workers(proc)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        survivors = _survivors(kids, proc.pid)
    finally:
        _cleanup(proc, kids)
    err = proc.stderr.read().decode()
    assert proc.returncode in (0, 130), err[-2000:]  # 130: stopped after the batch in flight (0: it had finished)
    assert "internal error" not in err and "Traceback" not in err, err[-2000:]
    assert survivors == [], f"{len(survivors)} of {len(kids)} children outlived the stopped indexer"
    cat = _catalog(home)
    before = cat.counts_by_status().get("indexed", 0)
    cat.dispose()

    done = subprocess.run(_index_cmd(big_library, home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["indexed"] == N_PHOTOS - before  # nothing embedded twice
    cat = _catalog(home)
    try:
        assert cat.counts_by_status()["indexed"] == N_PHOTOS
        assert len(cat.known_files()) == N_PHOTOS  # one row per file
        (space,) = cat.spaces()
        assert space.count == N_PHOTOS
    finally:
        cat.dispose()
