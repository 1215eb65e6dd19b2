"""The demo question answerer, trained and measured (issue 18): answer accuracy on generated questions.

Trains the answerer (indexer/model/vqa.py) on photos rendered like the sample library (make-sample seed 3, plus
two-shape photos for "how many" questions) embedded with the demo CLIP model, optionally writes it (`--out
indexer/model/demo_answerer` rebuilds the bundled one), then asks about held-out photos (seed 7) through the public
`ask`: colour, shape, background, size, yes/no and count from the embedding, left/right from the explain heatmap
(asked only where the object's centre is at least 10 % of the width off the middle). The bar: 85 % overall.
Side by side: always giving each kind's most frequent training answer.

    python bench/questions.py [--train 4000] [--test 500] [--epochs 20] [--out DIR] [--load DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from clipsearch.indexer.model.factory import create_encoder
from clipsearch.indexer.model.sample import sample_items
from clipsearch.indexer.model.vqa import Answerer, train_answerer
from clipsearch.search.questions import ask, demo_questions, question_scores

_spec = importlib.util.spec_from_file_location("bench_explain", Path(__file__).with_name("explain.py"))
assert _spec is not None and _spec.loader is not None
boxes = importlib.util.module_from_spec(_spec)
sys.modules["bench_explain"] = boxes  # dataclasses look their module up there
_spec.loader.exec_module(boxes)  # the boxed sample photos of bench/explain.py


def photos(n: int, pairs: int, seed: int) -> tuple[list, list]:
    """(images, questions per image): n one-shape photos (object side known) and `pairs` two-shape photos."""
    rng = np.random.default_rng(seed)
    images, asked = [], []
    for item, case in zip(sample_items(n, seed), boxes.single_cases(n, seed), strict=True):
        centre = (case.box[0] + case.box[2]) / 2 / case.image.width - 0.5
        side = None if abs(centre) < 0.1 else ("left" if centre < 0 else "right")
        images.append(case.image)
        asked.append(demo_questions(item, rng, side))
    for case in boxes.pair_cases(pairs, seed + 1)[::2]:
        images.append(case.image)
        asked.append(demo_questions(None, rng, count=2))
    return images, asked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--load", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    encoder = create_encoder("demo", "cpu", backend="torch")
    t = time.perf_counter()
    train_images, train_asked = photos(args.train, args.train // 5, seed=3)
    train_vecs = np.concatenate([encoder.encode_images(train_images[i : i + 256])
                                 for i in range(0, len(train_images), 256)])
    print(f"{len(train_images)} training photos rendered and embedded in {time.perf_counter() - t:.0f} s", flush=True)
    rows = [(i, q, a, k) for i, qs in enumerate(train_asked) for q, a, k in qs if k != "position"]
    if args.load:
        answerer = Answerer.load(args.load)
    else:
        t = time.perf_counter()
        answerer = train_answerer(train_vecs[[r[0] for r in rows]], [r[1] for r in rows], [r[2] for r in rows],
                                  encoder.space.key, encoder.space.label, epochs=args.epochs)
        print(f"trained on {len(rows)} questions in {time.perf_counter() - t:.0f} s", flush=True)
    if args.out:
        answerer = Answerer.load(answerer.save(args.out))  # measure what was written (fp16 weights)
        print(f"written to {args.out}")
    prior = {k: Counter(r[2] for r in rows if r[3] == k).most_common(1)[0][0] for k in {r[3] for r in rows}}
    test_images, test_asked = photos(args.test, args.test // 5, seed=7)
    t = time.perf_counter()
    got, truth, kinds, base = [], [], [], []
    for image, qs in zip(test_images, test_asked, strict=True):
        vec = encoder.encode_images([image])[0]
        for q, a, k in qs:
            got.append(ask(encoder, answerer, vec, q, image).text)
            truth.append(a)
            kinds.append(k)
            base.append(prior.get(k, "left"))
    seconds = time.perf_counter() - t
    for name, answers in (("answerer", got), ("most frequent", base)):
        s = question_scores(answers, truth, kinds)
        print(f"{name:14s} n={len(truth)}  " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()), flush=True)
    no_pos = [i for i, k in enumerate(kinds) if k != "position"]
    s = question_scores([got[i] for i in no_pos], [truth[i] for i in no_pos], [kinds[i] for i in no_pos])
    print(f"answerer without position questions: overall {s['overall']:.3f} (n={len(no_pos)}); "
          f"{seconds / len(truth) * 1000:.1f} ms/question incl. the photo's embedding")


if __name__ == "__main__":
    main()
