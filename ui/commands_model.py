"""Model commands: make-sample, train, eval. Training and evaluation import torch inside their run functions."""

from __future__ import annotations

import argparse
from pathlib import Path

from .commands_common import config_from, float_range, fraction, int_range, library_model, non_negative, out, positive
from .registry import command

learning_rate = float_range(0.0, lo_open=True)
weight_decay = float_range(0.0)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder to write the images and captions.txt into")
    p.add_argument("--count", type=positive, default=300, metavar="N", help="how many images")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same library)")


@command("make-sample", "generate a captioned, photo-like sample library (offline; for trying and training)",
         arguments=_sample_args,
         examples=("clipsearch make-sample ~/clipsearch-sample", "clipsearch make-sample data/train --count 20000 "
                   "--seed 1"))
def cmd_make_sample(args: argparse.Namespace) -> int:
    """Write a sample library."""
    from clipsearch.indexer.model.sample import make_sample

    rows = make_sample(args.dir, args.count, args.seed)
    out(args, {"dir": str(args.dir), "images": len(rows)}, f"wrote {len(rows)} images and captions.txt to {args.dir}")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="folder the caption file's image paths are relative to")
    p.add_argument("--captions", default="captions.txt", metavar="FILE", help="captions.txt (Flickr8k), .csv or .jsonl")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output model folder (usable as --model)")
    p.add_argument("--epochs", metavar="N", type=positive, default=10, help="passes over the training images")
    p.add_argument("--batch-size", metavar="N", type=positive, default=128, help="image-caption pairs per step")
    p.add_argument("--lr", metavar="X", type=learning_rate, default=1e-3, help="peak learning rate (above 0)")
    p.add_argument("--warmup", metavar="N", type=non_negative, default=50,
                   help="warmup steps before the cosine schedule")
    p.add_argument("--weight-decay", metavar="X", type=weight_decay, default=0.1, help="AdamW weight decay (0 or more)")
    p.add_argument("--freeze-image", action="store_true", help="train the text tower only")
    p.add_argument("--val-fraction", metavar="X", type=fraction, default=0.1,
                   help="share of images held out, in [0, 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, order, augmentation)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--save-half", action="store_true", help="store float16 weights")
    p.add_argument("--resize-mode", choices=["shortest", "longest", "squash"],
                   help="how photos are fitted to the model's square input (default: the model's; saved with it)")
    p.add_argument("--hard-batches", metavar="X", type=fraction, default=0.5,
                   help="share of hard-negative batches, in [0, 1)")
    p.add_argument("--hard-word", type=int_range(0), default=None, metavar="I",
                   help="word position the hard-negative batches differ in (default: a random one per epoch)")
    p.add_argument("--augment", choices=["none", "flip", "dihedral"], default="none",
                   help="random mirror images (flip), also quarter turns (dihedral); captions must not say which way")


@command("train", "contrastive training on image-caption pairs (open_clip ClipLoss)", arguments=_train_args,
         examples=("clipsearch train data/train --out models/mine --model ViT-B-32:laion2b_s34b_b79k --epochs 3",
                   "clipsearch train data/train --captions captions.csv --out models/mine --freeze-image",
                   "clipsearch index ~/Pictures --model models/mine   # use the result"))
def cmd_train(args: argparse.Namespace) -> int:
    """Train and print per-epoch figures."""
    from clipsearch.indexer.model.training import TrainConfig, train

    config = config_from(args)
    cfg = TrainConfig(data=args.data, out=args.out, captions=args.captions, model=library_model(config),
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      weight_decay=args.weight_decay, freeze_image=args.freeze_image, val_fraction=args.val_fraction,
                      seed=args.seed, device=config.device, resume=args.resume, save_half=args.save_half,
                      resize_mode=args.resize_mode, hard_batches=args.hard_batches, hard_word=args.hard_word,
                      augment=args.augment)
    report = train(cfg)
    last = report.epochs[-1] if report.epochs else {}
    out(args, {"epochs": report.epochs, "out": report.out},
        f"saved {report.out} (use --model {report.out}); last epoch: {last}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder of images with a caption file")
    p.add_argument("--captions", help="caption file (default: detected in DIR)")
    p.add_argument("--templates", help="zero-shot prompt templates FILE (default: the model's own, else CLIP's)")


@command("eval", "retrieval recall@1/5/10 and zero-shot accuracy of a model on a captioned folder",
         arguments=_eval_args,
         examples=("clipsearch eval data/heldout --model demo",
                   "clipsearch eval flickr30k --captions dataset_flickr30k.json --model ViT-B-32:laion2b_s34b_b79k "
                   "--json"))
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on a folder."""
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.search.evaluate import evaluate
    from clipsearch.search.zeroshot import read_template_file

    config = config_from(args)
    templates = read_template_file(args.templates) if args.templates else None
    encoder = create_encoder(library_model(config), config.device, config.backend, config.model_cache)
    res = evaluate(args.dir, encoder, args.captions, templates)
    lines = []
    for key in ("text_to_image", "image_to_text"):
        if key in res:
            lines.append(f"{key:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in res[key].items()))
    if "zero_shot" in res:
        z = res["zero_shot"]
        lines.append(f"zero_shot      top1 {z['top1']:.3f}  top5 {z['top5']:.3f}  ({z['classes']} classes)")
    if "relevance" in res:
        r = res["relevance"]
        pr, ab = r["present"], r["absent"]
        lines.append(f"relevance      strong precision {pr['precision']:.3f}  recall {pr['recall']:.3f} "
                     f"({pr['queries']} queries)  absent: {ab['strong']} strong over {ab['queries']} queries "
                     f"(vocabulary {r['vocabulary']})")
    if "retrieval_info" in res and res["retrieval_info"]["shared_captions"]:
        lines.append(f"note: {res['retrieval_info']['shared_captions']} captions are shared by several images; "
                     "a hit on any of them counts as correct")
    out(args, res, "\n".join(lines))
    return 0
