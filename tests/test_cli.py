"""The CLI contract: exit codes, one-line errors (no traceback), stable --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY

pytestmark = pytest.mark.integration


def run(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "clipsearch", *args, "--home", str(home)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_index_status_search_reindex_json(library, tmp_path) -> None:
    home = tmp_path / "home"
    r = run("index", str(library), "--model", TINY, "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["indexed"] == 8
    labels = Path(os.environ["CLIPSEARCH_MODEL_CACHE"]) / "labels"  # the vocabulary, embedded while the model was up
    assert len(list(labels.glob("labels-*.npy"))) >= 1  # so the first query of any library does not embed it
    st = json.loads(run("status", "--json", home=home).stdout)
    assert {k: st[k] for k in ("indexed", "failed", "unsupported", "empty")} == {
        "indexed": 8, "failed": 0, "unsupported": 0, "empty": 0}
    assert st["spaces"][0]["vectors"] == 8 and st["spaces"][0]["index_current"]
    hits = json.loads(run("search", "a photo", "-k", "3", "--json", home=home).stdout)  # model from the catalog
    assert len(hits) == 3 and {"id", "path", "score"} <= set(hits[0])
    assert run("reindex", home=home).returncode == 0
    opt = json.loads(run("optimize", "--json", home=home).stdout)
    assert [(o["index_type"], o["vectors"]) for o in opt] == [("flat-ip", 8)]
    again = json.loads(run("search", "a photo", "-k", "3", "--json", home=home).stdout)
    assert [h["id"] for h in again] == [h["id"] for h in hits]  # same answers from the retrained index


def test_errors_are_one_line_with_exit_codes(library, tmp_path) -> None:
    home = tmp_path / "home"
    r = run("index", str(library), "--model", "ViT-B-32:laion2b_s34b_b79k", home=home)
    assert r.returncode == 3
    assert "Traceback" not in r.stderr and "ViT-B-32" in r.stderr and "looked in" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    r = run("index", str(tmp_path / "nope"), "--model", TINY, home=home)
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr
    r = run("search", home=home)  # missing argument: argparse usage error
    assert r.returncode == 2
    r = run("search", "x", "--model", TINY, home=home)  # nothing indexed yet
    assert r.returncode == 3 and f"nothing is indexed yet in {home}; run clipsearch index PATH" in r.stderr


def test_demo_indexes_the_sample_library_and_serves_the_ui(tmp_path) -> None:
    """The README's first command (`make demo` runs `clipsearch demo`): sample photos indexed with the bundled model,
    then the UI answering on its port, offline."""
    import signal
    import time
    import urllib.request

    from .conftest import _free_port

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "demo", "--count", "24", "--port", str(port),
                             "--home", str(tmp_path / "home")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        deadline, up = time.time() + 240, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                up = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert up, "the UI did not answer"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert "indexed 24 sample photos" in out and f"http://127.0.0.1:{port}" in out, out
    st = json.loads(run("status", "--json", home=tmp_path / "home").stdout)
    assert st["indexed"] == 24
