"""Image→text for SearchService.describe: rank labels, a built-in vocabulary or a caption collection for one
image vector, and keep caption collections (embedded once, searched through a FAISS inner-product index per
collection and space, rebuilt only when the collection changes).

Kept apart from search/service.py so the service stays a list of entry points; it passes the image vector in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.storage.annotations import TextCollections

from .results import LabelScore
from .zeroshot import LabelVectors, parse_labels, parse_templates


class ImageToText:
    """Labels, vocabularies and caption collections ranked for an image vector."""

    def __init__(self, encoder: Any, texts: TextCollections, label_vectors: LabelVectors) -> None:
        self.encoder, self.texts, self.label_vectors = encoder, texts, label_vectors
        self._index: dict[tuple[str, int], tuple[int, Any, list[str]]] = {}  # (name, space) -> (gen, index, texts)

    def describe(self, image_vector: Callable[[], np.ndarray], space_id: Callable[[], int],
                 labels: str | list[str] | None, vocab: str | None, texts: str | None, k: int,
                 templates: str | list[str] | None) -> list[LabelScore]:
        """Every argument is checked before `image_vector()` decodes or looks up the image."""
        if sum(x is not None for x in (labels, vocab, texts)) != 1:
            raise UsageError("describe needs exactly one of labels, vocab or texts")
        tmpl = parse_templates(templates)
        names = [lab.name for lab in parse_labels(labels)] if labels is not None else None
        vec = image_vector()
        if texts is not None:
            return self._rank_collection(vec, texts, space_id(), k)
        from .vocab import templates_for, vocabulary

        if names is None:
            names = vocabulary(str(vocab))
        if tmpl is None:
            tmpl = self.label_vectors.default_templates() if len(names) <= 100 else templates_for(names)
        scores = self.label_vectors(names, tmpl) @ vec
        order = np.argsort(-scores)[:k]
        return [LabelScore(names[i], float(scores[i])) for i in order]

    def _rank_collection(self, vec: np.ndarray, name: str, sid: int, k: int) -> list[LabelScore]:
        import faiss

        gen, texts, vecs = self.texts.load(name, sid)
        cached = self._index.get((name, sid))
        if cached is None or cached[0] != gen:
            index = faiss.IndexFlatIP(vecs.shape[1])
            index.add(np.ascontiguousarray(vecs))
            cached = (gen, index, texts)
            self._index[(name, sid)] = cached
        scores, ids = cached[1].search(vec[None, :].astype(np.float32), min(k, len(texts)))
        return [LabelScore(cached[2][i], float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def add_lines(self, lines: list[str], name: str, space_id: int) -> int:
        """Embed texts (blank and repeated ones dropped) once as a named collection of a space."""
        lines = list(dict.fromkeys(s.strip() for s in lines if s and s.strip()))
        if not lines:
            raise UsageError("the text collection is empty")
        if not name or not name.strip():
            raise UsageError("the collection name is empty")
        return self.texts.replace(name.strip(), space_id, lines, self.encoder.encode_texts(lines))


def read_caption_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 caption file; a one-line UsageError when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    if not lines:
        raise UsageError(f"{path} has no text lines")
    return lines
