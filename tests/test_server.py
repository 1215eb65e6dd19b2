"""The query server (`clipsearch serve`) over a real uvicorn on 127.0.0.1: every endpoint answers what the CLI's
`--json` prints, and every bad input gets a 4xx with one line of JSON (never a traceback, never a file outside the
catalog). Discovery, the client, the token rule and a server in its own process: test_server_client.py."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from clipsearch.indexer import errors
from clipsearch.ui.client import _Multipart

from .server_support import Live, assert_one_line_error, call, get_json, photo_id, post_form, post_json, running_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Iterator[Live]:
    yield from running_server(tmp_path_factory, tiny_encoder)


# --- endpoints ---------------------------------------------------------------------------------------------------
def test_search_equals_in_process_service(live: Live) -> None:
    for query, k in [("a photo of a red square", 5), ('"2:dog" - "snow"', 3), ("blue", 20)]:
        status, headers, data = call(live.url, "GET", f"/api/search?q={urllib.parse.quote(query)}&k={k}")
        assert status == 200
        want = live.local.search(query, k=k)
        assert json.loads(data) == json.loads(json.dumps(want.as_list(), default=str))
        assert headers["x-has-more"] == ("true" if want.has_more else "false")
        assert float(headers["server-timing"].split("dur=")[1]) > 0
        assert all(os.path.isabs(h["path"]) for h in json.loads(data))


def test_search_paging_and_filters(live: Live) -> None:
    from clipsearch.indexer.storage.filters import PhotoFilter

    first = get_json(live.url, "/api/search?q=photo&k=3")
    second = get_json(live.url, "/api/search?q=photo&k=3&offset=3")
    assert not {h["id"] for h in first} & {h["id"] for h in second}
    folder = str(live.library / "b")
    hits = get_json(live.url, f"/api/search?q=photo&k=10&folder={urllib.parse.quote(folder)}")
    assert hits and all(h["path"].startswith(folder + "/") for h in hits)
    pngs = get_json(live.url, "/api/search?q=photo&format=PNG&after=2000-01-01")
    assert [h["path"] for h in pngs] == [str(live.library / "b/q.png")]
    want = live.local.search("photo", k=10, filters=PhotoFilter(folder=folder))
    assert hits == json.loads(json.dumps(want.as_list(), default=str))


def test_similar_by_id_and_by_upload(live: Live) -> None:
    pid = photo_id(live, "p1.jpg")
    got = get_json(live.url, f"/api/similar/{pid}?k=4")
    assert got == live.local.similar(pid, k=4).as_list() and pid not in {h["id"] for h in got}
    image = live.library / "a/p2.jpg"
    status, hits = post_form(live.url, "/api/similar?k=4", [("image", ("p2.jpg", image.read_bytes()))])
    assert status == 200 and hits == live.local.similar(str(image), k=4).as_list()
    assert hits[0]["path"] == str(image)  # the photo itself, found from its bytes


def test_describe_by_id_json_and_upload(live: Live) -> None:
    pid = photo_id(live, "p3.jpg")
    want = [r.as_dict() for r in live.local.describe(pid, labels="cat,dog,red square", k=3)]
    assert post_json(live.url, "/api/describe", {"image": pid, "labels": "cat,dog,red square", "k": 3}) == (200, want)
    assert post_json(live.url, "/api/describe", {"image": pid, "labels": ["cat", "dog", "red square"],
                                                 "k": 3}) == (200, want)
    upload = [("image", ("p3.jpg", (live.library / "a/p3.jpg").read_bytes())), ("labels", "cat,dog,red square"),
              ("k", "3")]
    assert post_form(live.url, "/api/describe", upload) == (200, want)
    as_file = [("image", str(pid)), ("labels", ("labels.txt", b"cat\ndog\n# comment\nred square\n")), ("k", "3")]
    assert post_form(live.url, "/api/describe", as_file) == (200, want)
    templates = "a photo of a {}.\nart of the {}."
    want = [r.as_dict() for r in live.local.describe(pid, labels="cat,dog", templates=templates)]
    assert post_json(live.url, "/api/describe", {"image": pid, "labels": "cat,dog", "templates": templates}) == (
        200, want)


def test_classify_ids_and_uploads_in_order(live: Live) -> None:
    a, b = photo_id(live, "p0.jpg"), photo_id(live, "p4.jpg")
    image = live.library / "a/p5.jpg"
    parts = [("images", str(a)), ("images", ("p5.jpg", image.read_bytes())), ("images", str(b)),
             ("labels", "cat,dog=0.4"), ("multi_label", "true")]
    status, got = post_form(live.url, "/api/classify", parts)
    want = [r.as_dict() for r in live.local.classify([a, str(image), b], "cat,dog=0.4", multi_label=True)]
    assert status == 200 and [g["source"] for g in got] == [f"#{a}", "<upload>", f"#{b}"]
    assert [g["labels"] for g in got] == [w["labels"] for w in want]
    assert post_json(live.url, "/api/classify", {"images": [a, b], "labels": "cat,dog"})[0] == 200


def test_tag_preview_apply_and_remove(live: Live) -> None:
    status, preview = post_json(live.url, "/api/tag", {"labels": "cat,dog", "name": "srv", "dry_run": True,
                                                      "threshold": 0.0})
    assert status == 200 and preview["dry_run"] and preview["written"] == 0 and preview["photos_considered"] == 8
    assert all(not h["tags"] for h in get_json(live.url, "/api/search?q=photo&k=20"))
    status, applied = post_json(live.url, "/api/tag", {"labels": "cat,dog", "name": "srv", "threshold": 0.0,
                                                      "folder": str(live.library / "a")})
    assert status == 200 and applied["written"] == 6 and applied["photos_considered"] == 6
    tagged = get_json(live.url, "/api/search?q=photo&k=20&tag=cat") + get_json(live.url, "/api/search?q=photo&tag=dog")
    assert len(tagged) == 6 and all(h["tags"] for h in tagged)
    status, _h, data = call(live.url, "DELETE", "/api/tags/srv")
    assert status == 200 and json.loads(data) == {"removed": 6, "label_set": "srv"}


def test_status_equals_cli_status_data(live: Live) -> None:
    from clipsearch.ui.server_io import status_data

    got = get_json(live.url, "/api/status")
    assert got == json.loads(json.dumps(status_data(live.config), default=str))
    assert got["indexed"] == 8 and got["home"] == str(live.config.home)


def test_thumbnail_and_original_by_id_only(live: Live) -> None:
    pid = photo_id(live, "p2.jpg")
    status, headers, data = call(live.url, "GET", f"/api/photos/{pid}/thumbnail?size=48")
    assert status == 200 and headers["content-type"] == "image/jpeg" and data[:2] == b"\xff\xd8"
    status, headers, data = call(live.url, "GET", f"/api/photos/{pid}/original")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert data == (live.library / "a/p2.jpg").read_bytes()
    png = photo_id(live, "q.png")
    assert call(live.url, "GET", f"/api/photos/{png}/original")[1]["content-type"] == "image/png"


def test_original_refused_once_the_file_changed(live: Live) -> None:
    path = live.library / "b/changed.jpg"
    pid = photo_id(live, "changed.jpg")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        err = assert_one_line_error(*call(live.url, "GET", f"/api/photos/{pid}/original"), 404)
        assert "changed on disk" in err["error"]
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert call(live.url, "GET", f"/api/photos/{pid}/original")[0] == 200


def test_openapi_docs(live: Live) -> None:
    status, headers, data = call(live.url, "GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"swagger" in data.lower()
    paths = get_json(live.url, "/openapi.json")["paths"]
    for p in ["/api/search", "/api/similar/{photo_id}", "/api/similar", "/api/describe", "/api/classify", "/api/tag",
              "/api/status", "/api/photos/{photo_id}/thumbnail", "/api/photos/{photo_id}/original"]:
        assert p in paths, p
    assert "multipart/form-data" in paths["/api/describe"]["post"]["requestBody"]["content"]


def test_replies_are_not_held_back_by_nagle(live: Live) -> None:
    """A reply is written in parts (headers, body); with Nagle on, each keep-alive round trip waits ~40 ms for the
    client's delayed ACK. Even on a loaded machine some of 30 round trips take well under that without it."""
    import http.client

    u = urllib.parse.urlsplit(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    took = []
    for _ in range(30):
        t = time.perf_counter()
        conn.request("GET", "/api/health")
        assert conn.getresponse().read()
        took.append(time.perf_counter() - t)
    conn.close()
    assert min(took) < 0.030, sorted(took)[:5]


# --- bad input ---------------------------------------------------------------------------------------------------
JSON = {"Content-Type": "application/json"}
BAD_GETS = [
    ("/api/search?q=x&k=0", 400), ("/api/search?q=x&k=-3", 400), ("/api/search?q=x&k=1000000000", 400),
    ("/api/search?q=x&k=ten", 400), ("/api/search?q=x&offset=-1", 400), ("/api/search?q=x&sort=random", 400),
    ("/api/search?q=x&after=yesterday", 400), ("/api/search?k=3", 400), ("/api/search?q=%20", 400),
    ("/api/search?q=%22unbalanced", 400), ("/api/search?q=/etc/passwd%20%2B%20%22dog%22", 400),
    ("/api/search?q=%23999999", 404), ("/api/similar/999999", 404), ("/api/similar/abc", 400),
    ("/api/similar/..%2F..%2Fetc%2Fpasswd", 404), ("/api/photos/999999/thumbnail", 404),
    ("/api/photos/999999/original", 404), ("/api/photos/1/thumbnail?size=100000", 400),
    ("/api/photos/%2Fetc%2Fpasswd/original", 404), ("/etc/passwd", 404), ("/api/nothing", 404),
]


@pytest.mark.parametrize(("path", "expected"), BAD_GETS)
def test_bad_get_is_a_one_line_4xx(live: Live, path: str, expected: int) -> None:
    assert_one_line_error(*call(live.url, "GET", path), expected)


BAD_POSTS = [
    ("/api/describe", b'{"image": 1, "labels": "cat,', JSON, 400),  # malformed JSON
    ("/api/describe", b"[1, 2]", JSON, 400),  # not an object
    ("/api/describe", b'{"image": "/etc/passwd", "labels": "a,b"}', JSON, 400),  # a server path as the image
    ("/api/describe", b'{"image": "../photos/a/p1.jpg", "labels": "a,b"}', JSON, 400),
    ("/api/describe", b'{"image": 1, "labels": "/etc/passwd"}', JSON, 400),  # labels that are a server path
    ("/api/describe", b'{"image": 1, "labels": "~/.ssh/id_rsa"}', JSON, 400),
    ("/api/describe", b'{"image": 1, "labels": ""}', JSON, 400),  # no labels
    ("/api/describe", b'{"image": 1}', JSON, 400),  # neither labels, vocab nor texts
    ("/api/describe", b'{"image": 999999, "labels": "a,b"}', JSON, 404),  # unknown id
    ("/api/describe", b'{"image": 1, "labels": "a,b", "k": 0}', JSON, 400),
    ("/api/describe", b'{"image": 1, "labels": "a,b", "vocab": "imagenet"}', JSON, 400),
    ("/api/describe", b'{"image": 1, "labels": "a", "path": "/etc/passwd"}', JSON, 400),  # unknown field
    ("/api/describe", b'{"image": 1, "texts": "no-such-collection"}', JSON, 400),
    ("/api/describe", b"image=1&labels=a", {"Content-Type": "text/plain"}, 415),
    ("/api/classify", b'{"images": [], "labels": "a,b"}', JSON, 400),
    ("/api/classify", b'{"images": [1], "labels": "a,b", "threshold": 2}', JSON, 400),
    ("/api/classify", b'{"images": [1], "labels": "a,b", "templates": "no placeholder"}', JSON, 400),
    ("/api/classify", b'{"images": ["/etc/hosts"], "labels": "a,b"}', JSON, 400),
    ("/api/tag", b'{"labels": "a,b", "threshold": -1}', JSON, 400),
    ("/api/tag", b'{"labels": "/etc/passwd", "dry_run": true}', JSON, 400),
    ("/api/tag", b'{"labels": "a,b", "after": "soon", "dry_run": true}', JSON, 400),
    ("/api/tag", b"null", JSON, 400),
    ("/api/similar", b'{"image": "/etc/passwd"}', JSON, 400),
    ("/api/similar?k=0", b'{"image": 1}', JSON, 400),
]


@pytest.mark.parametrize(("path", "body", "headers", "expected"), BAD_POSTS)
def test_bad_post_is_a_one_line_4xx(live: Live, path: str, body: bytes, headers: dict, expected: int) -> None:
    assert_one_line_error(*call(live.url, "POST", path, body, headers), expected)


def test_bad_uploads(live: Live) -> None:
    for data in [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64]:
        body, ctype = _Multipart([("image", ("x.jpg", data)), ("labels", "a,b")]).encode()
        assert_one_line_error(*call(live.url, "POST", "/api/describe", body, {"Content-Type": ctype}), 422)
    body, ctype = _Multipart([("image", ("empty.jpg", b""))]).encode()
    assert_one_line_error(*call(live.url, "POST", "/api/similar", body, {"Content-Type": ctype}), 422)
    body, ctype = _Multipart([("image", ("a.jpg", b"x")), ("image", ("b.jpg", b"y"))]).encode()
    assert_one_line_error(*call(live.url, "POST", "/api/similar", body, {"Content-Type": ctype}), 400)
    body, ctype = _Multipart([("image", "1"), ("vocab", ("v.txt", b"imagenet"))]).encode()  # a file where text goes
    assert_one_line_error(*call(live.url, "POST", "/api/describe", body, {"Content-Type": ctype}), 400)
    broken = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n1"  # no closing boundary
    multipart = {"Content-Type": "multipart/form-data; boundary=xyz"}
    assert_one_line_error(*call(live.url, "POST", "/api/similar", broken, multipart), 400)


def _raw_request(url: str, head: bytes, body_chunks: Any) -> tuple[int, dict]:
    """Send a request by hand (to claim a size, or stream chunks) and read the reply as soon as it comes."""
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything: the point of the cap
        reply = b""
        try:
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except ConnectionResetError:
            pass
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[-1].strip() or b"{}")


def test_a_200_mb_upload_is_refused_before_it_is_read(live: Live) -> None:
    size = 200 * 2**20
    head = (f"POST /api/similar HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    t = time.perf_counter()
    status, err = _raw_request(live.url, head, [b"--b\r\n" + b"\x00" * 2**20])
    assert status == 413 and "upload limit" in err["error"] and "\n" not in err["error"]
    assert time.perf_counter() - t < 10  # answered from the headers, not after 200 MB


def test_a_chunked_upload_over_the_cap_is_cut_off(live: Live) -> None:
    head = (b"POST /api/similar HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    start = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'

    def chunks() -> Any:
        yield b"%x\r\n%s\r\n" % (len(start), start)
        block = b"\xff" * 2**18
        for _ in range(20):  # 5 MB against a 2 MB cap
            yield b"%x\r\n%s\r\n" % (len(block), block)

    status, err = _raw_request(live.url, head, chunks())
    assert status == 413 and "upload limit" in err["error"]


def test_unexpected_errors_are_a_logged_one_line_500(live: Live, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("disk on fire\n  File 'secret.py', line 3")

    monkeypatch.setattr(live.served, "thumbnail", boom)
    err = assert_one_line_error(*call(live.url, "GET", "/api/photos/1/thumbnail"), 500)
    assert err["error"] == "internal error: RuntimeError: disk on fire"
    assert any("internal error" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("exc", "expected"), [(errors.EmptyLibrary("no photos are indexed"), 409),
                                               (errors.IndexUnavailable("index damaged"), 503),
                                               (errors.ModelUnavailable("weights missing"), 503)])
def test_typed_errors_map_to_statuses(live: Live, monkeypatch: pytest.MonkeyPatch, exc: Exception,
                                      expected: int) -> None:
    def fail(*_a: Any, **_k: Any) -> Any:
        raise exc

    monkeypatch.setattr(live.served, "search", fail)
    err = assert_one_line_error(*call(live.url, "GET", "/api/search?q=x"), expected)
    assert err["type"] == type(exc).__name__
