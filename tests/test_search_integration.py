"""Search features through the real CLI with a tiny open_clip model, real FAISS and SQLite (integration twin of
test_search_unit.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from .conftest import TINY
from .test_cli import run

pytestmark = pytest.mark.integration


@pytest.fixture()
def indexed(library, tmp_path):
    home = tmp_path / "home"
    assert run("index", str(library), "--model", TINY, home=home).returncode == 0
    return library, home


def j(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_search_filters_paging_and_similar(indexed) -> None:
    library, home = indexed
    hits = j(run("search", "a photo", "-k", "3", "--folder", str(library / "a"), "--json", home=home))
    assert len(hits) == 3 and all("/a/" in h["path"] for h in hits)
    page1 = j(run("search", "a photo", "-k", "4", "--json", home=home))
    page2 = j(run("search", "a photo", "-k", "4", "--offset", "4", "--json", home=home))
    assert not {h["id"] for h in page1} & {h["id"] for h in page2} and len(page1 + page2) == 8
    by_path = j(run("similar", str(library / "a/p0.jpg"), "-k", "1", "--json", home=home))
    assert by_path[0]["path"].endswith("a/p0.jpg") and by_path[0]["score"] > 0.999  # itself, re-encoded
    by_id = j(run("similar", str(by_path[0]["id"]), "-k", "7", "--json", home=home))
    assert by_path[0]["id"] not in {h["id"] for h in by_id} and len(by_id) == 7
    combined = j(run("search", f'"2:a dog" + {library / "b/q.png"} - "snow"', "-k", "2", "--json", home=home))
    assert len(combined) == 2
    r = run("similar", "424242", home=home)
    assert r.returncode == 2 and "no indexed photo" in r.stderr
    r = run("similar", str(library / "missing.jpg"), home=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_describe_classify_texts(indexed, tmp_path) -> None:
    library, home = indexed
    img = str(library / "a/p1.jpg")
    ranked = j(run("describe", img, "--labels", "dog,cat,car", "--json", home=home))
    assert sorted(x["label"] for x in ranked) == ["car", "cat", "dog"] and {"label", "score"} <= set(ranked[0])
    vocab = j(run("describe", img, "--vocab", "imagenet", "-k", "5", "--json", home=home))
    assert len(vocab) == 5
    (tmp_path / "caps.txt").write_text("a dog\na cat\na car\n")
    assert j(run("texts", "add", str(tmp_path / "caps.txt"), "--name", "caps", "--json", home=home))["texts"] == 3
    assert len(j(run("describe", img, "--texts", "caps", "-k", "2", "--json", home=home))) == 2
    res = j(run("classify", img, str(library / "b/q.png"), "--labels", "dog,cat", "--json", home=home))
    assert len(res) == 2 and abs(sum(x["score"] for x in res[0]["labels"]) - 1) < 1e-3
    r = run("classify", img, "--labels", " , ", home=home)
    assert r.returncode == 2 and "empty" in r.stderr


def test_tag_dry_run_apply_export_remove(indexed, tmp_path) -> None:
    library, home = indexed
    dry = j(run("tag", "--labels", "dog,cat", "--threshold", "0", "--dry-run", "--json", home=home))
    assert dry["written"] == 0 and sum(dry["counts"].values()) == 8
    done = j(run("tag", "--labels", "dog,cat", "--threshold", "0", "--name", "pets", "--json", home=home))
    assert done["written"] == 8
    again = j(run("tag", "--labels", "dog,cat", "--threshold", "0", "--name", "pets", "--json", home=home))
    assert again["written"] == 8  # idempotent: replaced, not doubled
    label = max(done["counts"], key=done["counts"].get)
    tagged = j(run("search", "a photo", "--tag", label, "-k", "20", "--json", home=home))
    assert len(tagged) == done["counts"][label] and all(label in h["tags"] for h in tagged)
    out = tmp_path / "tags.csv"
    assert j(run("tag", "--export", str(out), "--json", home=home))["exported"] == 8
    assert len(list(csv.DictReader(open(out)))) == 8
    assert j(run("tag", "--remove", "pets", "--json", home=home))["removed"] == 8
    assert j(run("search", "a photo", "--tag", label, "--json", home=home)) == []


def test_thumbnails_are_upright_cached_and_by_id_only(tmp_path, tiny_encoder) -> None:
    import io

    from PIL import Image

    from clipsearch.indexer.config import AppConfig
    from clipsearch.indexer.errors import PhotoNotFound
    from clipsearch.search.service import SearchService

    from .conftest import make_indexer, make_photo

    src = make_photo(tmp_path / "lib/wide.png", 1, size=(1200, 400))
    im = Image.open(src)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "lib/rotated.jpg", exif=exif)
    src.unlink()
    cfg = AppConfig(home=tmp_path / "home", model="x")
    ix = make_indexer(cfg, tiny_encoder)
    ix.run([tmp_path / "lib"])
    svc = SearchService(ix.catalog, ix.store, tiny_encoder, cache_dir=cfg.home / "cache")
    thumb = Image.open(io.BytesIO(svc.thumbnail(1, 320)))
    assert thumb.size == (107, 320)  # upright (portrait) and no larger than requested
    assert list((cfg.home / "cache/thumbs").glob("1_320_*.jpg"))  # cached in the home dir
    with pytest.raises(PhotoNotFound):
        svc.thumbnail(2)


@pytest.mark.parametrize("exact_max", [100_000, 10])
def test_store_streams_the_catalogs_vectors_for_flat_and_ivf(tmp_path, exact_max) -> None:
    """Tagging reads vectors from the index (memory-mapped from disk); they must be exactly the catalog's, for both
    index types, and the written file must load as it is (no silent rebuild)."""
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
    from clipsearch.indexer.storage.store import StoreOptions, VectorStore

    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    sid = cat.ensure_space("k", "test", "test", 16)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    recs = [PhotoRecord(f"/p/{i}.jpg".encode(), 1, 1, "indexed", content_hash=str(i)) for i in range(3000)]
    cat.write_batch(sid, recs, dict(enumerate(vecs)))
    VectorStore(tmp_path / "idx", cat, StoreOptions(exact_max=exact_max)).rebuild(cat.space(sid))
    store = VectorStore(tmp_path / "idx", cat, StoreOptions(exact_max=exact_max, auto_rebuild=False))
    got_ids, got_vecs = zip(*store.iter_vectors(cat.space(sid), batch=700), strict=True)
    ids, streamed = np.concatenate(got_ids), np.concatenate(got_vecs)
    assert store._loaded["k"].kind.startswith("flat" if exact_max > 3000 else "ivf")
    assert sorted(ids.tolist()) == sorted(cat.embedded_ids(sid))
    want = {i: v for chunk_ids, chunk in cat.iter_vectors(sid) for i, v in zip(chunk_ids, chunk, strict=True)}
    assert all(np.array_equal(want[i], v) for i, v in zip(ids.tolist(), streamed, strict=True))
    # reuse: the same chunks through one buffer (tagging consumes each before asking for the next), after a prefetch
    store.prefetch(cat.space(sid))
    reused = [(i.copy(), v.copy()) for i, v in store.iter_vectors(cat.space(sid), batch=700, reuse=True)]
    assert np.array_equal(np.concatenate([i for i, _ in reused]), ids)
    assert np.array_equal(np.concatenate([v for _, v in reused]), streamed)


def test_tag_export_and_remove_run_without_a_model(indexed, tmp_path) -> None:
    """What `clipsearch tag --export/--remove` calls works over the real catalog without importing torch or
    open_clip (the Python twin of the unit test; the CLI will call these same functions)."""
    import subprocess
    import sys

    _, home = indexed
    assert j(run("tag", "--labels", "dog,cat", "--threshold", "0", "--name", "pets", "--json", home=home))["written"]
    script = (
        "import sys\n"
        "from clipsearch.indexer.config import load_config\n"
        "from clipsearch.indexer.storage.catalog import Catalog\n"
        "from clipsearch.search.tagging import export_tags, remove_tags\n"
        f"cat = Catalog(load_config(home={str(home)!r}).resolved_db_url)\n"
        f"print(export_tags(cat, {str(tmp_path / 'tags.json')!r}, 'pets'), remove_tags(cat, 'pets'))\n"
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["8 8", "[]"]
    assert len(json.loads((tmp_path / "tags.json").read_text())) == 8
    assert j(run("search", "a photo", "--tag", "dog", "--json", home=home)) == []


def test_an_uploaded_image_is_searched_without_warnings(library, tmp_path, tiny_encoder) -> None:
    """An upload used to print torch's 'The given NumPy array is not writable' warning: the decoder hands over a
    read-only array (np.asarray of a PIL image) that torch.from_numpy cannot share safely."""
    import warnings

    from clipsearch.indexer.config import AppConfig
    from clipsearch.search.service import SearchOptions, SearchService

    from .conftest import make_indexer

    ix = make_indexer(AppConfig(home=tmp_path / "home", model="x"), tiny_encoder)
    ix.run([library])
    svc = SearchService(ix.catalog, ix.store, tiny_encoder, options=SearchOptions(allow_files=False))
    upload = (library / "b/q.png").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = svc.similar(upload, k=1)
    assert page.hits[0].path.endswith("b/q.png")
