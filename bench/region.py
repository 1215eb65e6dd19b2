"""Search by a region against search by the whole photo, on photos that hold a small object on a busy background.

Library: `--classes` objects (a shape in a colour, from the sample library's vocabulary), `--per-class` photos of
each. A photo is a sample-library background (grass, sand, water, snow, bricks, night sky) under ~40 random
clutter strokes (lines, bars, dots in random colours), with one object of radius 18-28 px somewhere in a 384x288
frame: the object covers 1-2.5 % of the photo, its query box (a square of 2.4 radii, drawn snugly) 1.5-4 %. Plus
`--clutter` photos with no object. Indexed through the real pipeline with each model, then `index_regions` (3x3
grid crops, 50 % overlap, per photo).

For every object photo, three queries over the library (the photo itself excluded): the whole photo (its stored
vector) ranked against the photos' vectors; its object's box (region_vector) ranked against the photos' vectors;
and the box ranked against photos and their grid crops (search_regions). A query succeeds when a photo with the
same object is in the top 5 (and, stricter, at rank 1).

    python bench/region.py [--classes 10] [--per-class 8] [--clutter 40] [--models demo ViT-B-32:none]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipsearch.indexer.model.sample import BACKGROUNDS, COLOURS, SHAPES, _background, _polygon

W, H = 384, 288
OBJECTS = [(s, c) for c in ("red", "blue", "yellow", "purple", "orange", "green", "white", "black") for s in SHAPES]


def _clutter(im: Image.Image, rng: np.random.Generator, n: int = 40) -> None:
    draw = ImageDraw.Draw(im)
    for _ in range(n):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = float(rng.uniform(0, W)), float(rng.uniform(0, H))
        kind = rng.integers(0, 3)
        if kind == 0:
            a, ln = rng.uniform(0, math.pi), rng.uniform(30, 120)
            end = (x + ln * math.cos(a), y + ln * math.sin(a))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(2, 6)))
        elif kind == 1:
            draw.rectangle([x, y, x + rng.uniform(20, 60), y + rng.uniform(3, 8)], fill=colour)
        else:
            r = rng.uniform(2, 5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def photo(obj: tuple[str, str] | None, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A busy photo with one small object (or none); returns it and the object's query box."""
    im = _background(str(rng.choice(BACKGROUNDS)), W, H, rng)
    _clutter(im, rng)
    if obj is None:
        return im, (0, 0, W, H)
    shape, colour = obj
    r = float(rng.uniform(18, 28))
    cx, cy = float(rng.uniform(2 * r, W - 2 * r)), float(rng.uniform(2 * r, H - 2 * r))
    fill = tuple(int(v) for v in COLOURS[colour])
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, float(rng.uniform(-0.35, 0.35))), fill=fill)
    half = 1.2 * r  # a box drawn snugly around the object
    x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
    return im, (x0, y0, min(W, int(cx + half)) - x0, min(H, int(cy + half)) - y0)


def make_library(root: Path, classes: int, per_class: int, clutter: int, seed: int = 0) -> dict[str, tuple]:
    """Write the photos; returns file name -> (object or None, box)."""
    rng = np.random.default_rng(seed)
    objects = [OBJECTS[i] for i in rng.choice(len(OBJECTS), classes, replace=False)]
    truth: dict[str, tuple] = {}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(classes * per_class + clutter):
        obj = objects[i % classes] if i < classes * per_class else None
        im, box = photo(obj, rng)
        name = f"p{i:04d}.jpg"
        im.save(root / name, quality=90)
        truth[name] = (obj, box)
    return truth


def run_model(spec: str, root: Path, truth: dict[str, tuple], workdir: Path) -> None:
    """Index the library with one model and compare region and whole-photo queries."""
    from clipsearch.indexer.app import build_indexer
    from clipsearch.indexer.config import AppConfig
    from clipsearch.search.region import RegionIndex, index_regions, region_vector, search_regions
    from clipsearch.search.service import build_service

    config = AppConfig(home=workdir / f"home-{spec.replace(':', '_').replace('/', '_')}", model=spec, device="cpu")
    build_indexer(config).run([root])
    service = build_service(config)
    rows = service.catalog.photos_by_id(list(range(1, len(truth) + 1)))
    by_name = {Path(r["path"]).name: pid for pid, r in rows.items()}
    obj_of = {by_name[n]: t[0] for n, t in truth.items()}
    t0 = time.perf_counter()
    index_regions(service.catalog, service.encoder, service.space(), grid=3, overlap=0.5)
    t_index = time.perf_counter() - t0
    regions = RegionIndex(service.catalog, service.space().id)
    hits = {"whole": [0, 0], "region": [0, 0], "region+crops": [0, 0]}
    queries, t_region = 0, 0.0
    for name, (obj, box) in truth.items():
        if obj is None:
            continue
        pid, queries = by_name[name], queries + 1
        t0 = time.perf_counter()
        vec = region_vector(service.encoder, pid, box, catalog=service.catalog)
        t_region += time.perf_counter() - t0
        ranked = {"whole": [h.id for h in service.rank(service.image_vector(pid), k=5, exclude={pid}).hits],
                  "region": [h.id for h in service.rank(vec, k=5, exclude={pid}).hits],
                  "region+crops": [h.id for h in search_regions(service.catalog, service.store, service.space(),
                                                                vec, 5, {pid}, regions)]}
        for kind, ids in ranked.items():
            found = [obj_of[i] == obj for i in ids]
            hits[kind][0] += any(found)
            hits[kind][1] += bool(found and found[0])
    rates = " | ".join(f"{hits[kind][0] / queries:.3f} / {hits[kind][1] / queries:.3f}" for kind in hits)
    print(f"| {spec} | {queries} | {rates} | {t_region / queries * 1000:.0f} | {len(truth) / t_index:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--clutter", type=int, default=40)
    ap.add_argument("--models", nargs="+", default=["demo", "ViT-B-32:none"])
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        truth = make_library(work / "library", args.classes, args.per_class, args.clutter)
        print(f"{len(truth)} photos: {args.classes} objects x {args.per_class}, {args.clutter} without an object; "
              f"object box area {np.mean([b[2] * b[3] for o, b in truth.values() if o]) / (W * H):.1%} of the photo")
        print("| model | queries | whole photo: top 5 / rank 1 | region: top 5 / rank 1 | region + grid crops: "
              "top 5 / rank 1 | region query ms | index_regions photos/s |")
        print("|---|---|---|---|---|---|---|")
        for spec in args.models:
            run_model(spec, work / "library", truth, work)


if __name__ == "__main__":
    main()

