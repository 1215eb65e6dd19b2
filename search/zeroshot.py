"""Zero-shot building blocks: label lists, prompt templates, ensembled label embeddings and probabilities.

Everything here is numpy over stored embeddings: classifying or tagging never decodes a photo again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clipsearch.indexer.errors import UsageError

NEUTRAL_LABEL = "object"  # the "none of these" reference a multi-label probability is measured against


@dataclass(frozen=True)
class Label:
    """A label with an optional per-label threshold (``dog=0.7`` in a list or file)."""

    name: str
    threshold: float | None = None


def parse_labels(spec: str | list[str] | None) -> list[Label]:
    """Labels from a file (one per line), a comma list ``a,b,c``, or a Python list; ``name=0.6`` sets a threshold."""
    if spec is None:
        raise UsageError("no labels given")
    if isinstance(spec, str):
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                items = [line.strip() for line in f]
        else:
            items = [s.strip() for s in spec.split(",")]
    else:
        items = [s.strip() for s in spec]
    out, seen = [], set()
    for item in items:
        if not item or item.startswith("#"):
            continue
        name, thr = item, None
        if "=" in item:
            name, _, raw = item.rpartition("=")
            try:
                thr = float(raw)
            except ValueError:
                name, thr = item, None
        name = name.strip()
        if name and name not in seen:
            seen.add(name)
            out.append(Label(name, thr))
    if not out:
        raise UsageError("the label list is empty")
    return out


def load_templates(path: str | None, default: list[str]) -> list[str]:
    """Prompt templates from a file (one per line, each with ``{}``), or the default ensemble."""
    if path is None:
        return default
    with open(path, encoding="utf-8") as f:
        templates = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise UsageError(f"every template needs a {{}} placeholder (bad: {bad[:3]})" if bad else "no templates")
    return templates


def ensemble(encode_texts: Callable[[list[str]], np.ndarray], names: list[str], templates: list[str]) -> np.ndarray:
    """(M, D) label embeddings: mean of the normalised template embeddings per label, renormalised (CLIP paper)."""
    prompts = [t.format(name) for name in names for t in templates]
    emb = encode_texts(prompts).reshape(len(names), len(templates), -1).mean(axis=1)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


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
