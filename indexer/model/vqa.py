"""The demo question answerer: a small model that answers a question about a photo from its CLIP image embedding.

Like the demo captioner (captioner.py) it reads the photo's stored embedding, so asking about a catalogued photo
decodes nothing; the question is read by its own word-level GRU (the demo CLIP text tower was trained on captions,
not questions). Answers are classes (a colour, a shape, "yes", "two", ...): the demo library's questions have
one-word answers. It reads only the embedding space it was trained on (`space_key`, checked by the caller).

Files in an answerer folder: ``answerer.json`` (AnswererConfig) and ``answerer.safetensors`` (weights).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipsearch.indexer.model.captioner import PAD, SPECIALS, UNK, words
from clipsearch.indexer.model.head_files import load_head, save_head

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "answerer.json", "answerer.safetensors"
MAX_WORDS = 24  # question words read; longer questions are cut


@dataclass(frozen=True)
class AnswererConfig:
    """What a trained answerer reads and answers."""

    space_key: str  # the embedding space whose vectors it reads
    space_label: str  # that space's readable name, for messages
    dim: int  # image-embedding dimension
    vocab: tuple[str, ...]  # question words; the first four are SPECIALS
    answers: tuple[str, ...]  # the answers it can give
    hidden: int = 192  # width of the question GRU and the fusion layer


class AnswerNet(nn.Module):
    """Question GRU + image projection, fused (concatenation and product) into answer logits."""

    def __init__(self, cfg: AnswererConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(len(cfg.vocab), cfg.hidden, padding_idx=PAD)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, batch_first=True)
        self.image = nn.Linear(cfg.dim, cfg.hidden)
        self.head = nn.Sequential(nn.Linear(3 * cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden,
                                                                                               len(cfg.answers)))

    def forward(self, images: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, A) for image embeddings (B, D) and question word ids (B, T), PAD-padded."""
        lengths = (questions != PAD).sum(dim=1).clamp_min(1)
        states, _ = self.gru(self.embed(questions))
        q = states[torch.arange(len(questions)), lengths - 1]  # the state after each question's last word
        v = torch.tanh(self.image(images))
        return self.head(torch.cat([q, v, q * v], dim=1))


class Answerer:
    """A loaded answerer: answers (with their probability) for embeddings of its space and free-text questions."""

    def __init__(self, net: AnswerNet) -> None:
        self.net = net.eval()
        self.config = net.cfg
        self._index = {w: i for i, w in enumerate(self.config.vocab)}

    def encode_questions(self, questions: list[str]) -> torch.Tensor:
        """Word ids (N, T); words it never saw become UNK."""
        rows = [[self._index.get(w, UNK) for w in words(q)][:MAX_WORDS] or [UNK] for q in questions]
        out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def answer(self, vectors: np.ndarray, questions: list[str]) -> list[tuple[str, float]]:
        """One (answer, probability) per (embedding row, question) pair."""
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(np.asarray(vectors, np.float32).copy()),
                              self.encode_questions(questions))
            probs = logits.softmax(dim=1)
            best = probs.argmax(dim=1)
        return [(self.config.answers[int(i)], float(probs[n, i])) for n, i in enumerate(best)]

    @classmethod
    def load(cls, folder: str | Path) -> Answerer:
        """Load from a folder written by `save`; a missing or broken file is a one-line ModelUnavailable."""
        net = load_head(folder, CONFIG_FILE, WEIGHTS_FILE, "answerer", lambda raw: AnswerNet(AnswererConfig(
            **{**raw, "vocab": tuple(raw["vocab"]), "answers": tuple(raw["answers"])})))
        return cls(net)

    def save(self, folder: str | Path, half: bool = True) -> Path:
        """Write config and weights (fp16 by default: the demo answerer ships in the package)."""
        cfg = asdict(self.config)
        cfg.update(vocab=list(cfg["vocab"]), answers=list(cfg["answers"]))
        return save_head(folder, CONFIG_FILE, WEIGHTS_FILE, cfg, self.net, half)


def train_answerer(vectors: np.ndarray, questions: list[str], answers: list[str], space_key: str,
                   space_label: str, epochs: int = 20, batch_size: int = 256, lr: float = 3e-3, hidden: int = 192,
                   seed: int = 0) -> Answerer:
    """Train on (embedding row, question, answer) triples; seeded, so a re-run gives the same answerer."""
    torch.manual_seed(seed)
    vocab = list(SPECIALS) + sorted({w for q in questions for w in words(q)})
    labels = sorted(set(answers))
    cfg = AnswererConfig(space_key, space_label, int(vectors.shape[1]), tuple(vocab), tuple(labels), hidden)
    answerer = Answerer(AnswerNet(cfg))
    net = answerer.net.train()
    q_ids = answerer.encode_questions(questions)
    images = torch.from_numpy(np.asarray(vectors, np.float32).copy())
    target = torch.tensor([labels.index(a) for a in answers])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(target) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order, total = torch.randperm(len(target), generator=gen), 0.0
        for i in range(0, len(target), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(net(images[idx], q_ids[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.info("answerer epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(target))
    net.eval()
    return answerer
