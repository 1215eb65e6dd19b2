"""Model commands: make-sample, train, eval, demo, and ui."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def add_model_commands(sub: Any) -> None:
    """Register the model-related sub-commands."""
    p = sub.add_parser("make-sample", help="generate a captioned, photo-like sample library")
    p.add_argument("dir", type=Path)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="contrastive training on image-caption pairs (open_clip ClipLoss)")
    p.add_argument("data", type=Path, help="folder the caption file's image paths are relative to")
    p.add_argument("--captions", default="captions.txt", help="captions.txt (Flickr8k), .csv or .jsonl")
    p.add_argument("--out", type=Path, required=True, help="output model folder (usable as --model)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="warmup steps before the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--freeze-image", action="store_true", help="train the text tower only")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--save-half", action="store_true", help="store float16 weights")
    p.add_argument("--resize-mode", choices=["shortest", "longest", "squash"],
                   help="how photos are fitted to the model's square input (saved with the model)")
    p.add_argument("--hard-batches", type=float, default=0.5, help="share of hard-negative batches (0..1)")
    p.add_argument("--hard-word", type=int, default=None,
                   help="word position the hard-negative batches differ in (default: a random one per epoch)")
    p.add_argument("--augment", choices=["none", "flip", "dihedral"], default="none",
                   help="random mirror images (flip), also quarter turns (dihedral); captions must not say which way")

    p = sub.add_parser("eval", help="retrieval recall and zero-shot accuracy of a model on a folder")
    p.add_argument("dir", type=Path)
    p.add_argument("--captions", help="caption file (default: detected)")
    p.add_argument("--templates", help="zero-shot prompt templates file")

    p = sub.add_parser("demo", help="generate a sample library, index it with the bundled model, open the UI")
    p.add_argument("--count", type=int, default=240)
    p.add_argument("--no-ui", action="store_true", help="stop after indexing")
    _ui_address(p)  # demo ends in cmd_ui, so it takes the same address options

    _ui_address(sub.add_parser("ui", help="start the Streamlit interface"))


def _ui_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")


def cmd_make_sample(args: argparse.Namespace) -> int:
    """Write a sample library."""
    from clipsearch.indexer.model.sample import make_sample

    from .commands import _out

    rows = make_sample(args.dir, args.count, args.seed)
    _out(args, {"dir": str(args.dir), "images": len(rows)}, f"wrote {len(rows)} images and captions.txt to {args.dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train and print per-epoch figures."""
    from clipsearch.indexer.model.training import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, captions=args.captions, model=args.model or "ViT-B-32:none",
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      weight_decay=args.weight_decay, freeze_image=args.freeze_image, val_fraction=args.val_fraction,
                      seed=args.seed, device=args.device, resume=args.resume, save_half=args.save_half,
                      resize_mode=args.resize_mode, hard_batches=args.hard_batches, hard_word=args.hard_word,
                      augment=args.augment)
    report = train(cfg)
    from .commands import _out

    last = report.epochs[-1] if report.epochs else {}
    _out(args, {"epochs": report.epochs, "out": report.out},
         f"saved {report.out} (use --model {report.out}); last epoch: {last}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on a folder."""
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.search.evaluate import evaluate
    from clipsearch.search.zeroshot import load_templates

    from .commands import _out

    encoder = create_encoder(args.model or "demo", args.device)
    templates = load_templates(args.templates, []) if args.templates else None
    res = evaluate(args.dir, encoder, args.captions, templates)
    lines = []
    for key in ("text_to_image", "image_to_text"):
        if key in res:
            lines.append(f"{key:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in res[key].items()))
    if "zero_shot" in res:
        z = res["zero_shot"]
        lines.append(f"zero_shot      top1 {z['top1']:.3f}  top5 {z['top5']:.3f}  ({z['classes']} classes)")
    if "retrieval_info" in res and res["retrieval_info"]["shared_captions"]:
        lines.append(f"note: {res['retrieval_info']['shared_captions']} captions are shared by several images; "
                     "a hit on any of them counts as correct")
    _out(args, res, "\n".join(lines))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Run `streamlit run ui/app.py` bound to --host/--port with this home/db."""
    from .commands import config_from

    config = config_from(args)
    env = {**os.environ, **config.as_env()}
    app = Path(__file__).parent / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.maxUploadSize", str(max(1, round(config.max_upload_mb)))]
    print(f"clipsearch UI on http://{args.host}:{args.port}", flush=True)
    return subprocess.call(cmd, env=env)


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command: sample library → index with the demo model → UI."""
    from clipsearch.indexer.app import build_indexer
    from clipsearch.indexer.config import IndexOptions
    from clipsearch.indexer.ingest.scan import SAMPLE_DIR_NAME
    from clipsearch.indexer.model.sample import make_sample

    from .commands import config_from

    args.model = args.model or "demo"
    config = config_from(args)
    lib = config.home / SAMPLE_DIR_NAME  # generated data, kept in the app's home (not in any photo root)
    if not (lib / "captions.txt").is_file():
        make_sample(lib, args.count, seed=7)
    report = build_indexer(config, IndexOptions(progress=True)).run([lib])
    print(f"indexed {report.indexed} sample photos into {config.home} ({report.unchanged} already there)")
    print(f'try: clipsearch search "a red circle on grass" --home {config.home}')
    if args.no_ui:
        return 0
    return cmd_ui(args)


COMMANDS = {"make-sample": cmd_make_sample, "train": cmd_train, "eval": cmd_eval, "ui": cmd_ui, "demo": cmd_demo}
