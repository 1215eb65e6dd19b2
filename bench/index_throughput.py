"""End-to-end indexing throughput vs model-only throughput, same model, batch and device, in one run.

End to end = scan + read + hash + decode (JPEG draft) + EXIF + preprocess in worker processes + embed + catalog
writes + index build, on a generated folder of camera-sized (4000x3000) JPEGs. Model-only = encode_pixels on
pre-made uint8 tensors. The ratio says whether decoding starves the model. Decode-only = the same decode workers on
the same files with the model idle; from it and model-only follows the best ratio possible when decoding and the
model share the same cores (time per image = 1/model + 1/decode), printed as the ceiling.

    python bench/index_throughput.py [--model ViT-B-32:none] [--count 96] [--batch-size 32] [--workers N] [--rounds 3]

The machine's speed drifts by 10% and more between runs of a few seconds (shared VM), so the three rates are
measured in alternating rounds and the medians are compared; each round's own ratio is printed too, and so is the
model's share of the end-to-end time (embedding seconds / total seconds of the same run), which is the ratio with
the model's speed taken from the very seconds it ran in, so drift cancels out.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.ingest.decode import PreprocessSpec
from clipsearch.indexer.ingest.workers import decode_task, init_worker

# torch (via indexer.encoder / indexer.pipeline) is imported inside main() only: decode workers are spawned, and a
# spawned child re-imports the main script's top-level imports, which would cost every worker seconds of start-up
# (the `clipsearch` CLI keeps its heavy imports lazy for the same reason).


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    for i in range(count):
        small = rng.integers(0, 255, (h // 50, w // 50, 3), dtype=np.uint8)
        detail = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), np.float32)
        arr = np.clip(0.5 * base + 0.5 * detail + rng.normal(0, 6, (h, w, 1)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"IMG_{i:04d}.jpg", quality=90)


def decode_rate(files: list[Path], spec: PreprocessSpec, workers: int) -> float:
    """Images/s of the decode workers alone (read, hash, decode, EXIF, preprocess), pool start-up excluded."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, init_worker, (spec, 100_000_000, frozenset())) as pool:
        list(pool.map(decode_task, [str(f).encode() for f in files[:workers]]))  # start the workers
        t = time.perf_counter()
        results = list(pool.map(decode_task, [str(f).encode() for f in files]))
        rate = len(files) / (time.perf_counter() - t)
    assert all(r.pixels is not None for r in results)
    return rate


def model_rate(enc: Any, pix: np.ndarray, batch_size: int) -> float:
    """Images/s of the encoder alone on pre-made uint8 tensors."""
    t = time.perf_counter()
    for i in range(0, len(pix), batch_size):
        enc.encode_pixels(pix[i : i + batch_size])
    return len(pix) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32:none")
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: the pipeline's choice)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--index-threads", type=int, default=None,
                    help="torch threads while indexing (default: the pipeline's choice)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; medians are reported")
    ap.add_argument("--photos", type=Path, help="keep the generated JPEGs in this folder and reuse them")
    args = ap.parse_args()
    from clipsearch.indexer.app import open_parts
    from clipsearch.indexer.config import AppConfig, IndexOptions
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.indexer.pipeline import Indexer

    enc = create_encoder(args.model, args.device)
    print(f"model {args.model} on {enc.device}, batch {args.batch_size}, decode workers {args.workers or 'auto'}")
    with tempfile.TemporaryDirectory() as tmp:
        lib = args.photos or Path(tmp) / "photos"
        lib.mkdir(parents=True, exist_ok=True)
        if len(list(lib.glob("IMG_*.jpg"))) != args.count:
            t = time.perf_counter()
            make_jpegs(lib, args.count, (4000, 3000))
            print(f"generated {args.count} 4000x3000 JPEGs in {time.perf_counter() - t:.1f}s")
        s = enc.preprocess_spec.size
        pix = np.random.default_rng(1).integers(0, 255, (args.count, s, s, 3), dtype=np.uint8)
        enc.encode_pixels(pix[: args.batch_size])  # warm-up
        files = sorted(lib.iterdir())
        model_only, e2e, decode_only, share = [], [], [], []
        for r in range(args.rounds):  # alternate, so that drift in the machine's speed hits all three alike
            model_only.append(model_rate(enc, pix, args.batch_size))
            decode_only.append(decode_rate(files, enc.preprocess_spec, args.workers or usable_cores()))
            cfg = AppConfig(home=Path(tmp) / f"home{r}", model=args.model)
            parts = open_parts(cfg)
            ix = Indexer(parts.catalog, parts.store, enc, cfg.home,
                         IndexOptions(batch_size=args.batch_size, workers=args.workers,
                                      torch_threads=args.index_threads))
            rep = ix.run([lib])
            e2e.append(rep.indexed / rep.seconds)
            share.append(rep.stage_seconds["embed"] / rep.seconds)
            stages = {k: round(v, 2) for k, v in rep.stage_seconds.items()}
            print(f"round {r + 1}: model-only {model_only[-1]:6.2f}  end-to-end {e2e[-1]:6.2f}  decode-only "
                  f"{decode_only[-1]:6.2f} images/s  ratio {e2e[-1] / model_only[-1]:.3f}  "
                  f"model share {share[-1]:.3f}  (stages: {stages})")
        m, e, d = (float(np.median(x)) for x in (model_only, e2e, decode_only))
        print(f"model-only : {m:8.2f} images/s (median of {args.rounds})")
        print(f"end-to-end : {e:8.2f} images/s")
        print(f"decode-only: {d:8.2f} images/s")
        ceiling = (1 / m) / (1 / m + 1 / d)
        print(f"ratio end-to-end / model-only: {e / m:.3f}  (shared-core ceiling {ceiling:.3f})")
        print(f"model share of end-to-end time: {float(np.median(share)):.3f}  (the ratio with the model's speed taken "
              "from the same seconds: steadier on a noisy machine)")


if __name__ == "__main__":
    main()
