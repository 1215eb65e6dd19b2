"""Search by a region: the box is in upright full-resolution pixels, the crop is embedded like a photo, and a box
without area or outside the photo is a one-line usage error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.indexer.errors import BadImage, PhotoNotFound, UsageError
from clipsearch.search.region import (
    RegionIndex,
    check_box,
    grid_boxes,
    index_regions,
    parse_box,
    region_vector,
    search_regions,
)

from .conftest import make_indexer, make_photo


def test_parse_box_accepts_commas_or_spaces_and_rejects_the_rest() -> None:
    assert parse_box("10,20,30,40") == (10, 20, 30, 40)
    assert parse_box(" 1 2 3 4 ") == (1, 2, 3, 4)
    for bad in ("1,2,3", "a,b,c,d", "1.5,2,3,4", "", "1,2,3,4,5"):
        with pytest.raises(UsageError) as e:
            parse_box(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("box", [(0, 0, 0, 10), (0, 0, 10, 0), (5, 5, -3, 4), (-1, 0, 10, 10), (90, 0, 20, 10),
                                 (0, 70, 10, 10), (200, 200, 5, 5)])
def test_box_without_area_or_outside_is_a_one_line_error(box) -> None:
    with pytest.raises(UsageError) as e:
        check_box(box, 96, 72)
    assert "\n" not in str(e.value) and ("outside the 96x72 photo" in str(e.value) or "no area" in str(e.value))


def test_whole_photo_box_is_allowed() -> None:
    assert check_box((0, 0, 96, 72), 96, 72) == (0, 0, 96, 72)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.integration
def test_region_embeds_the_crop_like_a_photo_of_it(tmp_path: Path, tiny_encoder) -> None:
    path = make_photo(tmp_path / "p.png", 3, size=(200, 150))
    box = (40, 30, 60, 50)
    vec = region_vector(tiny_encoder, str(path), box)
    crop = Image.open(path).convert("RGB").crop((40, 30, 100, 80))
    assert vec.shape == (tiny_encoder.space.dim,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-4
    assert _cos(vec, tiny_encoder.encode_images([crop])[0]) > 0.9999
    whole = region_vector(tiny_encoder, path.read_bytes(), (0, 0, 200, 150))
    assert _cos(vec, whole) < 0.9999  # the region is not the photo


@pytest.mark.integration
def test_box_is_in_upright_pixels_of_an_exif_rotated_photo(tmp_path: Path, tiny_encoder) -> None:
    upright = Image.open(make_photo(tmp_path / "u.png", 5, size=(160, 100))).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 100 x 160 on disk, orientation 6 turns it back
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    box = (100, 10, 50, 60)  # only inside the upright 160 x 100 photo
    vec = region_vector(tiny_encoder, buf.getvalue(), box)
    assert _cos(vec, tiny_encoder.encode_images([upright.crop((100, 10, 150, 70))])[0]) > 0.9999
    with pytest.raises(UsageError):
        region_vector(tiny_encoder, buf.getvalue(), (0, 0, 100, 160))  # the stored (sideways) size is not it


@pytest.mark.integration
def test_region_of_a_catalogued_photo_by_id_and_bad_sources(library, app_config, tiny_encoder) -> None:
    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    rows = ix.catalog.photos_by_id(list(range(1, 20)))
    pid, row = next((i, r) for i, r in rows.items() if r["path"].endswith("p0.jpg"))
    vec = region_vector(tiny_encoder, pid, (10, 10, 40, 30), catalog=ix.catalog)
    assert _cos(vec, region_vector(tiny_encoder, row["path"], (10, 10, 40, 30))) > 0.9999
    with pytest.raises(PhotoNotFound):
        region_vector(tiny_encoder, 999_999, (0, 0, 5, 5), catalog=ix.catalog)
    with pytest.raises(BadImage):
        region_vector(tiny_encoder, b"not an image", (0, 0, 5, 5))
    with pytest.raises(BadImage):
        region_vector(tiny_encoder, str(library / "missing.jpg"), (0, 0, 5, 5))


def test_grid_boxes_cover_the_photo_with_overlap() -> None:
    boxes = grid_boxes(300, 200, 3, 0.5)
    assert len(boxes) == 9 and boxes[0] == (0, 0, 150, 100) and boxes[-1] == (150, 100, 150, 100)
    assert all(check_box(b, 300, 200) == b for b in boxes)
    assert grid_boxes(300, 200, 1, 0.5) == [(0, 0, 300, 200)]


@pytest.mark.integration
def test_region_vectors_at_index_time_find_the_photo_and_the_box(library, app_config, tiny_encoder) -> None:
    from clipsearch.search.service import SearchService

    ix = make_indexer(app_config, tiny_encoder)
    ix.run([library])
    service = SearchService(ix.catalog, ix.store, tiny_encoder)
    space = service.space()
    assert index_regions(ix.catalog, tiny_encoder, space) == 8
    assert index_regions(ix.catalog, tiny_encoder, space) == 0  # done once per content
    regions = RegionIndex(ix.catalog, space.id)
    assert len(regions) == 8 * 9
    row = next(r for r in ix.catalog.photos_by_id(list(range(1, 20))).values() if r["path"].endswith("p2.jpg"))
    cell = grid_boxes(row["width"], row["height"])[4]
    query = region_vector(tiny_encoder, row["path"], cell)
    hits = search_regions(ix.catalog, ix.store, space, query, k=3, regions=regions)
    assert hits[0].id == row["id"] and hits[0].box == cell and hits[0].score > 0.99
    assert {"id", "path", "score", "box"} == set(hits[0].as_dict())
    others = search_regions(ix.catalog, ix.store, space, query, k=3, exclude={row["id"]}, regions=regions)
    assert len(others) == 3 and row["id"] not in {h.id for h in others}
    ix.catalog.dispose()
