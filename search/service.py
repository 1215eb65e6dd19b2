"""SearchService: every query the CLI, the Python API and the UI make, over what the indexer wrote.

Parts are passed in (catalog, store, encoder); `build_service(config)` wires the real ones once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import BadImage, EmptyLibrary, PhotoNotFound, UsageError
from clipsearch.indexer.ingest.cores import usable_cores
from clipsearch.indexer.storage.annotations import TagStore, TextCollections
from clipsearch.indexer.storage.catalog import Catalog, SpaceInfo
from clipsearch.indexer.storage.filters import PhotoFilter, filter_ids
from clipsearch.indexer.storage.store import VectorStore

from .caption_search import caption_page, captions_of
from .image_text import ImageToText, read_caption_file
from .ocr_search import OcrQuery, OcrSearch, hybrid_query, plan_query
from .query import Term, parse_query
from .refs import ImageRef, image_ref  # noqa: F401 - image_ref: re-exported (callers import it from here)
from .relevance import LEVELS, STRONG, WEAK, Relevance, robust_location_scale, vocab_for
from .results import Classification, LabelScore, SearchHit, SearchPage, TagPreview
from .stacks import GroupCache, stacked_page
from .tagging import Tagger, export_tags, remove_tags, tags_document
from .text_cache import TextVectors
from .thumbnails import thumbnail
from .zeroshot import LabelVectors, parse_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOptions:
    """Relevance and paging policy."""

    strong_z: float = 3.0  # image queries: --strong keeps hits this many robust sigmas above the library median
    strong_margin: float = 0.5  # ...and within this fraction of (best - mean) of the best hit
    date_pool: int = 200  # sort=date reorders this many most relevant candidates (or all strong ones)
    calib_sample: int = 4096  # library vectors sampled to calibrate z-scores per query
    max_k: int = 10_000  # largest page a single call returns
    tie_slack: int = 32  # extra candidates fetched so that equal scores at a page boundary order stably
    allow_files: bool = True  # image terms/refs may name files on this machine; False in the UI and the server
    relevance_pool: int = 256  # text queries: candidates labelled strong/possible/weak at first (grows as needed)
    relevance_max: int = 20_000  # ...at most this many; past it the counts are minima (SearchPage.counts_exact)
    stack_on_demand: int = 5_000  # stack=True groups duplicates during a query only up to this many photos


class SearchService:
    """Text→image, image→image, image→text, zero-shot classification and tagging (tagging in tagging.py)."""

    def __init__(self, catalog: Catalog, store: VectorStore, encoder: Any, cache_dir: Path | None = None,
                 options: SearchOptions = SearchOptions(), label_cache: Path | None = None) -> None:
        self.catalog, self.store, self.encoder, self.options = catalog, store, encoder, options
        self.cache_dir = cache_dir
        self.tags = TagStore(catalog)
        self.texts = TextCollections(catalog)
        self.label_vectors = LabelVectors(encoder, label_cache or cache_dir)  # label files depend on the model only
        self.relevance = Relevance(encoder, vocab_for(encoder), self.label_vectors,
                                   TextVectors(encoder, disk_dir=label_cache or cache_dir))
        self.captions = ImageToText(encoder, self.texts, self.label_vectors)
        self.tagger = Tagger(encoder, catalog, store, self.tags, self.label_vectors, self.space, self.relevance)
        self._calib: dict[str, tuple[int, np.ndarray]] = {}
        self._examples: dict[str, tuple[int, list[str]]] = {}
        self._space_id: int | None = None
        self.ocr = OcrSearch(catalog)  # text in photos: text: queries and the hybrid ranking (ocr_search.py)
        self.groups = GroupCache(catalog, cache_dir, options.stack_on_demand, usable_cores())  # search(stack=True)

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
    def _no_files(self, what: str) -> UsageError:
        return UsageError(f"{what} cannot name a file on the server here: upload the image, or give a catalogued "
                          "photo as #ID")

    def image_ref(self, value: ImageRef) -> ImageRef:
        """`image_ref`, except that where files are not allowed a string can only be a photo id (``12``, ``#12``):
        the answer never depends on what exists on this machine."""
        if isinstance(value, str) and not self.options.allow_files:
            digits = value.strip().removeprefix("#")
            if not digits.isdigit():
                raise self._no_files("an image")
            return int(digits)
        return image_ref(value)

    def image_vector(self, ref: ImageRef, box: Any = None) -> np.ndarray:
        """(D,) embedding of an indexed photo (stored, not recomputed), an image file, or raw bytes; with a `box`
        (x, y, w, h in upright pixels, or "x,y,w,h"), of that crop, embedded like a photo (search/region.py)."""
        if box is not None:
            from .region import parse_box, region_vector

            if isinstance(ref, str) and not self.options.allow_files:
                raise self._no_files("an image")
            return region_vector(self.encoder, ref, parse_box(box) if isinstance(box, str) else box, self.catalog)
        if isinstance(ref, int):
            vec = self.catalog.vectors_for(self.space(require_photos=False).id, [ref]).get(ref)
            if vec is None:
                raise PhotoNotFound(f"no indexed photo with id {ref} for this model")
            return vec
        if isinstance(ref, bytes | bytearray):
            return self.encoder.encode_image_bytes(bytes(ref))[0]
        if not self.options.allow_files:
            raise self._no_files("an image")
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
        if texts:  # through the relevance check's text cache: a repeated query (every UI rerun) costs nothing
            for t, v in zip(texts, self.relevance.text_vectors([t.value for t in texts]), strict=True):
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

    def check_k(self, k: int, offset: int = 0, sort: str = "relevance") -> None:
        """The page size, offset and sort order every ranking call accepts (the CLI checks the same values)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self.options.max_k:
            raise UsageError(f"k must be between 1 and {self.options.max_k}, got {k}")
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
            raise UsageError(f"offset must be 0 or more, got {offset}")
        if sort not in ("relevance", "date"):
            raise UsageError("sort must be 'relevance' or 'date'")

    # --- ranking -------------------------------------------------------------------------------------------------
    def _calibration(self, space: SpaceInfo) -> np.ndarray:
        cached = self._calib.get(space.key)
        if cached and cached[0] == space.generation:
            return cached[1]
        sample = self.catalog.sample_vectors(space.id, self.options.calib_sample)
        self._calib[space.key] = (space.generation, sample)
        return sample

    def rank(self, qvec: np.ndarray, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
             strong: bool = False, sort: str = "relevance", exclude: set[int] | None = None,
             text: str | None = None, ocr: OcrQuery | None = None) -> SearchPage:
        """Rank indexed photos against a query vector with filters, relevance cutoff, sorting and paging. With the
        query's `text` every candidate gets a calibrated label (search/relevance.py) and `strong` keeps the strong
        ones; without it (image queries) `strong` is the z-score cutoff of _z_cutoff. `ocr`: see ocr_search.py."""
        self.check_k(k, offset, sort)
        space = self.space()
        allowed = filter_ids(self.catalog, space.id, filters)
        want = offset + k + 1 + len(exclude or ()) + self.options.tie_slack
        if sort == "date" or strong:
            want = max(want, self.options.date_pool)
        mu, sigma = robust_location_scale(self._calibration(space) @ qvec)
        labelled = self._labelled(space, qvec, text, want, allowed, exclude) if text is not None else None
        if labelled is not None:
            keep, labels, page_info = labelled
            if strong:
                keep = [p for p in keep if labels[p[0]][0] == STRONG]
            cutoff = None
        else:
            keep, labels, page_info = self._candidates(space, qvec, want, allowed, exclude), {}, {}
            cutoff = self._z_cutoff(keep, mu, sigma) if strong and keep else None
            if cutoff is not None:
                keep = [(i, s) for i, s in keep if s >= cutoff]
        found: list[tuple[int, float]] = []
        if ocr is not None:  # fused with the photos' recognised text; cosines for photos only the text found
            pool = self.options.relevance_max if ocr.required or allowed is not None else max(want, len(keep))
            keep, found = self.ocr.fuse_into(ocr, keep, pool, allowed, exclude, lambda ids: {
                i: float(v @ qvec) for i, v in self.catalog.vectors_for(space.id, ids).items()})
        hits, more = self._page(keep, k, offset, sort, labels, (mu, sigma), ocr, dict(found))
        return SearchPage(hits, offset, k, more, cutoff, **page_info)

    def _page(self, keep: list[tuple[int, float]], k: int, offset: int, sort: str,
              labels: dict[int, tuple[str, float]], norm: tuple[float, float] | None, ocr: OcrQuery | None,
              ocr_scores: dict[int, float]) -> tuple[list[SearchHit], bool]:
        """The page's hits and whether more follow; z-scores from `norm` (median, sigma), or 0 without one."""
        rows = self.catalog.photos_by_id([i for i, _ in keep])
        if sort == "date":
            keep = sorted(keep, key=lambda p: (rows[p[0]]["date"] is not None, rows[p[0]]["date"]), reverse=True)
        page = keep[offset : offset + k]
        tag_map = self.tags.tags_of([i for i, _ in page])
        mu, sigma = norm or (0.0, 0.0)
        hits = [
            SearchHit(i, rows[i]["path"], s, (s - mu) / sigma if norm else 0.0, rows[i]["date"], rows[i]["width"],
                      rows[i]["height"], rows[i]["format"], tuple(tag_map.get(i, ())), *labels.get(i, (None, None)),
                      offset + n + 1)
            for n, (i, s) in enumerate(page)
        ]
        if ocr is not None and ocr_scores:
            hits = self.ocr.annotate(hits, ocr, ocr_scores)
        return hits, len(keep) > offset + k

    def _candidates(self, space: SpaceInfo, qvec: np.ndarray, want: int, allowed: np.ndarray | None,
                    exclude: set[int] | None) -> list[tuple[int, float]]:
        """The `want` best (id, score) pairs, ties (duplicate photos) in a stable order for paging."""
        ids, scores = self.store.search(space, qvec[None, :], want, allowed)[0]
        keep = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if not exclude or int(i) not in exclude]
        keep.sort(key=lambda p: (-round(p[1], 6), p[0]))
        return keep

    def _z_cutoff(self, keep: list[tuple[int, float]], mu: float, sigma: float) -> float:
        """Image queries' strong cutoff: robust sigmas above the library median, near the best hit."""
        best = keep[0][1]
        return max(mu + self.options.strong_z * sigma, best - self.options.strong_margin * (best - mu))

    def _labelled(self, space: SpaceInfo, qvec: np.ndarray, text: str, want: int, allowed: np.ndarray | None,
                  exclude: set[int] | None) -> tuple[list[tuple[int, float]], dict[int, tuple[str, float]],
                                                     dict[str, Any]]:
        """Candidates with their relevance labels. The candidate pool grows until its last quarter holds no strong
        or possible photo (or the whole library, or relevance_max), so that the counts and `--strong` see every
        photo that could carry those labels, whatever the page size."""
        pool = max(want, self.options.relevance_pool)
        while True:
            keep = self._candidates(space, qvec, pool, allowed, exclude)
            vecs = self.catalog.vectors_for(space.id, [i for i, _ in keep])
            keep = [p for p in keep if p[0] in vecs]
            mat = np.stack([vecs[i] for i, _ in keep]) if keep else np.zeros((0, qvec.shape[0]), np.float32)
            plan, probs, labels = self.relevance.label_photos(text, qvec, mat)
            exhausted = len(keep) < pool - len(exclude or ())
            tail = labels[len(labels) * 3 // 4:]
            if exhausted or pool >= self.options.relevance_max or all(lab == WEAK for lab in tail):
                break
            pool = min(pool * 4, self.options.relevance_max)
        counts = {lev: labels.count(lev) for lev in LEVELS}
        exact = exhausted or all(lab == WEAK for lab in tail)
        by_id = {i: (lab, float(p)) for (i, _), lab, p in zip(keep, labels, probs.tolist(), strict=True)}
        return keep, by_id, {"counts": counts, "counts_exact": exact, "note": plan.note()}

    def search(self, query: str, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
               strong: bool = False, sort: str = "relevance", stack: bool = False) -> SearchPage:
        """Text→image search; `query` may use the combined syntax (search/query.py) and `text:"..."` terms (words
        in the photos, search/ocr_search.py). A plain text query (one positive text term) gets calibrated relevance
        labels and counts, and is fused with OCR matches where OCR has run; a combined one is ranked like an image.
        `stack` folds near-duplicates into one hit each (search/stacks.py); k and offset then count stacks."""
        self.check_k(k, offset, sort)
        if stack:
            return self._stacked(lambda n: self.search(query, n, 0, filters, strong, sort), k, offset)
        captioned = caption_page(self.catalog, query, k, offset, filters, self.space().id, sort, self.tags)
        if captioned is not None:  # caption:"..." : the stored captions' words, full-text ranked (no model)
            return captioned
        clip_query, ocr = plan_query(query)
        if ocr is not None and not clip_query:
            return self._text_page(ocr, k, offset, filters, sort)
        terms = parse_query(clip_query, self.options.allow_files)
        text = terms[0].value if len(terms) == 1 and terms[0].kind == "text" else None
        if ocr is None and text is not None:
            ocr = hybrid_query(text)
        return self.rank(self.query_vector(terms), k, offset, filters, strong, sort, text=text, ocr=ocr)

    def _text_page(self, ocr: OcrQuery, k: int, offset: int, filters: PhotoFilter, sort: str) -> SearchPage:
        """A query of text: terms only: photos whose recognised text matches, by full-text score (no model)."""
        allowed = filter_ids(self.catalog, self.space().id, filters)
        n = self.options.relevance_max if sort == "date" or allowed is not None else offset + k + 1
        found = self.ocr.matches(ocr, n, allowed)
        hits, more = self._page(found, k, offset, sort, {}, None, ocr, dict(found))
        return SearchPage(hits, offset, k, more, note=self.ocr.note())

    def _stacked(self, fetch: Any, k: int, offset: int) -> SearchPage:
        return stacked_page(fetch, k, offset, self.groups.index(self.space()), self.options.max_k)

    def similar(self, ref: ImageRef, k: int = 20, offset: int = 0, filters: PhotoFilter = PhotoFilter(),
                strong: bool = False, sort: str = "relevance", box: Any = None, stack: bool = False) -> SearchPage:
        """Image→image: photos like an indexed photo id, an image file, or uploaded bytes (excluding itself).
        `box` (x, y, w, h in the photo's upright pixels, or "x,y,w,h") searches with that region only; `stack` as
        in search."""
        self.check_k(k, offset)
        if stack:
            return self._stacked(lambda n: self.similar(ref, n, 0, filters, strong, sort, box), k, offset)
        ref = self.image_ref(ref)
        exclude = {ref} if isinstance(ref, int) else None
        vec = self.image_vector(ref, box)
        return self.rank(vec, k, offset, filters, strong, sort, exclude)

    # --- image → text (image_text.py) ------------------------------------------------------------------------------
    def describe(self, image: ImageRef, labels: str | list[str] | None = None, vocab: str | None = None,
                 texts: str | None = None, k: int = 10, templates: str | list[str] | None = None) -> list[LabelScore]:
        """Image→text: rank given labels/captions (text or a list, never a file), a built-in vocabulary, or an
        indexed text collection."""
        self.check_k(k)
        return self.captions.describe(lambda: self.image_vector(self.image_ref(image)),
                                      lambda: self.space(require_photos=False).id, labels, vocab, texts, k, templates)

    def add_texts(self, path: str, name: str) -> int:
        """Embed a caption file (one text per line) once as a named collection of this model's space."""
        if not self.options.allow_files:
            raise self._no_files("a caption collection")
        return self.add_text_lines(read_caption_file(path), name)

    def add_text_lines(self, lines: list[str], name: str) -> int:
        """Embed texts (blank and repeated ones dropped) once as a named collection of this model's space."""
        return self.captions.add_lines(lines, name, self.space(require_photos=False).id)

    # --- browsing ------------------------------------------------------------------------------------------------
    def example_queries(self, n: int = 6) -> list[str]:
        """Queries with strong matches in this library (from a sample of it), cached per index generation: what
        the UI offers as clickable examples."""
        from .relevance import suggest_queries

        space = self.space()
        cached = self._examples.get(space.key)
        if cached is None or cached[0] != space.generation:
            cached = (space.generation, suggest_queries(self.relevance, self._calibration(space), n))
            self._examples[space.key] = cached
        return list(cached[1])

    def default_labels(self) -> list[str]:
        """Labels that fit this model's world: a closed vocabulary's first group (the demo's shapes), else a few
        everyday photo subjects. What the UI offers before the user types their own."""
        vocab = self.relevance.vocab
        if vocab.closed and vocab.groups:
            return list(next(iter(vocab.groups.values())))
        return ["people", "dog", "cat", "beach", "mountain", "city", "food", "car"]

    def photo_info(self, photo_id: int) -> SearchHit:
        """One catalogued photo's metadata and tags (the lightbox), as a hit without a score."""
        row = self.catalog.photos_by_id([int(photo_id)]).get(int(photo_id))
        if row is None:
            raise PhotoNotFound(f"no indexed photo with id {photo_id}")
        tags = tuple(self.tags.tags_of([int(photo_id)]).get(int(photo_id), ()))
        return SearchHit(int(photo_id), row["path"], 0.0, 0.0, row["date"], row["width"], row["height"],
                         row["format"], tags)

    def thumbnail(self, photo_id: int, size: int = 320) -> bytes:
        """JPEG thumbnail of a catalogued photo, by id only (cached in the home dir)."""
        return thumbnail(self.catalog, (self.cache_dir or Path(".")) / "thumbs", photo_id, size)

    def captions_of(self, ids: list[int]) -> dict[int, str]:
        """Stored captions of photos (`clipsearch caption`), for the lightbox; photos without one are left out."""
        return captions_of(self.catalog, ids)

    # --- zero-shot (Tagger in tagging.py; methods here so the API mirrors the CLI) ------------------------------
    def classify(self, images: list[ImageRef], labels: str | list[str], templates: str | list[str] | None = None,
                 multi_label: bool = False, threshold: float | None = None, k: int = 5) -> list[Classification]:
        """Zero-shot classify images (files, bytes or indexed ids): top-k labels with probabilities each.
        Labels and templates are text or lists (see zeroshot.parse_labels), never file names."""
        self.check_k(k)
        if not images:
            raise UsageError("no images to classify")
        parse_labels(labels)  # a bad label list is reported before any image is decoded
        refs = [self.image_ref(r) for r in images]
        vecs = np.stack([self.image_vector(r) for r in refs])
        sources = [f"#{r}" if isinstance(r, int) else ("<upload>" if isinstance(r, bytes | bytearray) else str(r))
                   for r in refs]
        return self.tagger.classify(vecs, sources, labels, templates, multi_label, threshold, k)

    def tag(self, labels: str | list[str], name: str | None = None, threshold: float | None = None,
            multi_label: bool = False, filters: PhotoFilter = PhotoFilter(), dry_run: bool = False,
            templates: str | list[str] | None = None, on_progress: Any = None,
            strong_only: bool = False) -> TagPreview:
        """Batch zero-shot tagging of the library; see Tagger.tag (every argument is checked before any write).
        `strong_only` tags only photos that are strong matches of their label (the search's calibrated cutoff)."""
        return self.tagger.tag(labels, name, threshold, multi_label, filters, dry_run, templates,
                               on_progress=on_progress, strong_only=strong_only)

    def remove_tags(self, label_set: str) -> int:
        """Undo a tagging run (every tag of the label set); see tagging.remove_tags (no encoder needed)."""
        return remove_tags(self.catalog, label_set)

    def export_tags(self, path: str, label_set: str | None = None) -> int:
        """Export tags to .csv or .json; see tagging.export_tags (no encoder needed)."""
        if not self.options.allow_files:
            raise UsageError("tags cannot be written to a file on the server here: download them instead")
        return export_tags(self.catalog, path, label_set)

    def tags_document(self, fmt: str, label_set: str | None = None) -> str:
        """Tags as CSV or JSON text (what the UI offers for download), built in memory."""
        return tags_document(self.catalog, fmt, label_set)[0]


def build_service(config: Any, options: SearchOptions | None = None) -> SearchService:
    """Wire the real catalog, store and encoder for a config (the CLI, the UI and the API all call this)."""
    from clipsearch.indexer.app import build_encoder, open_parts
    from clipsearch.indexer.model.onnx_cache import labels_root

    parts = open_parts(config)  # label embeddings are shared by every library on the machine (labels_root)
    return SearchService(parts.catalog, parts.store, build_encoder(config, parts.catalog), cache_dir=config.cache_dir,
                         options=options or SearchOptions(), label_cache=labels_root(config.model_cache))
