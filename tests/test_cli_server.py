"""The CLI answers through a running `clipsearch serve` of the same home: no model stack imported, the same output as
in-process, `-v` saying so, and the in-process path whenever the server cannot take a call or is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clipsearch.ui.client import server_file

from .conftest import TINY
from .server_support import Live, running_server

pytestmark = pytest.mark.integration

PROBE = ("import json, sys\nfrom clipsearch.ui.cli import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps({'rc': rc, 'heavy': sorted(m for m in ('torch', 'open_clip', 'onnxruntime', 'faiss') "
         "if m in sys.modules)}))")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Iterator[Live]:
    yield from running_server(tmp_path_factory, tiny_encoder)


def cli(live: Live, *args: str, home: Path | None = None) -> tuple[Any, dict[str, Any], str]:
    """Run the CLI in a fresh process (the server runs in this one): its --json output, the probe, stderr."""
    env = {k: v for k, v in os.environ.items() if k == "CLIPSEARCH_MODEL_CACHE" or not k.startswith("CLIPSEARCH_")}
    r = subprocess.run([sys.executable, "-c", PROBE, *args, "--home", str(home or live.config.home), "--json",
                        "-v"], capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    lines = r.stdout.strip().splitlines()
    probe = json.loads(lines[-1])
    assert probe["rc"] == 0, r.stderr
    return json.loads("\n".join(lines[:-1])), probe, r.stderr


def test_search_similar_describe_answered_by_the_server_without_the_model_stack(live: Live) -> None:
    hits, probe, err = cli(live, "search", "a photo", "-k", "3")
    assert hits == live.local.search("a photo", k=3).as_list()
    assert probe["heavy"] == [] and f"search answered by the server at {live.url}" in err
    one = live.local.search("a photo", k=1).hits[0]
    sim, probe, err = cli(live, "similar", str(one.id), "-k", "2")
    assert sim == live.local.similar(one.id, k=2).as_list() and probe["heavy"] == []
    image = str(live.library / "a/p1.jpg")  # a local file: uploaded to the server
    sim, probe, err = cli(live, "similar", image, "-k", "2")
    assert sim == live.local.similar(image, k=2).as_list() and probe["heavy"] == []
    described, probe, err = cli(live, "describe", image, "--labels", "cat,dog")
    assert described == [r.as_dict() for r in live.local.describe(image, labels=["cat", "dog"])]
    assert probe["heavy"] == [] and "describe answered by the server" in err


def test_a_call_the_server_cannot_take_runs_in_process(live: Live) -> None:
    image = live.library / "a/p1.jpg"
    combined = f'"red" + {image}'  # names a local file, which the server never reads
    hits, probe, err = cli(live, "search", combined, "-k", "3", "--model", TINY)  # the server's model, named
    assert hits == live.local.search(combined, k=3).as_list()
    assert "answering in-process" in err and "faiss" in probe["heavy"]  # the in-process path did the work
    assert "search answered by the server" not in err


def test_a_dead_server_file_falls_back_in_process(live: Live, tmp_path: Path) -> None:
    """A server that crashed leaves its file behind: the command still answers, in-process."""
    import dataclasses
    import shutil

    from clipsearch.ui.client import db_key

    home = tmp_path / "copy"
    shutil.copytree(live.config.home, home, ignore=shutil.ignore_patterns("server.json", "*.lock"))
    info = json.loads(server_file(live.config).read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "server.json").write_text(json.dumps({**info, "pid": dead.pid,
                                                         "db": db_key(dataclasses.replace(live.config, home=home))}))
    hits, probe, err = cli(live, "search", "a photo", "-k", "3", "--model", TINY, home=home)
    assert [h["path"] for h in hits] == [h.path for h in live.local.search("a photo", k=3).hits]
    assert "no server running" in err and "answered by the server" not in err


def test_stack_and_box_options_are_answered_by_the_server(live: Live) -> None:
    hits, probe, err = cli(live, "search", "a photo", "-k", "3", "--stack")
    assert hits == live.local.search("a photo", k=3, stack=True).as_list() and all("stack" in h for h in hits)
    assert probe["heavy"] == [] and "search answered by the server" in err
    one = live.local.search("a photo", k=1).hits[0]
    sim, probe, err = cli(live, "similar", str(one.id), "-k", "2", "--box", "0,0,8,8")
    assert sim == live.local.similar(one.id, k=2, box=(0, 0, 8, 8)).as_list()
    assert probe["heavy"] == [] and "similar answered by the server" in err
