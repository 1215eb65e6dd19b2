"""OCR: word recall and rank-1 of a word query on generated photo-like images with rendered words, and photos/s of
indexing with and without the OCR pass.

Library (`--images`, default 200): each image is a sample-library background (grass, sand, water, snow, bricks,
night sky; indexer/model/sample.py) or a plain/gradient one, 480-800 px wide, with 1-3 words rendered in a DejaVu
font (Sans, Serif, Mono, Bold, Oblique, Condensed; Debian's fonts-dejavu), 22-60 px high, rotated by up to 15
degrees, in a colour that contrasts with the background. Words are made-up letter strings (5-8 letters, lower,
upper or title case) or 4-digit numbers, each used in one image only, so a word query has one right answer.

Measured: the library indexed through the real pipeline (`--model`, default demo), then `run_ocr` over it.
Word recall: rendered words found as words of the image's recognised text (case-insensitive). Rank 1: the share of
words whose full-text query (`text:"word"`, OcrStore.search with its one-misread-character fallback) puts their
image first.

    python bench/ocr.py [--images 200] [--model demo]
"""

from __future__ import annotations

import argparse
import string
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipsearch.indexer.model.sample import BACKGROUNDS, _background

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf"]


def _word(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        if rng.random() < 0.15:
            w = str(int(rng.integers(1000, 9999)))
        else:
            letters = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(5, 9))))
            w = [letters, letters.upper(), letters.title()][int(rng.integers(0, 3))]
        if w.lower() not in used:
            used.add(w.lower())
            return w


def _backdrop(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    kind = int(rng.integers(0, len(BACKGROUNDS) + 2))
    if kind < len(BACKGROUNDS):
        return _background(BACKGROUNDS[kind], w, h, rng)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if kind == len(BACKGROUNDS) else np.zeros((1, 1, 1))
    return Image.fromarray(np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8))


def render(rng: np.random.Generator, used: set[str]) -> tuple[Image.Image, list[str]]:
    """One image and its words."""
    w, h = int(rng.integers(480, 800)), int(rng.integers(360, 600))
    im = _backdrop(w, h, rng)
    words = [_word(rng, used) for _ in range(int(rng.integers(1, 4)))]
    slot = h / len(words)
    for i, word in enumerate(words):
        font = ImageFont.truetype(str(FONT_DIR / FONTS[int(rng.integers(0, len(FONTS)))]), int(rng.integers(22, 61)))
        left, top, right, bottom = font.getbbox(word)
        tw, th = right - left + 16, bottom - top + 16
        layer = Image.new("L", (tw, th), 0)
        ImageDraw.Draw(layer).text((8 - left, 8 - top), word, fill=255, font=font)
        layer = layer.rotate(float(rng.uniform(-15, 15)), expand=True, resample=Image.Resampling.BICUBIC)
        x = int(rng.integers(0, max(1, w - layer.width)))
        y = int(i * slot + rng.uniform(0, max(1.0, slot - layer.height)))
        region = np.asarray(im.crop((x, y, x + layer.width, y + layer.height)).convert("L"), np.float32)
        dark = region.mean() > 120
        colour = tuple(int(v) for v in (rng.integers(0, 60, 3) if dark else rng.integers(200, 256, 3)))
        im.paste(Image.new("RGB", layer.size, colour), (x, y), layer)
    return im, words


def make_library(root: Path, count: int, seed: int = 0) -> dict[str, list[str]]:
    """Write the images; returns file name -> words."""
    rng, used = np.random.default_rng(seed), set()
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(count):
        im, words = render(rng, used)
        name = f"t{i:04d}.jpg"
        im.save(root / name, quality=90)
        truth[name] = words
    return truth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--score-only", action="store_true", help="re-score the OCR text stored in --workdir by an "
                    "earlier run (no indexing, no OCR): for changes to the query side")
    args = ap.parse_args()
    from clipsearch.indexer.app import build_indexer, open_parts
    from clipsearch.indexer.config import AppConfig
    from clipsearch.indexer.ingest.ocr import OcrEngine
    from clipsearch.indexer.storage.ocr_store import OcrStore, words
    from clipsearch.search.ocr_search import run_ocr

    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        config = AppConfig(home=work / "home", model=args.model, device="cpu")
        if args.score_only:
            truth = make_library(work / "truth", args.images)  # the same seed: the same words
            catalog, counts, t_index, t_ocr = open_parts(config).catalog, {}, float("nan"), float("nan")
        else:
            truth = make_library(work / "library", args.images)
            t0 = time.perf_counter()
            build_indexer(config).run([work / "library"])
            t_index = time.perf_counter() - t0
            catalog = open_parts(config).catalog
            engine = OcrEngine()
            engine.read_image(Image.new("RGB", (64, 64)))  # load the ONNX sessions outside the timing (warm run)
            t0 = time.perf_counter()
            counts = run_ocr(catalog, engine)
            t_ocr = time.perf_counter() - t0
        store = OcrStore(catalog)
        rows = catalog.photos_by_id(list(range(1, len(truth) + 1)))
        by_name = {Path(r["path"]).name: pid for pid, r in rows.items()}
        texts = store.texts_of(list(by_name.values()))
        found = rank1 = total = 0
        for name, rendered in truth.items():
            seen = set(words(texts.get(by_name[name], {}).get("text", "")))
            for word in rendered:
                total += 1
                found += word.lower() in seen
                top = store.search(word, k=1)
                rank1 += bool(top and top[0][0] == by_name[name])
        n = len(truth)
        print(f"{n} images, {total} words; OCR statuses {counts}")
        print("| words | word recall | rank 1 for a word query | index photos/s (no OCR) | OCR photos/s | "
              "index + OCR photos/s |")
        print("|---|---|---|---|---|---|")
        print(f"| {total} | {found / total:.3f} | {rank1 / total:.3f} | {n / t_index:.1f} | {n / t_ocr:.2f} | "
              f"{n / (t_index + t_ocr):.2f} |")
        print(f"mean OCR time per image: {t_ocr / n * 1000:.0f} ms")


if __name__ == "__main__":
    main()
