"""The demo captioner: a small word-level GRU that writes a caption from a photo's CLIP image embedding.

Why from the embedding (ClipCap's idea, Mokady et al. 2021) rather than from pixels (CoCa, BLIP): every catalogued
photo already has its embedding, so captioning a library decodes no photo and costs microseconds a photo, and a
decoder this small trains in about a minute on a CPU. The price: it reads only the embedding space it was trained
on (recorded as `space_key` and checked by the caller) and can only say what that embedding holds.

Files in a captioner folder: ``captioner.json`` (CaptionerConfig) and ``captioner.safetensors`` (weights).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import decode_file
from clipsearch.indexer.model.head_files import load_head, save_head
from clipsearch.indexer.status import PhotoStatus

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "captioner.json", "captioner.safetensors"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


@dataclass(frozen=True)
class CaptionerConfig:
    """What a trained captioner reads and writes."""

    space_key: str  # the embedding space whose vectors it reads; any other space's vectors are refused
    space_label: str  # that space's readable name (ARCH:weights-id), for messages
    dim: int  # image-embedding dimension
    vocab: tuple[str, ...]  # its words; the first four are SPECIALS
    hidden: int = 256  # GRU width
    max_len: int = 16  # longest caption it writes, in words


def words(text: str) -> list[str]:
    """Lower-case words of a caption, punctuation dropped."""
    return re.findall(r"[a-z0-9']+", text.lower())


class CaptionDecoder(nn.Module):
    """GRU language model conditioned on an image embedding (initial state, and an input at every step)."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.init = nn.Linear(cfg.dim, cfg.hidden)
        self.image_in = nn.Linear(cfg.dim, cfg.hidden)
        self.embed = nn.Embedding(len(cfg.vocab), cfg.hidden, padding_idx=PAD)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.hidden, len(cfg.vocab))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-word logits (B, T, V) for token rows (B, T) that start with BOS (teacher forcing)."""
        h0 = torch.tanh(self.init(images))[None]
        x = self.embed(tokens) + self.image_in(images)[:, None]
        y, _ = self.gru(x, h0)
        return self.out(y)

    @torch.inference_mode()
    def generate(self, images: torch.Tensor) -> torch.Tensor:
        """Greedy decoding: (B, max_len) word ids, EOS-terminated rows padded with PAD."""
        n = images.shape[0]
        h = torch.tanh(self.init(images))[None]
        cond = self.image_in(images)
        word = torch.full((n,), BOS, dtype=torch.long, device=images.device)
        out = torch.full((n, self.cfg.max_len), PAD, dtype=torch.long, device=images.device)
        done = torch.zeros(n, dtype=torch.bool, device=images.device)
        for step in range(self.cfg.max_len):
            y, h = self.gru((self.embed(word) + cond)[:, None], h)
            word = self.out(y[:, 0]).argmax(dim=-1)
            out[:, step] = torch.where(done, PAD, word)
            done |= word == EOS
            if bool(done.all()):
                break
        return out


class Captioner:
    """A loaded captioner: captions for L2-normalised image embeddings of its space."""

    def __init__(self, decoder: CaptionDecoder) -> None:
        self.decoder = decoder.eval()
        self.config = decoder.cfg

    @classmethod
    def load(cls, folder: str | Path) -> Captioner:
        """Load from a folder written by `save`; a missing or broken file is a one-line ModelUnavailable."""
        decoder = load_head(folder, CONFIG_FILE, WEIGHTS_FILE, "captioner",
                            lambda raw: CaptionDecoder(CaptionerConfig(**{**raw, "vocab": tuple(raw["vocab"])})))
        return cls(decoder)

    def save(self, folder: str | Path, half: bool = True) -> Path:
        """Write config and weights (fp16 by default: the demo captioner ships in the package)."""
        cfg = asdict(self.config)
        return save_head(folder, CONFIG_FILE, WEIGHTS_FILE, {**cfg, "vocab": list(cfg["vocab"])}, self.decoder, half)

    def caption_vectors(self, vectors: np.ndarray, batch: int = 4096) -> list[str]:
        """One caption per row of (N, D) embeddings of the captioner's space."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.config.dim:
            raise UsageError(f"the captioner reads {self.config.dim}-d embeddings, got shape {vectors.shape}")
        out: list[str] = []
        for i in range(0, len(vectors), batch):
            ids = self.decoder.generate(torch.from_numpy(vectors[i : i + batch].copy())).numpy()
            out.extend(self._text(row) for row in ids)
        return out

    def _text(self, row: np.ndarray) -> str:
        vocab, kept = self.config.vocab, []
        for i in row.tolist():
            if i == EOS or i == PAD:
                break
            if i >= len(SPECIALS):
                kept.append(vocab[i])
        return " ".join(kept)


def library_embeddings(encoder: Any, library: Path, captions_file: str = "captions.txt",
                       batch: int = 256) -> tuple[np.ndarray, list[str]]:
    """Embeddings of a captioned library's photos (Flickr8k layout: ``image,caption`` lines) and their captions;
    a photo that does not decode is skipped with a log line."""
    rows = []
    with open(library / captions_file, encoding="utf-8") as f:
        next(f, None)
        for line in f:
            rel, sep, caption = line.rstrip("\n").partition(",")
            if sep and caption.strip():
                rows.append((rel, caption.strip()))
    vecs, texts = [], []
    for i in range(0, len(rows), batch):
        pixels, kept = [], []
        for rel, caption in rows[i : i + batch]:
            result = decode_file(library / rel, encoder.preprocess_spec)
            if result.status != PhotoStatus.INDEXED or result.pixels is None:
                log.warning("skipping %s: %s", rel, result.reason)
                continue
            pixels.append(result.pixels)
            kept.append(caption)
        if pixels:
            vecs.append(encoder.encode_pixels(np.stack(pixels)))
            texts.extend(kept)
    if not texts:
        raise UsageError(f"no photo of {library / captions_file} could be read")
    return np.concatenate(vecs), texts


def train_captioner(vectors: np.ndarray, captions: list[str], space_key: str, space_label: str,
                    epochs: int = 40, batch_size: int = 128, lr: float = 3e-3, hidden: int = 256,
                    seed: int = 0) -> Captioner:
    """Teacher-forced training on (embedding, caption) pairs; seeded, so a re-run gives the same captioner."""
    torch.manual_seed(seed)
    vocab = list(SPECIALS) + sorted({w for c in captions for w in words(c)})
    index = {w: i for i, w in enumerate(vocab)}
    rows = [[BOS] + [index[w] for w in words(c)] + [EOS] for c in captions]
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    cfg = CaptionerConfig(space_key, space_label, int(vectors.shape[1]), tuple(vocab), hidden, max(16, longest))
    decoder = CaptionDecoder(cfg)
    images = torch.from_numpy(np.asarray(vectors, np.float32).copy())
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(rows) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    decoder.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(rows), generator=gen), 0.0
        for i in range(0, len(rows), batch_size):
            idx = order[i : i + batch_size]
            logits = decoder(images[idx], tokens[idx, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), tokens[idx, 1:].reshape(-1),
                                               ignore_index=PAD)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.info("captioner epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(rows))
    return Captioner(decoder)
