"""Crash safety: SIGKILL a real `clipsearch index` at several points; the re-run completes consistently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.store import VectorStore

from .conftest import TINY, make_photo

pytestmark = pytest.mark.integration


def _index_cmd(root, home) -> list[str]:
    return [sys.executable, "-m", "clipsearch", "index", str(root), "--home", str(home), "--model", TINY,
            "--batch-size", "4", "--workers", "1", "--no-progress", "--json"]


def _embedded(home) -> int:
    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    n = sum(s.count for s in cat.spaces())
    cat.dispose()
    return n


def test_sigkill_at_several_points_then_rerun_is_consistent(tmp_path) -> None:
    root, home = tmp_path / "lib", tmp_path / "home"
    total = 120
    for i in range(total):
        make_photo(root / f"d{i % 4}" / f"p{i:03d}.jpg", i, size=(160, 120))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    committed = []
    for threshold in (1, 30, 70):  # kill points: early, middle, late (each run resumes the previous one)
        proc = subprocess.Popen(_index_cmd(root, home), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (home / "catalog.db").exists() and _embedded(home) >= threshold:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        committed.append(_embedded(home))
    done = subprocess.run(_index_cmd(root, home), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    report = json.loads(done.stdout)
    assert report["indexed"] == total - committed[-1]  # nothing embedded twice
    cat = Catalog(f"sqlite:///{home / 'catalog.db'}")
    assert cat.counts_by_status()["indexed"] == total
    (space,) = cat.spaces()
    assert space.count == total
    assert len(cat.known_files()) == total  # no duplicate rows
    assert VectorStore(home / "indexes", cat).index_for(space).ntotal == total
