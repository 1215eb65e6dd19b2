"""Shared by the query-server tests: real HTTP calls (stdlib), the one-line error check, and a server running in a
thread over an indexed home, with in-process services over the same parts to compare against."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clipsearch.indexer.config import AppConfig
from clipsearch.ui.client import _Multipart, server_file

from .conftest import TINY, make_indexer, make_photo


def call(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One real HTTP request (stdlib), returning status, lower-cased headers and the body."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(url: str, path: str) -> Any:
    status, _h, data = call(url, "GET", path)
    assert status == 200, data
    return json.loads(data)


def post_json(url: str, path: str, payload: Any) -> tuple[int, Any]:
    status, _h, data = call(url, "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


def post_form(url: str, path: str, parts: list[tuple[str, Any]]) -> tuple[int, Any]:
    body, ctype = _Multipart(parts).encode()
    status, _h, data = call(url, "POST", path, body, {"Content-Type": ctype})
    return status, json.loads(data)


def assert_one_line_error(status: int, headers: dict[str, str], data: bytes, expected: int) -> dict[str, str]:
    """A 4xx/5xx whose body is exactly {"error": one line, "type": ...} in JSON."""
    assert status == expected, data
    assert headers["content-type"].startswith("application/json")
    err = json.loads(data)
    assert set(err) == {"error", "type"}, err
    assert err["error"] and "\n" not in err["error"] and "Traceback" not in err["error"]
    return err


def wait_for(predicate: Any, timeout: float = 180.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclasses.dataclass
class Live:
    """A running in-thread server and the reference services over the same home."""

    config: AppConfig
    library: Path
    url: str
    served: Any  # the server's own SearchService (files refused)
    local: Any  # an in-process SearchService over the same parts (files allowed), the reference


def start_in_thread(config: AppConfig, service: Any, host: str = "127.0.0.1",
                    token: str | None = None) -> tuple[Any, threading.Thread]:
    from clipsearch.ui.server import QueryServer

    srv = QueryServer(config, host, 0, token, service=service)
    thread = threading.Thread(target=srv.run, name="query-server", daemon=True)
    thread.start()
    wait_for(lambda: server_file(config).exists() or not thread.is_alive(), what="server.json")
    assert thread.is_alive(), "the server thread ended during start-up"
    return srv, thread


def running_server(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Iterator[Live]:
    """A library of 8 photos indexed with the tiny model, served in a thread (the `live` fixture's body)."""
    from clipsearch.indexer.app import open_parts
    from clipsearch.search.service import SearchOptions, SearchService

    root = tmp_path_factory.mktemp("server")
    lib = root / "photos"
    for i in range(6):
        make_photo(lib / f"a/p{i}.jpg", i)
    make_photo(lib / "b/q.png", 10)
    make_photo(lib / "b/changed.jpg", 12)
    config = AppConfig(home=root / "home", model=TINY, device="cpu", max_upload_mb=2.0)
    make_indexer(config, tiny_encoder).run([lib])
    parts = open_parts(config)
    served = SearchService(parts.catalog, parts.store, tiny_encoder, config.cache_dir,
                           SearchOptions(allow_files=False))
    local = SearchService(parts.catalog, parts.store, tiny_encoder, config.cache_dir)
    srv, thread = start_in_thread(config, served)
    yield Live(config, lib, srv.url, served, local)
    srv.stop()
    thread.join(30)
    assert not server_file(config).exists()  # removed on the way out


def photo_id(live: Live, name: str) -> int:
    hits = live.local.search("a photo", k=50).hits
    return next(h.id for h in hits if h.path.endswith(name))
