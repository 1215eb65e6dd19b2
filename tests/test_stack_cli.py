"""Near-duplicate stacks in search results: `search --stack` / `similar --stack` through the CLI, the service's
groups (made on demand for a small library and saved, or refused with a one-line hint on a big one), paging in
stacks, and the server's `stack` parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsearch.indexer.errors import UsageError
from clipsearch.search.service import SearchOptions, SearchService

from .conftest import TINY, make_indexer
from .test_duplicates import _copies, _original
from .test_ocr_cli import cli, ok_json

pytestmark = pytest.mark.integration


@pytest.fixture()
def stack_library(tmp_path: Path) -> Path:
    """One original with four edited copies, and three photos of other shapes."""
    root = tmp_path / "photos"
    root.mkdir()
    original = _original(0)
    original.save(root / "o.jpg", quality=92)
    for name, im in _copies(original).items():
        im.save(root / f"o_{name}.png")
    for s in range(1, 4):
        _original(s).save(root / f"other{s}.jpg", quality=92)
    return root


def _copy_ids(hits: list[dict]) -> set[int]:
    return {h["id"] for h in hits if Path(h["path"]).name == "o.jpg" or Path(h["path"]).name.startswith("o_")}


def test_search_and_similar_fold_a_duplicate_group_into_one_stack(stack_library: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok_json(cli(home, "--model", TINY, "index", str(stack_library), "--json", "--workers", "0"))
    flat = ok_json(cli(home, "search", "a photo", "-k", "20", "--json"))
    assert len(flat) == 8 and all("stack" not in h for h in flat)
    stacked = ok_json(cli(home, "search", "a photo", "-k", "20", "--stack", "--json"))
    assert len(stacked) == 4 and [h["rank"] for h in stacked] == [1, 2, 3, 4]
    group = next(h for h in stacked if h["stack"]["count"] > 1)
    assert group["stack"] == {"count": 5, "ids": group["stack"]["ids"], "group_size": 5}
    assert set(group["stack"]["ids"]) == _copy_ids(flat) and group["stack"]["ids"][0] == group["id"]
    assert all(h["stack"] == {"count": 1, "ids": [h["id"]], "group_size": 1} for h in stacked if h is not group)
    assert list((home / "cache").glob("duplicates-*.json"))  # grouped once, on demand, and kept
    text = cli(home, "search", "a photo", "--stack")
    assert text.returncode == 0 and "[stack of 5: #" in text.stdout, text.stderr
    pid = group["id"]
    similar = ok_json(cli(home, "similar", str(pid), "--stack", "--json"))
    copies = next(h for h in similar if h["stack"]["count"] > 1)  # its own copies, itself left out
    assert copies["stack"]["count"] == 4 and pid not in copies["stack"]["ids"] and len(similar) == 4


def test_stacks_page_and_big_libraries_need_clipsearch_duplicates(stack_library: Path, app_config,
                                                                  tiny_encoder) -> None:
    from clipsearch.search.duplicates import find_duplicate_groups
    from clipsearch.search.stacks import save_groups

    ix = make_indexer(app_config, tiny_encoder)
    ix.run([stack_library])
    cache = app_config.cache_dir
    big = SearchService(ix.catalog, ix.store, tiny_encoder, cache, SearchOptions(stack_on_demand=3))
    with pytest.raises(UsageError) as e:
        big.search("a photo", stack=True)
    assert "run clipsearch duplicates" in str(e.value) and "\n" not in str(e.value)
    save_groups(cache, big.space(), find_duplicate_groups(ix.catalog, big.space()), 0.9, 6)
    full = big.search("a photo", k=20, stack=True)
    assert [h.rank for h in full.hits] == [1, 2, 3, 4] and not full.has_more
    assert sorted(h.stack.count for h in full.hits) == [1, 1, 1, 5]
    second = big.search("a photo", k=2, offset=2, stack=True)  # k and offset count stacks
    assert [h.id for h in second.hits] == [h.id for h in full.hits[2:4]] and [h.rank for h in second.hits] == [3, 4]
    assert big.search("a photo", k=2, stack=True).has_more
    mem = SearchService(ix.catalog, ix.store, tiny_encoder)  # no cache dir: grouped in memory
    assert [h.stack.as_dict() for h in mem.search("a photo", k=20, stack=True).hits] == [
        h.stack.as_dict() for h in full.hits]
    ix.catalog.dispose()


def test_server_search_takes_stack(stack_library: Path, app_config, tiny_encoder) -> None:
    from clipsearch.indexer.app import open_parts

    from .server_support import get_json, start_in_thread

    make_indexer(app_config, tiny_encoder).run([stack_library])
    parts = open_parts(app_config)
    served = SearchService(parts.catalog, parts.store, tiny_encoder, app_config.cache_dir,
                           SearchOptions(allow_files=False))
    srv, thread = start_in_thread(app_config, served)
    try:
        hits = get_json(srv.url, "/api/search?q=a+photo&k=20&stack=true")
        assert sorted(h["stack"]["count"] for h in hits) == [1, 1, 1, 5]
        flat = get_json(srv.url, "/api/search?q=a+photo&k=20")
        assert len(flat) == 8 and all("stack" not in h for h in flat)
        pid = next(h["id"] for h in hits if h["stack"]["count"] == 5)
        similar = get_json(srv.url, f"/api/similar/{pid}?stack=true")
        assert json.dumps(similar) and max(h["stack"]["count"] for h in similar) == 4
    finally:
        srv.stop()
        thread.join(30)
        parts.catalog.dispose()


def test_clipsearch_duplicates_saves_the_groups_that_stacking_reuses(stack_library: Path, tmp_path: Path,
                                                                    tiny_encoder) -> None:
    """On a library too big to group during a query, `clipsearch duplicates` is the step that makes stacks work."""
    from clipsearch.indexer.app import open_parts
    from clipsearch.indexer.config import AppConfig
    from clipsearch.search.stacks import load_groups

    home = tmp_path / "home"
    ok_json(cli(home, "index", str(stack_library), "--model", TINY, "--json"))
    found = ok_json(cli(home, "duplicates", "--json"))
    parts = open_parts(AppConfig(home=home))
    saved = load_groups(AppConfig(home=home).cache_dir, parts.catalog.spaces()[0])
    assert saved is not None and [len(g.members) for g in saved] == [len(g["members"]) for g in found["items"]]
    big = SearchService(parts.catalog, parts.store, tiny_encoder, AppConfig(home=home).cache_dir,
                        SearchOptions(stack_on_demand=3))
    assert big.groups.index(big.space())  # the saved groups, not the refusal
    parts.catalog.dispose()
