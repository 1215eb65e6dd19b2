"""Near-duplicate groups: the pixel check (copies match, look-alikes do not), grouping over a real index, stacks of
search hits, the group cache, and bad input."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.errors import EmptyLibrary, UsageError
from clipsearch.indexer.ingest.phash import SignatureTable, signature_of_bytes, signature_of_image
from clipsearch.indexer.model.sample import SampleItem, render
from clipsearch.search.duplicates import (
    DEFAULT_PHASH_MAX,
    DuplicateGroup,
    DuplicateMember,
    DuplicateOptions,
    confirm,
    duplicates_document,
    find_duplicate_groups,
    union_find,
)
from clipsearch.search.results import SearchHit
from clipsearch.search.service import SearchService
from clipsearch.search.stacks import load_groups, save_groups, stack_hits

from .conftest import make_indexer


def _original(seed: int, item: SampleItem | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    item = item or SampleItem(["circle", "star", "cross", "hexagon"][seed % 4], "red", ["sand", "grass"][seed % 2],
                              "large")
    return render(item, int(rng.integers(220, 320)), int(rng.integers(200, 300)), rng)


def _copies(im: Image.Image) -> dict[str, Image.Image]:
    """Resized, JPEG q40, 5 % cropped (off-centre) and brightness-shifted copies."""
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=40)
    dx, dy = round(w * 0.05), round(h * 0.05)
    return {"resized": im.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
            "q40": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "crop": im.crop((dx // 3, dy, dx // 3 + w - dx, h)),
            "bright": Image.fromarray(np.clip(np.asarray(im, np.int16) + 25, 0, 255).astype(np.uint8))}


def _passes(a: Image.Image, b: Image.Image) -> bool:
    table = SignatureTable.from_signatures({1: signature_of_image(a), 2: signature_of_image(b)})
    return len(confirm(table, np.array([[1, 2]]), DEFAULT_PHASH_MAX, DuplicateOptions())) == 1


@pytest.mark.parametrize("seed", range(4))
def test_edited_copies_pass_the_pixel_check(seed: int) -> None:
    original = _original(seed)
    for name, copy in _copies(original).items():
        assert _passes(original, copy), name


def test_look_alikes_of_one_kind_do_not_pass() -> None:
    item = SampleItem("hexagon", "orange", "night sky", "large")
    looks = [_original(s, item) for s in range(6)]
    passed = [(i, j) for i in range(6) for j in range(i + 1, 6) if _passes(looks[i], looks[j])]
    assert passed == []


def test_signature_sees_the_photo_upright() -> None:
    im = _original(1)
    buf = io.BytesIO()
    stored = im.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(buf, "JPEG", quality=95, exif=exif)
    sig = signature_of_bytes(buf.getvalue())
    assert abs(sig.aspect - im.width / im.height) < 0.02
    assert _passes(im, Image.open(io.BytesIO(buf.getvalue())).transpose(Image.Transpose.ROTATE_270))


def test_union_find_joins_chains_into_groups() -> None:
    assert union_find(np.array([[1, 2], [3, 4], [2, 5], [9, 9]])) == [[1, 2, 5], [3, 4]]


@pytest.fixture()
def dup_library(tmp_path: Path) -> tuple[Path, list[set[str]]]:
    """Two originals with their four copies (one also copied byte for byte), and three look-alikes."""
    root = tmp_path / "photos"
    root.mkdir()
    groups = []
    for g in range(2):
        original = _original(g)
        original.save(root / f"o{g}.jpg", quality=92)
        names = {f"o{g}.jpg"}
        for name, im in _copies(original).items():
            im.save(root / f"o{g}_{name}.png")
            names.add(f"o{g}_{name}.png")
        groups.append(names)
    (root / "o0_exact.jpg").write_bytes((root / "o0.jpg").read_bytes())
    groups[0].add("o0_exact.jpg")
    for s in range(3):
        _original(10 + s, SampleItem("circle", "red", "sand", "large")).save(root / f"other{s}.jpg", quality=92)
    return root, groups


@pytest.mark.integration
def test_groups_found_over_a_real_index(dup_library, app_config, tiny_encoder) -> None:
    root, truth = dup_library
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([root])
    service = SearchService(ix.catalog, ix.store, tiny_encoder)
    groups = find_duplicate_groups(ix.catalog, service.space())
    assert sorted(sorted(Path(m.path).name for m in g.members) for g in groups) == sorted(sorted(t) for t in truth)
    big = groups[0]
    assert big.keep.width == max(m.width for m in big.members) and not big.exact
    doc = json.loads(json.dumps(duplicates_document(groups)))
    assert doc["groups"] == 2 and doc["photos"] == 11
    member = doc["items"][0]["members"][0]
    assert {"id", "path", "size", "width", "height", "date", "format"} <= set(member) and member["size"] > 0
    assert doc["reclaimable_bytes"] == sum(m.size for g in groups for m in g.members[1:])
    # a second run reads the stored signatures instead of decoding again, and finds the same
    again = find_duplicate_groups(ix.catalog, service.space())
    assert [g.ids for g in again] == [g.ids for g in groups]


@pytest.mark.integration
def test_unreadable_photo_is_grouped_by_hash_only(dup_library, app_config, tiny_encoder, caplog) -> None:
    root, _ = dup_library
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([root])
    (root / "o0.jpg").unlink()  # gone since indexing: no signature, but its byte-identical twin still groups it
    service = SearchService(ix.catalog, ix.store, tiny_encoder)
    groups = find_duplicate_groups(ix.catalog, service.space())
    names = {Path(m.path).name for g in groups for m in g.members}
    assert {"o0.jpg", "o0_exact.jpg"} <= names
    assert "could not be read" in caplog.text


@pytest.mark.integration
def test_empty_library_and_bad_thresholds_are_one_line_errors(app_config, tiny_encoder) -> None:
    from clipsearch.indexer.app import open_parts

    parts = open_parts(app_config)
    service = SearchService(parts.catalog, parts.store, tiny_encoder)
    space = service.space(require_photos=False)
    with pytest.raises(EmptyLibrary) as e:
        find_duplicate_groups(parts.catalog, space)
    assert "\n" not in str(e.value) and "nothing to compare" in str(e.value)
    for kwargs in ({"threshold": 1.5}, {"phash_max": -1}, {"phash_max": 2.5}):
        with pytest.raises(UsageError):
            find_duplicate_groups(parts.catalog, space, **kwargs)


def _group(*ids: int) -> DuplicateGroup:
    return DuplicateGroup(tuple(DuplicateMember(i, f"/p/{i}.jpg", 100 * i, 10, 10, datetime(2024, 1, i), "JPEG", None)
                                for i in ids), exact=False)


def _hit(i: int, score: float) -> SearchHit:
    return SearchHit(i, f"/p/{i}.jpg", score, 0.0)


def test_stack_hits_folds_each_group_at_its_best_rank() -> None:
    hits = [_hit(5, 0.9), _hit(2, 0.8), _hit(7, 0.7), _hit(1, 0.6), _hit(3, 0.5)]
    stacks = stack_hits(hits, [_group(1, 2, 3, 4), _group(6, 7)])
    assert [(s.hit.id, s.ids, s.count, s.group_size) for s in stacks] == [
        (5, (5,), 1, 1), (2, (2, 1, 3), 3, 4), (7, (7,), 1, 2)]
    assert stacks[1].as_dict()["stack"] == {"count": 3, "ids": [2, 1, 3], "group_size": 4}
    assert stack_hits([], [_group(1, 2)]) == []


def test_group_cache_round_trip(tmp_path: Path) -> None:
    from clipsearch.indexer.storage.catalog import SpaceInfo

    space = SpaceInfo(1, "abc", "demo", "demo", 32, 7, -1)
    assert load_groups(tmp_path, space) is None
    groups = [_group(1, 2, 3), _group(8, 9)]
    save_groups(tmp_path, space, groups, 0.9, 6)
    back = load_groups(tmp_path, space, 0.9, 6)
    assert back == groups
    assert load_groups(tmp_path, space, 0.8, 6) is None  # made with another threshold
    other = SpaceInfo(2, "zzz", "x", "x", 32, 0, -1)
    assert load_groups(tmp_path, other) is None


def test_signature_store_on_both_catalogs(catalog_url: str) -> None:
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord
    from clipsearch.indexer.storage.phash_store import SignatureStore

    cat = Catalog(catalog_url)
    recs = [PhotoRecord(f"/p/{i}.jpg".encode(), 1, 1, "indexed", content_hash=f"h{i}") for i in range(3)]
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), recs, {})
    store, again = SignatureStore(cat), SignatureStore(cat)  # creating the table twice is harmless
    assert [i for i, _ in store.photos_needing()] == [1, 2, 3]
    sigs = {i: signature_of_image(_original(i)) for i in (1, 2)}
    store.put(sigs)
    assert [i for i, _ in again.photos_needing()] == [3]
    table = store.load()
    assert table.ids.tolist() == [1, 2] and table.hashes[0].tolist() == list(sigs[1].hashes)
    assert np.abs(table.descriptors[1] - sigs[2].descriptor).max() < 1e-3
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), [PhotoRecord(b"/p/0.jpg", 2, 2, "indexed", content_hash="new",
                                                                     id=1)], {})
    assert [i for i, _ in store.photos_needing([1, 2, 3])] == [1, 3]  # changed content: its signature is stale
    assert store.load([1, 2]).ids.tolist() == [2]
    cat.remove_photos([2])
    assert len(store.load()) == 0
    cat.dispose()
