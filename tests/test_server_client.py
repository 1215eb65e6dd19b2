"""The query server seen from outside: discovery through HOME/server.json (stale and foreign files ignored), the
stdlib client returning the CLI's JSON, the token rule for network binds, and a server in its own process that
answers like the CLI and sees photos another process indexes while it runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from clipsearch.indexer import errors
from clipsearch.indexer.config import AppConfig
from clipsearch.ui.client import (
    Client,
    ServerUnavailable,
    TooLargeToUpload,
    find_server,
    server_file,
    write_server_file,
)

from .conftest import TINY, make_photo
from .server_support import Live, assert_one_line_error, call, running_server, start_in_thread, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Iterator[Live]:
    yield from running_server(tmp_path_factory, tiny_encoder)


# --- discovery and the client ------------------------------------------------------------------------------------
def test_discovery_file_and_health(live: Live) -> None:
    path = server_file(live.config)
    assert (path.stat().st_mode & 0o777) == 0o600  # it may hold the token
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == "127.0.0.1" and info["token"] is None
    assert info["url"] == live.url and info["model"] == TINY
    client = find_server(live.config)
    assert client is not None and client.url == live.url
    health = client.health()
    assert health["pid"] == os.getpid() and health["home"] == str(live.config.home)


def test_client_is_a_drop_in_for_the_service(live: Live, tmp_path: Path) -> None:
    """Same signatures as SearchService, results equal to its --json output."""
    from clipsearch.indexer.storage.filters import PhotoFilter

    client = find_server(live.config)
    assert client is not None
    page = client.search("photo", k=3)
    want = live.local.search("photo", k=3)
    assert page.as_list() == want.as_list() and page.has_more and page.limit == 3 and page.counts == want.counts
    assert page.hits[0].path == want.hits[0].path
    flt = PhotoFilter(folder=str(live.library / "a"), after=datetime(2000, 1, 1), formats=("JPEG",))
    assert client.search("photo", 5, 1, flt).as_list() == live.local.search("photo", 5, 1, flt).as_list()
    image = live.library / "a/p1.jpg"
    assert client.similar(str(image), k=2).as_list() == live.local.similar(str(image), k=2).as_list()
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog, wet\n")  # one per line: "dog, wet" stays one label
    want_labels = [r.as_dict() for r in live.local.describe(str(image), labels=["cat", "dog, wet"])]
    got = client.describe(str(image), labels=str(labels))
    assert [r.as_dict() for r in got] == want_labels and got[0].label == want_labels[0]["label"]
    got = client.classify([str(image), 1], "cat,dog")
    want_cls = [r.as_dict() for r in live.local.classify([str(image), 1], "cat,dog")]
    assert [r.as_dict() for r in got] == want_cls  # sources as given: the path, then #1
    assert got[0].labels[0].score == want_cls[0]["labels"][0]["score"]
    preview = client.tag("cat,dog", dry_run=True, filters=PhotoFilter(folder=str(live.library / "b")))
    assert preview.photos_considered == 2 and preview.dry_run
    want_tag = live.local.tag("cat,dog", dry_run=True, strong_only=True).as_dict()
    assert client.tag("cat,dog", dry_run=True, strong_only=True).as_dict() == want_tag
    assert client.remove_tags("never-written") == 0
    with pytest.raises(errors.PhotoNotFound):
        client.similar(999999)
    with pytest.raises(ServerUnavailable):  # a local file in a combined query: the caller runs it in-process
        client.search(f'"red" + {image}')
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (3 * 2**20))
    with pytest.raises(TooLargeToUpload, match="at most 2 MB"):  # a ServerUnavailable: run it in-process
        client.similar(str(big))


@pytest.mark.parametrize("as_json", [False, True])
def test_the_cli_prints_a_remote_page_like_a_local_one(live: Live, capsys: pytest.CaptureFixture,
                                                       as_json: bool) -> None:
    """What the CLI prints (text or --json) is the same whether the page came from the server or in-process."""
    from argparse import Namespace

    from clipsearch.ui.commands_search import _print_page

    client = find_server(live.config)
    assert client is not None
    for query in ["a photo", '"red" - "blue"']:
        _print_page(Namespace(json=as_json), live.local.search(query, k=3))
        local = capsys.readouterr().out
        _print_page(Namespace(json=as_json), client.search(query, k=3))
        assert capsys.readouterr().out == local


def test_find_server_ignores_stale_and_foreign_files(live: Live, tmp_path: Path) -> None:
    other = dataclasses.replace(live.config, home=tmp_path / "h")
    other.home.mkdir()
    info = json.loads(server_file(live.config).read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_server_file(other, {**info, "pid": dead.pid, "db": _db(other)})
    assert find_server(other) is None  # process gone
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    write_server_file(other, {**info, "url": f"http://127.0.0.1:{closed}", "db": _db(other)})
    t = time.perf_counter()
    assert find_server(other) is None and time.perf_counter() - t < 2  # alive pid, nobody listening
    write_server_file(other, {**info, "db": "another catalog"})
    assert find_server(other) is None
    server_file(other).write_text("{not json")
    assert find_server(other) is None
    assert find_server(dataclasses.replace(live.config, model="ViT-B-32:openai")) is None  # another model named
    assert find_server(dataclasses.replace(live.config, model=None)) is not None  # the library's model


def _db(config: AppConfig) -> str:
    from clipsearch.ui.client import db_key

    return db_key(config)


def test_a_second_server_for_the_same_home_is_refused(live: Live) -> None:
    from clipsearch.ui.server import QueryServer

    with pytest.raises(errors.UsageError, match="already running"):
        QueryServer(live.config, "127.0.0.1", 0, service=live.served)


def test_client_module_is_stdlib_only() -> None:
    code = ("import sys, clipsearch.ui.client\n"
            "print(sorted(m for m in ('numpy', 'torch', 'open_clip', 'faiss', 'sqlalchemy', 'fastapi') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


# --- the token rule ----------------------------------------------------------------------------------------------
def test_cli_serve_on_the_network_without_token_exits_with_one_line(tmp_path: Path) -> None:
    code = ("import sys\nfrom clipsearch.ui.cli import main\nrc = main(sys.argv[1:])\n"
            "print('torch' in sys.modules, 'open_clip' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code, "serve", "--host", "0.0.0.0", "--home", str(tmp_path / "h"),
                          "--model", TINY], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False False 2", out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "needs a token" in out.stderr
    assert not (tmp_path / "h" / "server.json").exists()


def test_network_bind_without_token_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from clipsearch.ui.server import QueryServer, check_bind

    config = AppConfig(home=tmp_path / "home", model="no-such-model:none", device="cpu")
    for host in ["0.0.0.0", "192.168.1.10", "::", "example.org"]:
        with pytest.raises(errors.UsageError, match="needs a token") as e:
            QueryServer(config, host, 0)  # a model load would fail differently (and slowly)
        assert "\n" not in str(e.value)
    with pytest.raises(errors.UsageError, match="too short"):
        check_bind("0.0.0.0", "short")
    for host in ["127.0.0.1", "localhost", "::1", "127.0.0.2"]:
        check_bind(host, None)
    assert not server_file(config).exists()


def test_token_is_required_on_every_request(live: Live, tmp_path: Path) -> None:
    token = "t0k3n-" + "x" * 20
    config = dataclasses.replace(live.config, home=tmp_path / "net-home")
    srv, thread = start_in_thread(config, live.served, host="0.0.0.0", token=token)
    try:
        assert srv.url.startswith("http://127.0.0.1:")
        for path in ["/api/search?q=photo", "/api/status", "/docs", "/openapi.json", "/api/photos/1/original"]:
            assert_one_line_error(*call(srv.url, "GET", path), 401)
            assert_one_line_error(*call(srv.url, "GET", path, headers={"Authorization": "Bearer wrong"}), 401)
        ok = call(srv.url, "GET", "/api/search?q=photo&k=2", headers={"Authorization": f"Bearer {token}"})
        assert ok[0] == 200 and len(json.loads(ok[2])) == 2
        assert json.loads(server_file(config).read_text())["token"] == token
        client = find_server(config)  # the token comes from the discovery file
        assert client is not None and len(client.search("photo", k=2).hits) == 2
        assert_one_line_error(*call(srv.url, "POST", "/api/tag", b"{}", {"Content-Length": "999999999999"}), 401)
    finally:
        srv.stop()
        thread.join(30)
    assert not server_file(config).exists()


# --- a server in its own process ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_clipsearch_serve_answers_like_the_cli_and_sees_new_photos(tmp_path: Path, tiny_encoder: Any) -> None:
    from clipsearch.indexer.app import open_parts
    from clipsearch.search.service import SearchService

    lib, home = tmp_path / "photos", tmp_path / "home"
    for i in range(5):
        make_photo(lib / f"p{i}.jpg", 100 + i)
    common = ["--home", str(home), "--model", TINY, "--device", "cpu"]
    _cli("index", str(lib), *common, "--no-progress")
    cli_json = json.loads(_cli("search", "a photo", "-k", "3", "--json", *common))
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "serve", *common, "--port", str(_free_port())],
                            stdout=log, stderr=subprocess.STDOUT)
    config = AppConfig(home=home, model=TINY, device="cpu")
    try:
        wait_for(lambda: server_file(config).exists() or proc.poll() is not None, what="the server to start")
        client = find_server(config)
        assert client is not None, (tmp_path / "server.log").read_text()
        assert client.search("a photo", k=3).as_list() == cli_json
        parts = open_parts(config)
        local = SearchService(parts.catalog, parts.store, tiny_encoder, config.cache_dir)
        assert client.similar(2, k=3).as_list() == local.similar(2, k=3).as_list()

        for i in range(5, 8):  # indexed by another process while the server runs
            make_photo(lib / f"new{i}.jpg", 100 + i)
        _cli("index", str(lib), *common, "--no-progress")
        paths = {h["path"] for h in client.search("a photo", k=50).as_list()}
        assert {str(lib / f"new{i}.jpg") for i in range(5, 8)} <= paths and len(paths) == 8
        assert client.status()["indexed"] == 8
        assert client.search("a photo", k=4).as_list() == local.search("a photo", k=4).as_list()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
    assert rc in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()  # uvicorn re-raises SIGTERM
    assert not server_file(config).exists()
    assert isinstance(client, Client)


def test_the_token_can_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--token` shows in `ps`; --token-file and $CLIPSEARCH_TOKEN keep it off the command line."""
    import argparse

    from clipsearch.ui.commands_app import _token

    secret = tmp_path / "token"
    secret.write_text("s3cret-" + "y" * 20 + "\nignored\n")
    monkeypatch.setenv("CLIPSEARCH_TOKEN", "from-env-" + "z" * 20)
    assert _token(argparse.Namespace(token=None, token_file=secret)) == "s3cret-" + "y" * 20
    assert _token(argparse.Namespace(token="given", token_file=None)) == "given"
    assert _token(argparse.Namespace(token=None, token_file=None)) == "from-env-" + "z" * 20
    monkeypatch.delenv("CLIPSEARCH_TOKEN")
    assert _token(argparse.Namespace(token=None, token_file=None)) is None
    for bad, why in [(tmp_path / "missing", "cannot read"), (tmp_path / "empty", "is empty")]:
        if why == "is empty":
            bad.write_text("\n")
        out = subprocess.run([sys.executable, "-m", "clipsearch", "serve", "--host", "0.0.0.0", "--token-file",
                              str(bad), "--home", str(tmp_path / "h"), "--model", TINY],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and why in out.stderr
