"""The demo captioner, trained and measured (issue 18): does a caption name the photo's object and its colour?

Trains the captioner on a make-sample library (seed 3) embedded with the demo CLIP model, optionally writes it
(`--out indexer/model/demo_captioner` rebuilds the bundled one), then captions a held-out library (seed 7, never
used for training here or for the demo CLIP model, which saw seed 1) from the photos' embeddings, exactly as
`caption --all` would from the catalog. Side by side: a nearest-neighbour baseline that copies the caption of the
most similar training photo. Scores: object and colour both named (the bar is 90 %), each attribute, BLEU-4.

    python bench/captions.py [--train 6000] [--test 600] [--epochs 40] [--out DIR] [--load DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clipsearch.indexer.model.captioner import Captioner, library_embeddings, train_captioner
from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.sample import make_sample
from clipsearch.search.captions import caption_scores


def report(name: str, generated: list[str], truth: list, seconds: float) -> None:
    s = caption_scores(generated, truth)
    words = "  ".join(f"{k} {v:.3f}" for k, v in s.per_word.items())
    print(f"{name:18s} n={s.n}  object+colour {s.object_and_colour:.3f}  BLEU-4 {s.bleu4:.3f}  {words}  "
          f"({seconds * 1e6 / s.n:.0f} us/photo)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=6000, help="training photos (make-sample seed 3)")
    ap.add_argument("--test", type=int, default=600, help="held-out photos (make-sample seed 7)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", type=Path, help="write the trained captioner here")
    ap.add_argument("--load", type=Path, help="measure this captioner folder instead of training one")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    encoder = create_encoder("demo", "cpu", backend="torch")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_sample(Path(tmp) / "train", args.train, seed=3)
        train_vecs, train_caps = library_embeddings(encoder, Path(tmp) / "train")
        rows = make_sample(Path(tmp) / "test", args.test, seed=7)
        test_vecs, test_caps = library_embeddings(encoder, Path(tmp) / "test")
        print(f"libraries generated and embedded in {time.perf_counter() - t:.0f} s", flush=True)
    assert len(test_caps) == len(rows), "every held-out photo must decode"
    truth = [item for _, item in rows]
    if args.load:
        captioner = Captioner.load(args.load)
    else:
        t = time.perf_counter()
        captioner = train_captioner(train_vecs, train_caps, encoder.space.key, encoder.space.label,
                                    epochs=args.epochs)
        print(f"trained on {len(train_caps)} photos in {time.perf_counter() - t:.0f} s", flush=True)
    if args.out:
        captioner.save(args.out)
        captioner = Captioner.load(args.out)  # measure what was written (fp16 weights)
        print(f"written to {args.out}")
    t = time.perf_counter()
    generated = captioner.caption_vectors(test_vecs)
    report("captioner", generated, truth, time.perf_counter() - t)
    t = time.perf_counter()
    nearest = np.argmax(test_vecs @ train_vecs.T, axis=1)
    report("nearest caption", [train_caps[i] for i in nearest], truth, time.perf_counter() - t)
    for text, item in list(zip(generated, truth, strict=True))[:5]:
        print(f"  {item.caption!r:45s} -> {text!r}")


if __name__ == "__main__":
    main()
