"""SearchService: every query the CLI, the Python API and the UI make, over what the indexer wrote.

Parts are passed in (catalog, store, encoder); `build_service(config)` wires the real ones once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import BadImage, EmptyLibrary, PhotoNotFound, UsageError
from clipsearch.indexer.storage.annotations import TagStore, TextCollections
from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo
from clipsearch.indexer.storage.filters import PhotoFilter, filter_ids
from clipsearch.indexer.storage.store import VectorStore

from .query import Term, parse_query
from .results import LabelScore, SearchHit, SearchPage
from .zeroshot import NEUTRAL_LABEL, ensemble, parse_labels

log = logging.getLogger(__name__)

ImageRef = int | str | bytes  # an indexed photo id, an image file path, or raw image bytes


def image_ref(value: ImageRef) -> ImageRef:
    """A string of digits that is not an existing file means a photo id; anything else is kept as given."""
    if isinstance(value, str) and value.isdigit() and not os.path.exists(value):
        return int(value)
    return value


@dataclass(frozen=True)
class SearchOptions:
    """Relevance and paging policy."""

    strong_z: float = 3.0  # --strong keeps hits at least this many robust sigmas above the library median
    strong_margin: float = 0.5  # ...and within this fraction of (best - mean) of the best hit
    date_pool: int = 200  # sort=date reorders this many most relevant candidates (or all strong ones)
    calib_sample: int = 4096  # library vectors sampled to calibrate z-scores per query
    max_k: int = 10_000  # largest page a single call returns
    tie_slack: int = 32  # extra candidates fetched so that equal scores at a page boundary order stably


def _robust_location_scale(scores: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based sigma of a query's similarity to the library: the matching minority (what the user is
    looking for) does not inflate them, so z-scores and the strong cutoff stay meaningful in small libraries."""
    if len(scores) == 0:
        return 0.0, 1.0
    med = float(np.median(scores))
    mad = float(np.median(np.abs(scores - med))) * 1.4826
    return med, max(mad, float(scores.std()) * 0.1, 1e-6)


class SearchService:
    """Text→image, image→image, image→text, zero-shot classification and tagging (tagging in tagging.py)."""

    def __init__(self, catalog: Catalog, store: VectorStore, encoder: Any, cache_dir: Path | None = None,
                 options: SearchOptions = SearchOptions()) -> None:
        self.catalog, self.store, self.encoder, self.options = catalog, store, encoder, options
        self.cache_dir = cache_dir
        self.tags = TagStore(catalog)
        self.texts = TextCollections(catalog)
        self._calib: dict[str, tuple[int, np.ndarray]] = {}
        self._label_cache: dict[str, np.ndarray] = {}
        self._text_index: dict[tuple[str, int], Any] = {}
        self._space_id: int | None = None

    # --- space ---------------------------------------------------------------------------------------------------
    def space(self, require_photos: bool = True) -> SpaceInfo:
        """The catalog's record of the encoder's embedding space (created on first use)."""
        s = self.encoder.space
        if self._space_id is None:
            self._space_id = self.catalog.ensure_space(s.key, s.label, self.encoder.spec, s.dim)
        info = self.catalog.space(self._space_id, with_count=False)
        if require_photos and not self.catalog.has_vectors(self._space_id):
            others = [f"{o.model_spec} ({o.count})" for o in self.catalog.spaces() if o.count and o.key != s.key]
            hint = f"; photos are indexed with: {', '.join(others)} (use --model)" if others else ""
            raise EmptyLibrary(f"no photos are indexed with model {self.encoder.spec}{hint}")
        return info

    # --- query vectors -------------------------------------------------------------------------------------------
    def image_vector(self, ref: ImageRef) -> np.ndarray:
        """(D,) embedding of an indexed photo (stored, not recomputed), an image file, or raw bytes."""
        if isinstance(ref, int):
            vec = self.catalog.vectors_for(self.space(require_photos=False).id, [ref]).get(ref)
            if vec is None:
                raise PhotoNotFound(f"no indexed photo with id {ref} for this model")
            return vec
        if isinstance(ref, bytes | bytearray):
            return self.encoder.encode_image_bytes(bytes(ref))[0]
        try:
            with open(ref, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImage(f"cannot read image {ref}: {e.strerror or e}") from e
        return self.encoder.encode_image_bytes(data)[0]

    def query_vector(self, terms: list[Term]) -> np.ndarray:
        """Weighted sum of the terms' embeddings, renormalised."""
        texts = [t for t in terms if t.kind == "text"]
        total = np.zeros(self.encoder.space.dim, np.float32)
        if texts:
            for t, v in zip(texts, self.encoder.encode_texts([t.value for t in texts]), strict=True):
                total += t.weight * v
        for t in terms:
            if t.kind == "photo":
                total += t.weight * self.image_vector(int(t.value))
            elif t.kind == "image":
                total += t.weight * self.image_vector(t.value)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise UsageError("the query terms cancel out")
        return total / norm

    # --- ranking -------------------------------------------------------------------------------------------------
    def _calibration(self, space: SpaceInfo) -> np.ndarray:
        cached = self._calib.get(space.key)
        if cached and cached[0] == space.generation:
            return cached[1]
        sample = self.catalog.sample_vectors(space.id, self.options.calib_sample)
        self._calib[space.key] = (space.generation, sample)
        return sample

    def rank(self, qvec: np.ndarray, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
             strong: bool = False, sort: str = "relevance", exclude: set[int] | None = None) -> SearchPage:
        """Rank indexed photos against a query vector with filters, relevance cutoff, sorting and paging."""
        if k < 1 or offset < 0 or k > self.options.max_k:
            raise UsageError(f"-k must be 1..{self.options.max_k} and --offset >= 0")
        if sort not in ("relevance", "date"):
            raise UsageError("sort must be 'relevance' or 'date'")
        space = self.space()
        allowed = filter_ids(self.catalog, space.id, filters)
        want = offset + k + 1 + len(exclude or ()) + self.options.tie_slack
        if sort == "date" or strong:
            want = max(want, self.options.date_pool)
        ids, scores = self.store.search(space, qvec[None, :], want, allowed)[0]
        sample = self._calibration(space) @ qvec
        mu, sigma = _robust_location_scale(sample)
        keep = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if not exclude or int(i) not in exclude]
        keep.sort(key=lambda p: (-round(p[1], 6), p[0]))  # ties (duplicate photos) in a stable order for paging
        cutoff = None
        if strong and keep:
            best = keep[0][1]
            cutoff = max(mu + self.options.strong_z * sigma, best - self.options.strong_margin * (best - mu))
            keep = [(i, s) for i, s in keep if s >= cutoff]
        rows = self.catalog.photos_by_id([i for i, _ in keep])
        if sort == "date":
            keep.sort(key=lambda p: (rows[p[0]]["date"] is not None, rows[p[0]]["date"]), reverse=True)
        page = keep[offset : offset + k]
        tag_map = self.tags.tags_of([i for i, _ in page])
        hits = [
            SearchHit(i, rows[i]["path"], s, (s - mu) / sigma, rows[i]["date"], rows[i]["width"], rows[i]["height"],
                      rows[i]["format"], tuple(tag_map.get(i, ())))
            for i, s in page
        ]
        more = len(keep) > offset + k
        return SearchPage(hits, offset, k, more, cutoff)

    def search(self, query: str, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
               strong: bool = False, sort: str = "relevance") -> SearchPage:
        """Text→image search; `query` may use the combined syntax (search/query.py)."""
        return self.rank(self.query_vector(parse_query(query)), k, offset, filters, strong, sort)

    search_text = search

    def similar(self, ref: ImageRef, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
                strong: bool = False, sort: str = "relevance") -> SearchPage:
        """Image→image: photos like an indexed photo id, an image file, or uploaded bytes (excluding itself)."""
        ref = image_ref(ref)
        exclude = {ref} if isinstance(ref, int) else None
        return self.rank(self.image_vector(ref), k, offset, filters, strong, sort, exclude)

    # --- image → text --------------------------------------------------------------------------------------------
    def label_vectors(self, names: list[str], templates: list[str] | None) -> np.ndarray:
        """Label embeddings (prompt-ensembled when templates are given), cached in memory and on disk."""
        key = hashlib.sha1(repr((self.encoder.space.key, names, templates)).encode()).hexdigest()
        if key in self._label_cache:
            return self._label_cache[key]
        path = self.cache_dir / f"labels-{key}.npy" if self.cache_dir else None
        if path and path.is_file():
            vecs = np.load(path)
        else:
            vecs = ensemble(self.encoder.encode_texts, names, templates) if templates else \
                self.encoder.encode_texts(names)
            if path and len(names) * len(templates or [1]) >= 256:  # worth keeping across processes
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, vecs)
        self._label_cache[key] = vecs
        return vecs

    def describe(self, image: ImageRef, labels: str | list[str] | None = None, vocab: str | None = None,
                 texts: str | None = None, k: int = 10, templates: list[str] | None = None) -> list[LabelScore]:
        """Image→text: rank given labels/captions, a built-in vocabulary, or an indexed text collection."""
        if sum(x is not None for x in (labels, vocab, texts)) != 1:
            raise UsageError("describe needs exactly one of labels, vocab or texts")
        vec = self.image_vector(image)
        if texts is not None:
            return self._rank_collection(vec, texts, k)
        from .vocab import templates_for, vocabulary

        names = vocabulary(vocab) if vocab is not None else [lab.name for lab in parse_labels(labels)]
        tmpl = templates if templates is not None else (
            self.default_templates() if len(names) <= 100 else templates_for(names))
        scores = self.label_vectors(names, tmpl) @ vec
        order = np.argsort(-scores)[:k]
        return [LabelScore(names[i], float(scores[i])) for i in order]

    def _rank_collection(self, vec: np.ndarray, name: str, k: int) -> list[LabelScore]:
        import faiss

        sid = self.space(require_photos=False).id
        gen, texts, vecs = self.texts.load(name, sid)
        key = (name, sid)
        cached = self._text_index.get(key)
        if cached is None or cached[0] != gen:
            index = faiss.IndexFlatIP(vecs.shape[1])
            index.add(np.ascontiguousarray(vecs))
            cached = (gen, index, texts)
            self._text_index[key] = cached
        scores, ids = cached[1].search(vec[None, :].astype(np.float32), min(k, len(texts)))
        return [LabelScore(cached[2][i], float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def add_texts(self, path: str, name: str) -> int:
        """Embed a caption file (one text per line) once as a named collection of this model's space."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
        lines = list(dict.fromkeys(lines))
        if not lines:
            raise UsageError(f"{path} has no text lines")
        return self.texts.replace(name, self.space(require_photos=False).id, lines, self.encoder.encode_texts(lines))

    def default_templates(self) -> list[str]:
        """The model folder's own prompt templates (templates.txt) if it has them, else CLIP's ImageNet ensemble."""
        from .vocab import default_templates

        own = getattr(self.encoder, "default_templates", lambda: None)()
        return own or default_templates()

    def neutral_vector(self, templates: list[str] | None) -> np.ndarray:
        """The reference embedding multi-label probabilities are measured against."""
        return self.label_vectors([NEUTRAL_LABEL], templates or self.default_templates())[0]

    # --- browsing ------------------------------------------------------------------------------------------------
    def thumbnail(self, photo_id: int, size: int = 320) -> bytes:
        """JPEG thumbnail of a catalogued photo, by id only (cached in the home dir)."""
        from .thumbnails import thumbnail

        return thumbnail(self.catalog, (self.cache_dir or Path(".")) / "thumbs", photo_id, size)

    # --- zero-shot (implemented in tagging.py; methods here so the API mirrors the CLI) --------------------------
    def classify(self, images: list[ImageRef], labels: str | list[str], templates: str | None = None,
                 multi_label: bool = False, threshold: float | None = None, k: int = 5) -> list:
        """Zero-shot classify images; see search.tagging.classify."""
        from .tagging import classify

        return classify(self, images, labels, templates, multi_label, threshold, k)

    def tag(self, labels: str | list[str], name: str | None = None, threshold: float | None = None,
            multi_label: bool = False, filters: PhotoFilter = PhotoFilter(), dry_run: bool = False,
            templates: str | None = None, on_progress: Any = None) -> Any:
        """Batch zero-shot tagging of the library; see search.tagging.tag_library."""
        from .tagging import tag_library

        return tag_library(self, labels, name, threshold, multi_label, filters, dry_run, templates,
                           on_progress=on_progress)

    def remove_tags(self, label_set: str) -> int:
        """Undo a tagging run (every tag of the label set)."""
        return self.tags.remove_set(label_set)

    def export_tags(self, path: str, label_set: str | None = None) -> int:
        """Export tags to .csv or .json."""
        from .tagging import export_tags

        return export_tags(self, path, label_set)


def build_service(config: Any) -> SearchService:
    """Wire the real catalog, store and encoder for a config (the CLI, the UI and the API all call this)."""
    from clipsearch.indexer.app import build_encoder, open_parts

    parts = open_parts(config)
    return SearchService(parts.catalog, parts.store, build_encoder(config, parts.catalog), cache_dir=config.cache_dir)
