"""Zero-shot building blocks: label lists, prompt templates, ensembled label embeddings and probabilities.

Everything here is numpy over stored embeddings: classifying or tagging never decodes a photo again. Labels and
templates reach the service as text or lists only; reading a file is the caller's explicit choice
(`read_label_file`, `read_template_file`: the CLI's `--labels FILE`), so no value typed into a UI or sent to a
server can make us read a file on this machine.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import UsageError

NEUTRAL_LABEL = "object"  # the "none of these" reference a multi-label probability is measured against
MAX_LABEL_FILE = 4 * 1024 * 1024  # a label or template file larger than this is a mistake, not a label list


@dataclass(frozen=True)
class Label:
    """A label with an optional per-label threshold (``dog=0.7`` in a list or file)."""

    name: str
    threshold: float | None = None


def check_probability(value: float | None, what: str = "threshold") -> float | None:
    """A probability threshold in [0, 1] (None passes): an out-of-range value would pass nothing and replace a
    tag set with nothing, so it is refused before anything runs."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} must be a number between 0 and 1, got {value!r}") from e
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise UsageError(f"{what} must be between 0 and 1, got {value}")
    return v


def text_lines(text: str) -> list[str]:
    """Non-blank, non-comment lines of a label or template text (one item per line, commas kept)."""
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def _decode_text(data: bytes, what: str, name: str) -> str:
    if len(data) > MAX_LABEL_FILE:
        raise UsageError(f"{what} file {name} is larger than {MAX_LABEL_FILE // (1024 * 1024)} MB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} file {name} is not UTF-8 text") from e


def _read_text_file(path: str | Path, what: str) -> str:
    """A small UTF-8 text file's content, or a one-line UsageError saying why it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LABEL_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} file {path}: {e.strerror or e}") from e
    return _decode_text(data, what, str(path))


def label_lines(data: bytes, name: str = "upload") -> list[str]:
    """Labels from the bytes of an uploaded label file, one per line, exactly as `read_label_file` reads a file."""
    return text_lines(_decode_text(data, "label", name))


def read_label_file(path: str) -> list[str]:
    """Labels from a file, one per line (the CLI's ``--labels FILE``); blank and ``#`` lines are skipped."""
    return text_lines(_read_text_file(path, "label"))


def read_template_file(path: str) -> list[str]:
    """Prompt templates from a file, one per line, each with ``{}`` (the CLI's ``--templates FILE``)."""
    return check_templates(text_lines(_read_text_file(path, "template")))


def parse_labels(spec: str | list[str] | None) -> list[Label]:
    """Labels from text or a list, never from a file: a text with line breaks is one label per line, otherwise a
    comma list ``a,b,c``; ``name=0.6`` sets a per-label threshold. Blank, ``#`` and repeated labels are dropped."""
    if spec is None:
        raise UsageError("no labels given")
    if isinstance(spec, str):
        items = text_lines(spec) if "\n" in spec.strip() else [s.strip() for s in spec.split(",")]
    else:
        items = [str(s).strip() for s in spec]
    out, seen = [], set()
    for item in items:
        if not item or item.startswith("#"):
            continue
        name, thr = item, None
        if "=" in item:
            head, _, raw = item.rpartition("=")
            try:
                thr = float(raw)
                name = head
            except ValueError:
                thr = None
            check_probability(thr, f"the threshold of label '{head.strip()}'")
        name = name.strip()
        if name and name not in seen:
            seen.add(name)
            out.append(Label(name, thr))
    if not out:
        raise UsageError("the label list is empty")
    return out


def check_templates(templates: list[str]) -> list[str]:
    """Templates that each format one label: exactly a ``{}`` slot, no other braces (``{x}`` would crash later)."""
    templates = [t.strip() for t in templates if t and t.strip()]
    if not templates:
        raise UsageError("no prompt templates given")
    for t in templates:
        try:
            ok = "\x00" in t.format("\x00")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"every template needs one {{}} placeholder and no other braces (bad: '{t[:60]}')")
    return list(dict.fromkeys(templates))


def parse_templates(spec: str | list[str] | None) -> list[str] | None:
    """Templates from text (one per line) or a list, never from a file; None (or blank text) means "the model's
    default ensemble", which the caller picks (loading it may import the model's metadata)."""
    if spec is None or (isinstance(spec, str) and not text_lines(spec)):
        return None
    return check_templates(text_lines(spec) if isinstance(spec, str) else list(spec))


def ensemble(encode_texts: Callable[[list[str]], np.ndarray], names: list[str], templates: list[str]) -> np.ndarray:
    """(M, D) label embeddings: mean of the normalised template embeddings per label, renormalised (CLIP paper)."""
    prompts = [t.format(name) for name in names for t in templates]
    emb = encode_texts(prompts).reshape(len(names), len(templates), -1).mean(axis=1)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


class LabelVectors:
    """Label embeddings of one encoder, cached in memory and (from 8 texts) on disk; the one text-encoding path
    that describe, classify and tagging share, so a label set is encoded once per process whichever asks."""

    def __init__(self, encoder: Any, cache_dir: Path | None = None) -> None:
        self.encoder, self.cache_dir = encoder, cache_dir
        self._cache: dict[str, np.ndarray] = {}

    def _key(self, names: list[str], templates: list[str] | None) -> str:
        return hashlib.sha1(repr((self.encoder.space.key, names, templates)).encode()).hexdigest()

    def on_disk(self, names: list[str], templates: list[str] | None) -> bool:
        """Whether this label set's embeddings are already in the disk cache."""
        return bool(self.cache_dir) and (self.cache_dir / f"labels-{self._key(names, templates)}.npy").is_file()

    def __call__(self, names: list[str], templates: list[str] | None) -> np.ndarray:
        """(len(names), D) embeddings, prompt-ensembled when templates are given."""
        key = self._key(names, templates)
        if key in self._cache:
            return self._cache[key]
        path = self.cache_dir / f"labels-{key}.npy" if self.cache_dir else None
        if path and path.is_file():
            vecs = np.load(path)
        else:
            vecs = ensemble(self.encoder.encode_texts, names, templates) if templates else \
                self.encoder.encode_texts(names)
            if path and len(names) * len(templates or [1]) >= 8:  # worth keeping across processes (~0.1 s cold)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, vecs)
                os.replace(tmp, path)  # a concurrent reader sees no file or a whole one
        self._cache[key] = vecs
        return vecs

    def default_templates(self) -> list[str]:
        """The model folder's own prompt templates (templates.txt) if it has them, else CLIP's ImageNet ensemble."""
        from .vocab import default_templates

        own = getattr(self.encoder, "default_templates", lambda: None)()
        return own or default_templates()

    def neutral(self, templates: list[str] | None) -> np.ndarray:
        """The reference embedding multi-label probabilities are measured against."""
        return self([NEUTRAL_LABEL], templates or self.default_templates())[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable, in place-friendly float32."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def single_label_probs(images: np.ndarray, labels: np.ndarray, logit_scale: float) -> np.ndarray:
    """P(label | image) over the label set: softmax of scaled cosine similarities."""
    return softmax((logit_scale * (images @ labels.T)).astype(np.float32))


def multi_label_probs(images: np.ndarray, labels: np.ndarray, neutral: np.ndarray, logit_scale: float) -> np.ndarray:
    """Independent P(label vs. a neutral reference) per label, so several labels can hold at once."""
    s = images @ labels.T
    ref = images @ neutral.reshape(-1)
    return (1.0 / (1.0 + np.exp(-logit_scale * (s - ref[:, None])))).astype(np.float32)


def thresholds(labels: list[Label], default: float) -> np.ndarray:
    """Per-label thresholds (a label's own, else the default)."""
    return np.array([lab.threshold if lab.threshold is not None else default for lab in labels], np.float32)
