"""The demo CoCa, trained and measured (issue 18): a pixel-reading captioner that names the object and its colour.

Trains a small open_clip CoCa (indexer/model/coca_training.py, CoCaLoss; text side from scratch, image tower from
the demo CLIP model's first stages) on a make-sample library (seed 3, as the embedding captioner's bench; the demo
CLIP model saw seed 1), optionally writes it (`--out indexer/model/demo_coca` rebuilds the bundled one, `make
demo-coca`), then captions a held-out library (seed 7) from its files through `load_captioner`, as `clipsearch
caption --captioner demo-coca` does: decoded by the indexer's decoder, 16 photos a batch, greedy decoding. Scores:
object and colour both named (the bar is 90 %), each attribute, BLEU-4; and the seconds a photo takes.

    python bench/coca_captioner.py [--train 6000] [--test 600] [--epochs 6] [--out DIR] [--load DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from clipsearch.indexer.ingest.decode import open_image
from clipsearch.indexer.model.sample import make_sample
from clipsearch.search.captions import caption_scores, load_captioner


def measure(folder: Path, test_dir: Path, rows: list, batch: int = 16) -> None:
    """Caption the held-out photos with the CoCa in `folder`, print the scores and a few examples."""
    captioner = load_captioner(str(folder), device="cpu")
    t = time.perf_counter()
    generated: list[str] = []
    for start in range(0, len(rows), batch):
        images = [open_image((test_dir / rel).read_bytes(), 100_000_000)[0] for rel, _ in rows[start: start + batch]]
        generated += captioner.caption_images(images)
    seconds = time.perf_counter() - t
    s = caption_scores(generated, [item for _, item in rows])
    words = "  ".join(f"{k} {v:.3f}" for k, v in s.per_word.items())
    print(f"demo CoCa  n={s.n}  object+colour {s.object_and_colour:.3f}  BLEU-4 {s.bleu4:.3f}  {words}  "
          f"({seconds * 1e3 / s.n:.1f} ms/photo, decoding the file included)", flush=True)
    wrong = [(item.caption, text) for text, (_, item) in zip(generated, rows, strict=True)
             if f" {item.shape} " not in f" {text} " or f" {item.colour} " not in f" {text} "]
    for truth, text in wrong[:8]:
        print(f"  missed: {truth!r:45s} -> {text!r}")


def main() -> None:
    from clipsearch.indexer.model.coca_training import CocaConfig, load_library, train_coca

    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=6000, help="training photos (make-sample seed 3)")
    ap.add_argument("--test", type=int, default=600, help="held-out photos (make-sample seed 7)")
    ap.add_argument("--epochs", type=int, default=CocaConfig.epochs)
    ap.add_argument("--out", type=Path, help="write the trained CoCa folder here")
    ap.add_argument("--load", type=Path, help="measure this CoCa folder instead of training one")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a CocaConfig field (e.g. --set vision_layers=3)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(CocaConfig(epochs=args.epochs), **_overrides(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rows = make_sample(Path(tmp) / "test", args.test, seed=7)
        folder = args.load
        if folder is None:
            make_sample(Path(tmp) / "train", args.train, seed=3)
            pixels, captions = load_library(Path(tmp) / "train", cfg)
            print(f"libraries generated and decoded in {time.perf_counter() - t:.0f} s", flush=True)
            folder = args.out or Path(tmp) / "coca"
            _, report = train_coca(pixels, captions, cfg, folder)
            print(f"trained on {len(captions)} photos, {cfg.epochs} epochs, in {report.seconds:.0f} s "
                  f"({report.images_per_second:.0f} images/s); written to {folder}", flush=True)
        measure(folder, Path(tmp) / "test", rows)  # what was written (float16 weights), loaded as a user would


def _overrides(pairs: list[str]) -> dict:
    """CocaConfig fields from FIELD=VALUE strings, converted to each field's type."""
    from clipsearch.indexer.model.coca_training import CocaConfig

    types = {f.name: type(getattr(CocaConfig(), f.name)) for f in dataclasses.fields(CocaConfig)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        out[name] = types[name](value)
    return out


if __name__ == "__main__":
    main()
