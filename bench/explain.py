"""Does the "why did it match" heatmap point at the right place? Peak-in-box rates on generated photos (issue 18).

Photos come from the sample library's renderer (`clipsearch make-sample`: one shape of a colour on a textured
background, photo sizes as make-sample draws them) with a seed the library never used. The shape's pixels are
known exactly: the same photo is rendered a second time with the shape in another colour (same seed, so the same
background and geometry) and the pixels that differ are the shape; its bounding box is the box.

* single: one named object per photo; the query names it ("a red star"). Hit = the heatmap's peak lies in the
  object's box (and, stricter, on the object itself).
* pairs: two small objects of different shape and colour, boxes apart, in one photo; each is asked for in turn.
  Hit = peak in the named object's box; "other" = peak in the other object's box (should stay low).

Baselines, side by side: "chance" is the hit rate of a peak drawn uniformly over the photo (the mean fraction of
the photo the box covers); "centre" puts the peak at the photo's centre (objects are placed uniformly, so large
ones often cover it). Every heatmap goes through the public `clipsearch.search.explain.explain`.

    python bench/explain.py [--n 120] [--pairs 100] [--seed 2024] [--models demo ViT-B-32:none] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.sample import BACKGROUNDS, COLOURS, SHAPES, SampleItem, render, sample_items
from clipsearch.search.explain import explain

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class Case:
    """One photo, the object a query names, and where that object (and any other) is."""

    image: Image.Image
    query: str
    box: Box
    mask: np.ndarray  # (H, W) bool: the named object's pixels
    other: Box | None = None  # the other object's box (pairs only)


def boxed_photo(item: SampleItem, w: int, h: int, seed: int) -> tuple[Image.Image, Box, np.ndarray]:
    """The rendered photo, its shape's bounding box and pixel mask (from a second render in another colour)."""
    photo = render(item, w, h, np.random.default_rng(seed))
    other = "white" if item.colour == "black" else "black"
    twin = render(SampleItem(item.shape, other, item.background, item.size), w, h, np.random.default_rng(seed))
    mask = np.abs(np.asarray(photo, np.int16) - np.asarray(twin, np.int16)).max(axis=-1) > 40
    ys, xs = np.nonzero(mask)
    return photo, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), mask


def single_cases(n: int, seed: int) -> list[Case]:
    """n photos of one object each, attributes balanced as make-sample draws them."""
    rng = np.random.default_rng(seed)
    out = []
    for item in sample_items(n, seed):
        w, h = int(rng.integers(160, 320)), int(rng.integers(140, 300))
        photo, box, mask = boxed_photo(item, w, h, int(rng.integers(1 << 30)))
        out.append(Case(photo, f"a {item.colour} {item.shape}", box, mask))
    return out


def _apart(a: Box, b: Box) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def pair_cases(n: int, seed: int) -> list[Case]:
    """n photos of two small objects (different shape and colour, boxes apart); two cases each."""
    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    out: list[Case] = []
    while len(out) < 2 * n:
        w, h = int(rng.integers(200, 320)), int(rng.integers(180, 300))
        (sa, sb), (ca, cb), bg = rnd.sample(SHAPES, 2), rnd.sample(list(COLOURS), 2), rnd.choice(BACKGROUNDS)
        a, b = SampleItem(sa, ca, bg, "small"), SampleItem(sb, cb, bg, "small")
        pa, box_a, mask_a = boxed_photo(a, w, h, int(rng.integers(1 << 30)))
        pb, box_b, mask_b = boxed_photo(b, w, h, int(rng.integers(1 << 30)))
        if not _apart(box_a, box_b):
            continue
        arr = np.asarray(pa).copy()
        arr[mask_b] = np.asarray(pb)[mask_b]
        photo = Image.fromarray(arr)
        out.append(Case(photo, f"a {ca} {sa}", box_a, mask_a, box_b))
        out.append(Case(photo, f"a {cb} {sb}", box_b, mask_b, box_a))
    return out


def _inside(p: tuple[int, int] | None, box: Box | None) -> bool:
    return p is not None and box is not None and box[0] <= p[0] < box[2] and box[1] <= p[1] < box[3]


def measure(encoder: object, method: str, cases: list[Case]) -> dict[str, float]:
    """Hit rates of one encoder and method over cases, and the mean time of one explain call."""
    box = on = other = 0
    t = time.perf_counter()
    name = method
    for c in cases:
        heat = explain(encoder, c.image, c.query, method)
        name = heat.method
        box += _inside(heat.peak, c.box)
        on += heat.peak is not None and bool(c.mask[heat.peak[1], heat.peak[0]])
        other += _inside(heat.peak, c.other)
    ms = (time.perf_counter() - t) / len(cases) * 1000
    return {"method": name, "box": box / len(cases), "mask": on / len(cases), "other": other / len(cases), "ms": ms}


def baselines(cases: list[Case]) -> dict[str, float]:
    """Uniform-random peak (expected rate = box area / photo area) and a peak at the photo centre."""
    chance = np.mean([(c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) / (c.image.width * c.image.height)
                      for c in cases])
    centre = np.mean([_inside((c.image.width // 2, c.image.height // 2), c.box) for c in cases])
    return {"chance": float(chance), "centre": float(centre)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=120, help="single-object photos")
    ap.add_argument("--pairs", type=int, default=100, help="two-object photos (each object asked for once)")
    ap.add_argument("--seed", type=int, default=2024, help="not a make-sample seed the demo model was trained on")
    ap.add_argument("--models", nargs="+", default=["demo", "ViT-B-32:none"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    single, pairs = single_cases(args.n, args.seed), pair_cases(args.pairs, args.seed + 1)
    for label, cases in (("single", single), ("pairs", pairs)):
        b = baselines(cases)
        print(f"{label:6s} baselines ({len(cases)} cases): chance {b['chance']:.3f}  centre {b['centre']:.3f}")
    print(f"{'model':16s} {'method':16s} {'set':6s} {'n':>4s} {'peak in box':>11s} {'on object':>9s} "
          f"{'in other':>8s} {'ms/photo':>8s}")
    for spec in args.models:
        encoder = create_encoder(spec, "cpu", backend="torch")
        methods = ["gradcam", "tokens"] if spec == "demo" else ["auto"]
        for method in methods:
            for label, cases in (("single", single), ("pairs", pairs)):
                r = measure(encoder, method, cases)
                other = f"{r['other']:.3f}" if label == "pairs" else "-"
                print(f"{spec:16s} {r['method']:16s} {label:6s} {len(cases):4d} {r['box']:11.3f} {r['mask']:9.3f} "
                      f"{other:>8s} {r['ms']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
