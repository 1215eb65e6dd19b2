"""`clipsearch train`: contrastive fine-tuning / training of any open_clip architecture on image–caption pairs.

Uses open_clip's ClipLoss (symmetric InfoNCE with the model's learned temperature). Images are decoded once by
the indexer's safe decoder (so training sees exactly what indexing sees) and kept as uint8 in memory. Output is a
model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) usable anywhere as a model spec.
Resuming reads ``train_state.pt`` with ``torch.load(weights_only=True)``: no pickles are executed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import decode_file
from clipsearch.indexer.model.datasets import load_caption_pairs
from clipsearch.indexer.model.torch_encoder import build_model, pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved beside the checkpoint)."""

    data: Path  # folder the caption file's image paths are relative to
    out: Path  # output model folder
    captions: str = "captions.txt"  # Flickr8k-style image,caption lines; or .csv / .jsonl with path and caption
    model: str = "ViT-B-32:none"  # starting point: any model spec (checkpoint, tag, folder or ARCH:none)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    freeze_image: bool = False  # lock the image tower (fine-tune the text side only)
    val_fraction: float = 0.1  # images held out for validation (seeded split)
    seed: int = 0
    device: str | None = None
    resume: bool = False  # continue from out/train_state.pt
    save_half: bool = False  # store weights as float16 (halves the file; used for the bundled demo model)
    workers: int = 2  # decode processes for the one-time image load
    hard_batches: float = 0.5  # share of batches whose captions differ in one word only (hard negatives)
    hard_word: int | None = None  # word position (in the first caption) hard batches differ in; None: random/epoch
    resize_mode: str | None = None  # override the model's resize mode (shortest | longest | squash); saved with it
    augment: str = "none"  # none | flip (random mirror) | dihedral (mirror + quarter turns): captions must not
    # mention left/right (flip) or orientation (dihedral); needs a square input for the quarter turns


@dataclass
class TrainReport:
    """Per-epoch figures of a run."""

    epochs: list[dict] = field(default_factory=list)
    images_per_second: float = 0.0
    out: str = ""


def _load_images(paths: list[Path], spec, workers: int) -> np.ndarray:
    from concurrent.futures import ProcessPoolExecutor

    from clipsearch.indexer.ingest.workers import decode_task, init_worker

    raw = [str(p).encode() for p in paths]
    if workers > 0:
        with ProcessPoolExecutor(workers, initializer=init_worker, initargs=(spec, 100_000_000, frozenset())) as ex:
            results = list(ex.map(decode_task, raw, chunksize=32))
    else:
        results = [decode_file(p, spec) for p in raw]
    bad = [(p, r.reason) for p, r in zip(paths, results, strict=True) if r.pixels is None]
    if bad:
        raise UsageError(f"{len(bad)} training images cannot be decoded, e.g. {bad[0][0]}: {bad[0][1]}")
    return np.stack([r.pixels for r in results])


def _model_cfg(spec: str, parsed) -> dict:
    if parsed.folder is not None:
        return json.loads((parsed.folder / "open_clip_config.json").read_text())["model_cfg"]
    return open_clip.get_model_config(parsed.arch)


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def save_model(model: torch.nn.Module, model_cfg: dict, pp_cfg: dict, out: Path, half: bool) -> None:
    """Write a model folder loadable as a spec (open_clip's local-dir layout)."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu() for k, v in
          model.state_dict().items()}
    save_file(sd, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp_cfg},
                                                          indent=2))


def train(cfg: TrainConfig) -> TrainReport:
    """Run contrastive training; returns per-epoch losses and validation figures."""
    torch.manual_seed(cfg.seed)
    rnd = random.Random(cfg.seed)
    device = pick_device(cfg.device)
    pairs = load_caption_pairs(cfg.data, cfg.captions)
    images = sorted(pairs)
    rnd.shuffle(images)
    n_val = int(len(images) * cfg.val_fraction)
    val_imgs, train_imgs = images[:n_val], images[n_val:]
    if len(train_imgs) < 2:
        raise UsageError("need at least two training images")
    model, tokenizer, pp, parsed = build_model(cfg.model, device)
    model_cfg = _model_cfg(cfg.model, parsed)
    if cfg.resize_mode:
        pp = {**pp, "resize_mode": cfg.resize_mode}
    from clipsearch.indexer.model.torch_encoder import TorchEncoder

    spec = TorchEncoder.preprocess_spec_from(pp)
    t0 = time.perf_counter()
    pixels = _load_images(images, spec, cfg.workers)
    log.info("decoded %d images in %.1fs", len(images), time.perf_counter() - t0)
    index_of = {p: i for i, p in enumerate(images)}
    mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)

    def batch_tensors(batch: list[Path], hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # Contrastive loss treats every other caption in the batch as a negative, so an identical caption on two
        # images would be a false negative: pick captions so that none repeats (first caption as the fallback).
        # Hard batches keep the first captions: those are the ones that differ in exactly one word.
        chosen, used = [], set()
        for p in batch:
            options = [pairs[p][0]] if hard else [rnd.choice(pairs[p]), pairs[p][0]]
            cap = next((c for c in options if c not in used), None)
            if cap is not None:
                used.add(cap)
                chosen.append((p, cap))
        x = torch.from_numpy(pixels[[index_of[p] for p, _ in chosen]]).to(device)
        x = _augment(x, cfg.augment, rnd)
        x = x.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        return x, tokenizer([c for _, c in chosen]).to(device)

    steps_per_epoch = max(1, len(train_imgs) // cfg.batch_size)
    opt, sched = _optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    loss_fn = open_clip.ClipLoss()
    report = TrainReport(out=str(cfg.out))
    state_path = cfg.out / "train_state.pt"
    start_epoch = _resume(cfg, state_path, model, opt, sched, report, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    seen, t_train = 0, time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = _epoch_batches(train_imgs, pairs, cfg.batch_size, cfg.hard_batches, rnd, cfg.hard_word)
        batches = batches[:steps_per_epoch]
        losses, n = _run_epoch(model, batches, batch_tensors, amp, loss_fn, opt, sched)
        seen += n
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
               "images_per_second": seen / (time.perf_counter() - t_train)}
        row.update(_validate(model, val_imgs, batch_tensors, loss_fn, cfg.batch_size))
        report.epochs.append(row)
        log.warning("epoch %d/%d: loss %.4f val_loss %s (%.0f img/s)", epoch + 1, cfg.epochs, row["train_loss"],
                    f"{row.get('val_loss', float('nan')):.4f}", row["images_per_second"])
        _checkpoint(cfg, model, model_cfg, pp, opt, sched, epoch + 1, report)
    report.images_per_second = seen / max(1e-9, time.perf_counter() - t_train)
    return report


def _run_epoch(model: torch.nn.Module, batches: list[tuple[list[Path], bool]], batch_tensors: Any, amp: Any,
               loss_fn: Any, opt: Any, sched: Any) -> tuple[list[float], int]:
    """One pass over the epoch's batches; returns the batch losses and the number of images seen."""
    losses, seen = [], 0
    for batch, hard in batches:
        x, tokens = batch_tensors(batch, hard)
        with amp:
            img_f, txt_f, scale = model(x, tokens)[:3]
            loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        seen += len(x)
    return losses, seen


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW with weight decay on matrices only, and the warmup + cosine schedule."""
    if cfg.freeze_image:
        model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps))


def _resume(cfg: TrainConfig, state_path: Path, model: torch.nn.Module, opt: Any, sched: Any, report: TrainReport,
            device: str) -> int:
    """The epoch to start from: 0, or the last checkpoint's with model, optimiser and schedule restored."""
    if not (cfg.resume and state_path.is_file()):
        return 0
    state = torch.load(state_path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    report.epochs = json.loads((cfg.out / "train_log.json").read_text()).get("epochs", [])
    log.warning("resuming after epoch %d", int(state["epoch"]))
    return int(state["epoch"])


def _checkpoint(cfg: TrainConfig, model: torch.nn.Module, model_cfg: Any, pp: dict[str, Any], opt: Any, sched: Any,
                epochs_done: int, report: TrainReport) -> None:
    """After each epoch: the usable model folder, the resumable state and the log."""
    save_model(model, model_cfg, pp, cfg.out, cfg.save_half)
    if (cfg.data / "templates.txt").is_file():  # prompt templates that fit this data travel with the model
        shutil.copyfile(cfg.data / "templates.txt", cfg.out / "templates.txt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "epoch": epochs_done}, cfg.out / "train_state.pt")
    (cfg.out / "train_log.json").write_text(json.dumps(
        {"config": {k: str(v) for k, v in asdict(cfg).items()}, "epochs": report.epochs}, indent=2))


def _augment(x: torch.Tensor, mode: str, rnd: random.Random) -> torch.Tensor:
    """Random mirror images (and quarter turns for "dihedral") of an (N, H, W, C) uint8 batch, per image."""
    if mode == "none":
        return x
    if mode not in ("flip", "dihedral"):
        raise UsageError(f"unknown augmentation '{mode}' (none, flip or dihedral)")
    out = torch.empty_like(x)
    for i in range(len(x)):
        img = x[i].flip(1) if rnd.random() < 0.5 else x[i]
        out[i] = torch.rot90(img, rnd.randrange(4), dims=(0, 1)) if mode == "dihedral" else img
    return out


def _epoch_batches(images: list[Path], pairs: dict[Path, list[str]], bs: int, hard: float,
                   rnd: random.Random, hard_word: int | None = None) -> list[tuple[list[Path], bool]]:
    """One epoch of (batch, is_hard) pairs: a share of them are hard-negative batches.

    In a random batch, the easy attributes of a caption (colour, background) already tell the positive from nearly
    every negative, so the hard ones (shape) get no gradient. A hard batch is made of *sets*: images whose first
    captions are equal but for one word (a position chosen per epoch, or `hard_word`), one image per distinct word,
    so every image in a set is a negative that differs from the positive in that word only, and no caption repeats.
    """
    order = images[:]
    rnd.shuffle(order)
    n_hard = int(len(order) * hard)
    hard_part, easy_part = order[:n_hard], order[n_hard:]
    words = max(1, min(len(pairs[p][0].split()) for p in hard_part)) if hard_part else 1
    drop = rnd.randrange(words) if hard_word is None else min(hard_word, words - 1)
    batches = [(b, True) for b in _hard_batches(hard_part, pairs, bs, drop, rnd)]
    batches += [(easy_part[i : i + bs], False) for i in range(0, len(easy_part), bs)]
    rnd.shuffle(batches)
    return [b for b in batches if len(b[0]) >= 2]


def _hard_batches(images: list[Path], pairs: dict[Path, list[str]], bs: int, drop: int,
                  rnd: random.Random) -> list[list[Path]]:
    """Batches of sets: a set is one image per distinct word at position `drop` among images whose first captions
    agree on every other word; two sets of the same group never share a batch (their captions would repeat)."""
    groups: dict[str, dict[str, list[Path]]] = {}
    for p in images:
        w = pairs[p][0].split()
        groups.setdefault(" ".join(w[:drop] + w[drop + 1 :]), {}).setdefault(w[drop], []).append(p)
    rounds: list[list[tuple[str, list[Path]]]] = []  # round k holds the k-th set of every group
    for key, by_word in groups.items():
        k = 0
        while by_word:
            if k == len(rounds):
                rounds.append([])
            rounds[k].append((key, [members.pop() for members in by_word.values()]))
            by_word = {w: v for w, v in by_word.items() if v}
            k += 1
    batches: list[list[Path]] = []
    current: list[Path] = []
    keys: set[str] = set()
    for one_round in rounds:
        rnd.shuffle(one_round)
        for key, one_set in one_round:
            if current and (len(current) + len(one_set) > bs or key in keys):
                batches.append(current)
                current, keys = [], set()
            current.extend(one_set)
            keys.add(key)
    if current:
        batches.append(current)
    return batches


def _validate(model, val_imgs, batch_tensors, loss_fn, bs: int) -> dict:
    if len(val_imgs) < 2:
        return {}
    model.eval()
    losses = []
    with torch.inference_mode():
        for b in range(0, len(val_imgs) - 1, bs):
            chunk = val_imgs[b : b + bs]
            if len(chunk) < 2:
                break
            x, tokens = batch_tensors(chunk)
            img_f, txt_f, scale = model(x, tokens)[:3]
            losses.append(float(loss_fn(img_f, txt_f, scale)))
    return {"val_loss": float(np.mean(losses))} if losses else {}
