"""Captions: what is in a photo, in words, from the captioner that reads the photo's stored CLIP embedding.

`load_captioner(spec, encoder)` resolves a captioner spec (``demo``, or a folder written by training) and checks
that it reads the encoder's embedding space; `caption_photos` captions catalogued photos from their stored vectors
(no photo is decoded); `caption_image` captions a file or upload; `caption_scores` is the issue-18 measurement
(object and colour named, BLEU-4). Nothing here writes to the catalog: storing captions is the caller's one
transaction, after every caption has been generated, so a failure leaves the catalog as it was.
torch is reached only through `clipsearch.indexer.model.captioner`, imported when a captioner is loaded.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import ModelUnavailable, PhotoNotFound, UsageError
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.catalog import Catalog


def _demo_folder() -> Path:
    """The bundled demo captioner, found through the installed indexer package (editable or wheel)."""
    import clipsearch.indexer.model as model_pkg

    return Path(model_pkg.__file__).parent / "demo_captioner"


def load_captioner(spec: str, encoder: Any) -> Any:
    """A Captioner for `spec` that reads `encoder`'s embedding space; one-line errors otherwise.

    Specs: ``demo`` (bundled, reads the demo CLIP model's space) or a folder holding captioner.json and
    captioner.safetensors. Pixel-level captioners (open_clip CoCa, BLIP through transformers) are not built yet:
    naming one says so instead of trying a download."""
    spec = (spec or "").strip()
    folder = _demo_folder() if spec == "demo" else Path(spec)
    if not (folder / "captioner.json").is_file():
        if spec == "demo":
            raise ModelUnavailable(f"the demo captioner is missing from {folder}: reinstall clipsearch or rebuild it "
                                   "with `python bench/captions.py --out <that folder>`")
        if os.path.isdir(folder):
            raise UsageError(f"captioner folder {folder} has no captioner.json")
        raise ModelUnavailable(f"captioner '{spec}' is not available offline: only 'demo' or a trained captioner "
                               "folder (captioner.json + captioner.safetensors) can be used; CoCa and BLIP "
                               "captioning are not supported yet")
    from clipsearch.indexer.model.captioner import Captioner

    captioner = Captioner.load(folder)
    space = encoder.space
    if captioner.config.space_key != space.key:
        raise UsageError(f"captioner '{spec}' reads embeddings of {captioner.config.space_label}, not of "
                         f"{space.label} (the model in use): use --model {_model_hint(captioner)}")
    return captioner


def _model_hint(captioner: Any) -> str:
    label = captioner.config.space_label
    return "demo" if label.startswith("demo:") else label


def caption_photos(catalog: Catalog, space_id: int, captioner: Any, ids: list[int] | None = None,
                   batch: int = 8192) -> dict[int, str]:
    """Captions of catalogued photos (every photo with a vector in the space when `ids` is None) from their stored
    embeddings. An id that is not an indexed photo of this space is a PhotoNotFound, raised before any caption is
    written anywhere."""
    if ids is None:
        ids = sorted(catalog.embedded_ids(space_id))
    else:
        rows = catalog.photos_by_id(list(ids))
        missing = [i for i in ids if i not in rows or rows[i]["status"] != PhotoStatus.INDEXED]
        if missing:
            raise PhotoNotFound(f"no indexed photo with id {missing[0]}")
    out: dict[int, str] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        vecs = catalog.vectors_for(space_id, chunk)
        lost = [i for i in chunk if i not in vecs]
        if lost:
            raise PhotoNotFound(f"photo #{lost[0]} has no embedding for this model (run `clipsearch index`)")
        out.update(zip(chunk, captioner.caption_vectors(np.stack([vecs[i] for i in chunk])), strict=True))
    return out


def caption_image(encoder: Any, captioner: Any, data: bytes) -> str:
    """Caption of one image file's bytes (decoded safely by the encoder; a bad image is a one-line BadImage)."""
    return captioner.caption_vectors(encoder.encode_image_bytes(data))[0]


@dataclass(frozen=True)
class CaptionScores:
    """How well generated captions describe photos whose content is known."""

    n: int  # photos scored
    object_and_colour: float  # fraction whose caption names the right shape and the right colour
    per_word: dict[str, float]  # fraction naming each attribute right: shape, colour, background, size
    bleu4: float  # corpus BLEU-4 against the canonical caption (one reference each)


def caption_scores(generated: list[str], truth: list[Any]) -> CaptionScores:
    """Score captions against SampleItems (shape, colour, background, size attributes and a `caption`)."""
    if len(generated) != len(truth) or not truth:
        raise UsageError("caption_scores needs one generated caption per known photo")
    hits = {"shape": 0, "colour": 0, "background": 0, "size": 0}
    both = 0
    for text, item in zip(generated, truth, strict=True):
        said = f" {' '.join(text.lower().split())} "
        ok = {k: f" {getattr(item, k)} " in said for k in hits}
        for k, v in ok.items():
            hits[k] += v
        both += ok["shape"] and ok["colour"]
    n = len(truth)
    return CaptionScores(n, both / n, {k: v / n for k, v in hits.items()},
                         corpus_bleu(generated, [t.caption for t in truth]))


def corpus_bleu(hypotheses: list[str], references: list[str], order: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002): clipped n-gram precisions up to `order`, geometric mean, brevity
    penalty; one reference per hypothesis, whitespace words, lower case."""
    matched, total = [0] * order, [0] * order
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.lower().split(), ref.lower().split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, order + 1):
            hc = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matched[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)
