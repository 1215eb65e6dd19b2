"""`clipsearch eval`: retrieval recall@K both ways on a captioned set, zero-shot top-1/top-5 on an ImageFolder.

Uses the same encoder, decoder and FAISS inner-product search as the product, so a bug in either shows here.
Where several images share a caption exactly, a text→image hit on any of them counts as correct (and the report
says how many captions are shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import decode_file
from clipsearch.indexer.model.datasets import image_folder_classes, load_caption_pairs

from .zeroshot import LabelVectors

KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalSet:
    """Images, unique caption texts, and which captions belong to which images."""

    images: list[Path]
    texts: list[str]
    text_to_images: list[set[int]]  # caption index → indices of every image carrying that exact caption
    image_to_texts: list[set[int]]


def build_retrieval_set(pairs: dict[Path, list[str]]) -> RetrievalSet:
    """Deduplicate captions so that identical captions are one query with several correct images."""
    images = sorted(pairs)
    text_index: dict[str, int] = {}
    t2i: list[set[int]] = []
    i2t: list[set[int]] = [set() for _ in images]
    for i, img in enumerate(images):
        for cap in pairs[img]:
            j = text_index.setdefault(cap, len(text_index))
            if j == len(t2i):
                t2i.append(set())
            t2i[j].add(i)
            i2t[i].add(j)
    return RetrievalSet(images, list(text_index), t2i, i2t)


def _embed_images(encoder: Any, paths: list[Path], batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        pix = []
        for p in paths[i : i + batch]:
            r = decode_file(p, encoder.preprocess_spec)
            if r.pixels is None:
                raise UsageError(f"cannot decode {p}: {r.reason}")
            pix.append(r.pixels)
        out.append(encoder.encode_pixels(np.stack(pix)))
    return np.concatenate(out)


def _search(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k ids of queries against db with the product's index type (exact inner product)."""
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(np.ascontiguousarray(db, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(db)))
    return ids


def _recall(ids: np.ndarray, correct: list[set[int]]) -> dict[str, float]:
    return {f"R@{k}": float(np.mean([bool(ok & set(row[:k].tolist())) for row, ok in zip(ids, correct, strict=True)]))
            for k in KS}


def evaluate(root: Path, encoder: Any, captions: str | None = None, templates: list[str] | None = None,
             relevance: bool = True) -> dict:
    """Every evaluation whose layout is present under `root`; sections absent when their layout is absent.
    Each image is embedded once and shared by the sections."""
    result: dict[str, Any] = {}
    cap_file = captions or next((n for n in ("captions.txt", "captions.csv", "captions.jsonl",
                                             "dataset_flickr30k.json", "dataset_coco.json") if (root / n).is_file()),
                                None)
    pairs = load_caption_pairs(root, cap_file) if cap_file else {}
    classes = image_folder_classes(root)
    paths = sorted(set(pairs) | {p for files in classes.values() for p in files})
    if not paths:
        raise UsageError(f"{root} has neither a caption file nor class folders to evaluate")
    vecs = _embed_images(encoder, paths)
    row = {p: i for i, p in enumerate(paths)}
    if pairs:
        rs = build_retrieval_set(pairs)
        img = vecs[[row[p] for p in rs.images]]
        txt = encoder.encode_texts(rs.texts)
        result["text_to_image"] = _recall(_search(img, txt, max(KS)), rs.text_to_images)
        result["image_to_text"] = _recall(_search(txt, img, max(KS)), rs.image_to_texts)
        result["retrieval_info"] = {"images": len(rs.images), "captions": len(rs.texts),
                                    "shared_captions": sum(1 for s in rs.text_to_images if len(s) > 1)}
    if classes:
        names = list(classes)
        members = [row[p] for n in names for p in classes[n]]
        truth = np.array([i for i, n in enumerate(names) for _ in classes[n]])
        label_vectors = LabelVectors(encoder)  # the product's label path: same templates, same ensembling
        scores = vecs[members] @ label_vectors(names, templates or label_vectors.default_templates()).T
        order = np.argsort(-scores, axis=1)
        result["zero_shot"] = {"top1": float(np.mean(order[:, 0] == truth)),
                               "top5": float(np.mean((order[:, :5] == truth[:, None]).any(axis=1))),
                               "classes": len(names), "images": len(members)}
        if relevance:
            result["relevance"] = _relevance(encoder, vecs, classes, pairs, row)
    return result


def _relevance(encoder: Any, vecs: np.ndarray, classes: dict[str, list[Path]], pairs: dict[Path, list[str]],
               row: dict[Path, int]) -> dict[str, Any]:
    """The strong-match figures (search/relevance_eval.py) with the product's calibration for this model."""
    from .relevance import Relevance, vocab_for
    from .relevance_eval import present_queries, relevance_report

    rel = Relevance(encoder, vocab_for(encoder), LabelVectors(encoder))
    return relevance_report(rel, encoder.encode_texts, vecs, present_queries(classes, pairs, row))
