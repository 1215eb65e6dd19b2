"""The CLI contract: exit codes, one-line errors (no traceback), stable --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import TINY

pytestmark = pytest.mark.integration


def run(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ui.cli", *args, "--home", str(home)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_index_status_search_reindex_json(library, tmp_path) -> None:
    home = tmp_path / "home"
    r = run("index", str(library), "--model", TINY, "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["indexed"] == 8
    st = json.loads(run("status", "--json", home=home).stdout)
    assert {k: st[k] for k in ("indexed", "failed", "unsupported", "empty")} == {
        "indexed": 8, "failed": 0, "unsupported": 0, "empty": 0}
    assert st["spaces"][0]["vectors"] == 8 and st["spaces"][0]["index_current"]
    hits = json.loads(run("search", "a photo", "-k", "3", "--json", home=home).stdout)  # model from the catalog
    assert len(hits) == 3 and {"id", "path", "score"} <= set(hits[0])
    assert run("reindex", home=home).returncode == 0


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
    assert r.returncode == 3 and "no photos are indexed" in r.stderr
