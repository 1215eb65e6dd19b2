"""Is an int8 model (`SPEC@int8`, indexer/model/onnx_quant.py) worth its own embedding space? (issue 13)

For one model, fp32 ONNX export vs its int8 quantization, both on ONNX Runtime on the CPU:

* first use: quantize + check + install, into a scratch model cache holding a copy of the fp32 export;
* file sizes of both exports' towers;
* model-only speed: images/s and texts/s at batch 32 on --threads threads, fp32 and int8 rounds alternating
  (decoding is not timed: photos are decoded once beforehand);
* agreement: min/mean cosine int8 vs fp32 of the image vectors of real photos and of query texts;
* recall loss: the int8 top-10 against the fp32 top-10 (overlap / 10) for text→image (QUERIES) and image→image
  (every photo as a query, itself excluded) retrieval over the photos;
* with --sample N (a trained model such as demo): `clipsearch eval`'s text→image recall@1/5/10 and zero-shot
  top-1 on a generated sample library (indexer/model/sample.py, seed 11), for both.

    python bench/int8_space.py --model ViT-B-32-256:none --photos /tmp/vs-rclip/big
    python bench/int8_space.py --model demo --sample 300
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.ingest.decode import decode_file
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.onnx_cache import cache_root
from clipsearch.indexer.model.onnx_encoder import OnnxEncoder
from clipsearch.indexer.model.onnx_quant import export_source
from clipsearch.indexer.model.sample import make_sample

QUERIES = ["a dog", "a cat on a sofa", "a beach at sunset", "mountains with snow", "a city street at night",
           "a plate of food", "a child playing", "a red car", "flowers in a garden", "a birthday cake",
           "people at a wedding", "a forest path", "a boat on a lake", "a building with columns", "a selfie",
           "a document with text", "a bicycle", "a bird in a tree", "fireworks", "a kitchen", "a red circle",
           "a blue square on sand", "a green star on grass", "a black cross in the night sky", "a white hexagon",
           "a yellow triangle on water", "a photo of a circle", "a large orange star", "a small purple square",
           "a landscape", "a portrait", "an old photo", "a screenshot", "a pet", "a car park", "a river",
           "the sea", "a church", "a market", "a train"]


def _sizes(folder: Path) -> dict[str, int]:
    return {t: sum(p.stat().st_size for p in folder.glob(f"{t}.onnx*")) for t in ("image", "text")}


def first_use(spec: str, fp32: OnnxEncoder, scratch: Path) -> tuple[float, OnnxEncoder]:
    """Seconds for the int8 model's first use (quantize, check, install) in a scratch cache over the fp32 export."""
    root = cache_root(scratch)
    shutil.copytree(fp32.export_dir, root / fp32.export_dir.name)  # copies: onnx refuses hard-linked data
    (root / "sources").mkdir()
    (root / "sources" / export_source(spec)).write_text(fp32.export_dir.name)
    start = time.perf_counter()
    enc = create_encoder(spec + "@int8", "cpu", "onnx", scratch)
    return time.perf_counter() - start, enc


def decode_photos(folder: Path, spec: Any, limit: int) -> np.ndarray:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[:limit]
    pixels = [r.pixels for r in (decode_file(p, spec) for p in paths) if r.pixels is not None]
    return np.stack(pixels)


def speed(encs: dict[str, OnnxEncoder], pixels: np.ndarray, texts: list[str], rounds: int) -> dict[str, tuple]:
    """Best-of-rounds images/s and texts/s per encoder at batch len(pixels) / len(texts), rounds alternating."""
    best = {name: [0.0, 0.0] for name in encs}
    for enc in encs.values():  # warm: sessions built, first runs done
        enc.encode_pixels(pixels[:2])
        enc.encode_texts(texts[:2])
    for _ in range(rounds):
        for name, enc in encs.items():
            t = time.perf_counter()
            enc.encode_pixels(pixels)
            best[name][0] = max(best[name][0], len(pixels) / (time.perf_counter() - t))
            t = time.perf_counter()
            enc.encode_texts(texts)
            best[name][1] = max(best[name][1], len(texts) / (time.perf_counter() - t))
    return {k: tuple(v) for k, v in best.items()}


def embed(enc: OnnxEncoder, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([enc.encode_pixels(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def top_overlap(ref: np.ndarray, got: np.ndarray, k: int, exclude_self: bool = False) -> float:
    """Mean |top-k(got) ∩ top-k(ref)| / k over query rows (scores are query × photo matrices)."""
    if exclude_self:
        ref, got = ref.copy(), got.copy()
        np.fill_diagonal(ref, -np.inf)
        np.fill_diagonal(got, -np.inf)
    a, b = np.argsort(-ref, axis=1)[:, :k], np.argsort(-got, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def agreement(fp32: OnnxEncoder, int8: OnnxEncoder, pixels: np.ndarray, batch: int) -> None:
    """Cosines int8 vs fp32, int8's own batch dependence, and the recall of int8 against fp32's top-k."""
    f_img, q_img = embed(fp32, pixels, batch), embed(int8, pixels, batch)
    alone = embed(int8, pixels[:batch], 1)  # dynamic int8 scales activations per batch: a photo's batch matters
    print(f"int8 batch dependence: cosine of a photo alone vs in a batch of {batch}: min "
          f"{(alone * q_img[:batch]).sum(1).min():.5f}")
    f_txt, q_txt = fp32.encode_texts(QUERIES), int8.encode_texts(QUERIES)
    ci, ct = (f_img * q_img).sum(1), (f_txt * q_txt).sum(1)
    print(f"cosine int8 vs fp32: images min {ci.min():.5f} mean {ci.mean():.5f} ({len(pixels)} photos); "
          f"texts min {ct.min():.5f} mean {ct.mean():.5f} ({len(QUERIES)} queries)")
    k = min(10, len(pixels) - 1)
    t2i = top_overlap(f_txt @ f_img.T, q_txt @ q_img.T, k)
    i2i = top_overlap(f_img @ f_img.T, q_img @ q_img.T, k, exclude_self=True)
    print(f"recall@{k} of int8 against the fp32 top-{k}: text->image {t2i:.3f} ({len(QUERIES)} queries), "
          f"image->image {i2i:.3f} ({len(pixels)} queries)")


def labelled(fp32: OnnxEncoder, int8: OnnxEncoder, count: int) -> None:
    from clipsearch.search.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        make_sample(Path(tmp), count, seed=11)
        for name, enc in (("fp32", fp32), ("int8", int8)):
            res = evaluate(Path(tmp), enc, relevance=False)
            t2i = "  ".join(f"{k} {v:.3f}" for k, v in res["text_to_image"].items())
            print(f"sample library ({count} labelled photos) {name}: text->image {t2i}; "
                  f"zero-shot top1 {res['zero_shot']['top1']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="base model spec (its @int8 twin is compared with it)")
    ap.add_argument("--photos", type=Path, help="folder of photos for agreement and recall (default: a sample)")
    ap.add_argument("--limit", type=int, default=200, help="at most this many photos")
    ap.add_argument("--sample", type=int, default=0, help="also evaluate on a labelled sample library of N photos")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    fp32 = create_encoder(args.model, "cpu", "onnx")
    assert isinstance(fp32, OnnxEncoder)
    with tempfile.TemporaryDirectory() as scratch:
        seconds, int8 = first_use(args.model, fp32, Path(scratch))
        print(f"{args.model}: fp32 space {fp32.space.key}, int8 space {int8.space.key}")
        print(f"first use of @int8 (quantize + check + install): {seconds:.1f} s")
        fs, qs = _sizes(fp32.export_dir), _sizes(int8.export_dir)
        print("files: " + ", ".join(f"{t} {fs[t] / 1e6:.1f} MB -> {qs[t] / 1e6:.1f} MB" for t in fs))
        run(args, fp32, int8)


def run(args: argparse.Namespace, fp32: OnnxEncoder, int8: OnnxEncoder) -> None:
    for enc in (fp32, int8):
        enc.limit_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.photos or Path(tmp)
        if args.photos is None:
            make_sample(folder, args.limit, seed=7)
        t = time.perf_counter()
        pixels = decode_photos(folder, fp32.preprocess_spec, args.limit)
        print(f"decoded {len(pixels)} photos from {folder} in {time.perf_counter() - t:.1f} s (not timed below)")
    texts = (QUERIES * 2)[: args.batch]
    got = speed({"fp32": fp32, "int8": int8}, pixels[: args.batch], texts, args.rounds)
    (fi, ft), (qi, qt) = got["fp32"], got["int8"]
    print(f"model only, batch {args.batch}, {args.threads} threads, best of {args.rounds} alternating rounds: "
          f"images/s fp32 {fi:.1f} int8 {qi:.1f} ({qi / fi:.2f}x); texts/s fp32 {ft:.0f} int8 {qt:.0f} "
          f"({qt / ft:.2f}x)")
    agreement(fp32, int8, pixels, args.batch)
    if args.sample:
        labelled(fp32, int8, args.sample)


if __name__ == "__main__":
    main()
