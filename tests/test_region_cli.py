"""Search by a region through the product: `similar PATH|ID --box x,y,w,h` (the crop is embedded and ranked like
any query), one-line errors with exit code 2 for boxes without area, outside the photo or malformed, the Python
API, and the server's `box` parameter on GET and upload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import TINY, make_indexer
from .test_cli_options import one_line_error
from .test_ocr_cli import cli, ok_json

pytestmark = pytest.mark.integration


def _id_of(hits: list[dict], name: str) -> int:
    return next(h["id"] for h in hits if Path(h["path"]).name == name)


def test_similar_box_by_id_and_path_and_bad_boxes(library: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok_json(cli(home, "--model", TINY, "index", str(library), "--json", "--workers", "0"))
    pid = _id_of(ok_json(cli(home, "search", "a photo", "-k", "20", "--json")), "p0.jpg")
    by_id = ok_json(cli(home, "similar", str(pid), "--box", "10,10,40,30", "--json"))
    assert len(by_id) == 7 and pid not in {h["id"] for h in by_id}  # the photo itself is left out
    by_path = ok_json(cli(home, "similar", str(library / "a/p0.jpg"), "--box", "10 10 40 30", "--json"))
    assert len(by_path) == 8  # a file is not a catalogued photo: nothing is left out, the scores are the same
    assert {h["id"]: h["score"] for h in by_path if h["id"] != pid} == {h["id"]: h["score"] for h in by_id}
    for box, said in (("0,0,0,10", "no area"), ("90,0,20,10", "outside the 96x72 photo")):
        r = cli(home, "similar", str(pid), f"--box={box}")
        assert r.returncode == 2 and said in one_line_error(r), (box, r.stderr)
    r = cli(home, "similar", str(pid), "--box", "1,2,3")  # refused by the parser, before any model loads
    assert r.returncode == 2 and "--box" in one_line_error(r)
    r = cli(home, "similar", "999999", "--box", "0,0,5,5")
    assert r.returncode == 2 and "999999" in one_line_error(r)


def test_api_and_server_take_a_box(library: Path, app_config, tiny_encoder) -> None:
    from clipsearch.api import Library
    from clipsearch.indexer.app import open_parts
    from clipsearch.search.service import SearchOptions, SearchService

    from .server_support import assert_one_line_error, call, get_json, post_form, start_in_thread

    make_indexer(app_config, tiny_encoder).run([library])
    parts = open_parts(app_config)
    local = SearchService(parts.catalog, parts.store, tiny_encoder, app_config.cache_dir)
    pid = next(h.id for h in local.search("a photo", k=20).hits if h.path.endswith("p0.jpg"))
    api = Library(app_config)
    api._service = local  # the tiny encoder already loaded: the API's own wiring is tested in test_structure
    region = api.similar(pid, k=3, box=(10, 10, 40, 30))
    assert [h.id for h in region.hits] == [h.id for h in local.similar(pid, k=3, box="10,10,40,30").hits]
    served = SearchService(parts.catalog, parts.store, tiny_encoder, app_config.cache_dir,
                           SearchOptions(allow_files=False))
    srv, thread = start_in_thread(app_config, served)
    try:
        got = get_json(srv.url, f"/api/similar/{pid}?box=10,10,40,30&k=3")
        assert [h["id"] for h in got] == [h.id for h in region.hits]
        assert np.allclose([h["score"] for h in got], [h.score for h in region.hits], atol=1e-5)
        for box, expected in (("0,0,0,10", 400), ("90,0,20,10", 400), ("1,2", 400)):
            assert_one_line_error(*call(srv.url, "GET", f"/api/similar/{pid}?box={box}"), expected)
        data = (library / "a/p0.jpg").read_bytes()
        status, hits = post_form(srv.url, "/api/similar?box=10,10,40,30&k=3", [("image", ("p0.jpg", data))])
        assert status == 200 and len(hits) == 3
        status, err = post_form(srv.url, "/api/similar?box=0,0,500,10", [("image", ("p0.jpg", data))])
        assert status == 400 and "outside" in err["error"]
    finally:
        srv.stop()
        thread.join(30)
        parts.catalog.dispose()
