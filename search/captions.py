"""Captions: what is in a photo, in words, kept in the catalog so that a library can be searched by them.

Two kinds of captioner, named by the same spec forms as the CLIP model:
  * ``demo`` or a trained captioner FOLDER (captioner.json): reads the photo's stored CLIP embedding, so a library
    is captioned without decoding a photo; it reads only the embedding space it was trained on;
  * ``demo-coca`` (the bundled small CoCa, offline), ``coca_ARCH:TAG`` (or any open_clip CoCa spec: ARCH:FILE, a
    model folder) and ``blip:NAME`` (transformers, a hub name or a folder): read the photo itself
    (indexer/model/pixel_models.py), any CLIP model in use.
`load_captioner` resolves a spec (one-line errors; a model not available offline says what to fetch and where);
`caption_photos` captions catalogued photos, `caption_image` a file or upload; `caption_library` generates
captions and stores them (indexer/storage/caption_store.py): every caption of a batch is generated before its one
transaction, so a failure leaves the catalog as it was. `caption_scores` is the issue-18 measurement (object and
colour named, BLEU-4). torch is reached only through the indexer's model modules, imported when a captioner loads.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import BadImage, ClipsearchError, ModelUnavailable, PhotoNotFound, UsageError
from clipsearch.indexer.ingest.decode import DecodeError, open_image
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.caption_store import CaptionStore
from clipsearch.indexer.storage.catalog import Catalog

from .explain import read_ref

log = logging.getLogger(__name__)

MAX_PIXELS = 100_000_000  # the decoder's bomb limit for photos read by pixel captioners
_OFFLINE = "the demo captioners work offline: --captioner demo (or demo-coca)"
_FORMS = ("use demo, demo-coca, a captioner folder, coca_ARCH:TAG (open_clip CoCa) or blip:NAME (transformers "
          "BLIP)")
_BUNDLED = {"demo": "demo_captioner", "demo-coca": "demo_coca"}  # spec -> folder beside the demo CLIP model


def _demo_folder(name: str = "demo_captioner") -> Path:
    """A bundled captioner folder, found through the installed indexer package (editable or wheel)."""
    import clipsearch.indexer.model as model_pkg

    return Path(model_pkg.__file__).parent / name


def captioner_kind(spec: str) -> tuple[str, str]:
    """(kind, what to load) for a captioner spec: ("embedding", folder), ("coca", open_clip spec) or ("blip", hub
    name or folder). Bad specs are one-line UsageErrors; nothing is loaded or fetched here."""
    spec = (spec or "").strip()
    if not spec:
        raise UsageError(f"the captioner spec is empty: {_FORMS}")
    if spec == "demo":
        return "embedding", str(_demo_folder())
    if spec == "demo-coca":
        return "coca", str(_demo_folder(_BUNDLED[spec]))
    if spec.startswith("blip:"):
        if not spec[5:].strip():
            raise UsageError("blip: needs a model name or folder, e.g. blip:Salesforce/blip-image-captioning-base")
        return "blip", spec[5:].strip()
    if os.path.isdir(spec):
        folder = Path(spec)
        for marker, kind in (("captioner.json", "embedding"), ("open_clip_config.json", "coca"),
                             ("config.json", "blip")):
            if (folder / marker).is_file():
                return kind, spec
        raise UsageError(f"captioner folder {spec} has no captioner.json (nor a CoCa open_clip_config.json, nor a "
                         "BLIP config.json)")
    arch, sep, weights = spec.partition(":")
    if sep and weights and (arch.lower().startswith("coca") or arch.endswith(".json")):
        return "coca", spec
    raise UsageError(f"unknown captioner '{spec}' (no such folder here): {_FORMS}")


def reads_embeddings(spec: str) -> bool:
    """True when the captioner reads stored CLIP embeddings (it needs the encoder's space), False for pixels."""
    return captioner_kind(spec)[0] == "embedding"


def captioner_label(spec: str) -> str:
    """The name stored with each caption: ``demo``, a folder's absolute path, or the registry spec; at most 255
    characters (a longer path keeps its end and a digest)."""
    kind, what = captioner_kind(spec)
    label = spec.strip() if spec.strip() in _BUNDLED or not os.path.isdir(spec) else str(Path(spec).resolve())
    if kind == "blip":
        label = "blip:" + (str(Path(what).resolve()) if os.path.isdir(what) else what)
    if len(label) > 255:
        label = hashlib.sha1(label.encode()).hexdigest()[:16] + ":" + label[-230:]
    return label


def load_captioner(spec: str, encoder: Any = None, device: str | None = None) -> Any:
    """A captioner for `spec`; one-line errors otherwise (see captioner_kind for the forms). An embedding
    captioner must read `encoder`'s space; pixel captioners ignore the encoder (it may be None) and load on
    `device` (None: the best available)."""
    kind, what = captioner_kind(spec)
    if spec.strip() == "demo-coca" and not (Path(what) / "open_clip_config.json").is_file():
        raise ModelUnavailable(f"the demo CoCa is missing from {what}: reinstall clipsearch or rebuild it with "
                               "`make demo-coca`")
    try:
        if kind == "coca":
            from clipsearch.indexer.model.pixel_models import CocaCaptioner

            return CocaCaptioner(what, device)
        if kind == "blip":
            from clipsearch.indexer.model.pixel_models import BlipCaptioner

            return BlipCaptioner(spec.strip(), what, device)
    except ModelUnavailable as e:
        raise ModelUnavailable(f"{e}; {_OFFLINE}") from e
    return _embedding_captioner(spec, Path(what), encoder)


def _embedding_captioner(spec: str, folder: Path, encoder: Any) -> Any:
    if not (folder / "captioner.json").is_file():
        raise ModelUnavailable(f"the demo captioner is missing from {folder}: reinstall clipsearch or rebuild it "
                               "with `python bench/captions.py --out <that folder>`")
    if encoder is None:
        raise UsageError(f"captioner '{spec}' reads CLIP embeddings: it needs the library's model")
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


def _reads_pixels(captioner: Any) -> bool:
    return getattr(captioner, "reads", "embeddings") == "pixels"


def _generate(what: str, run: Any, *args: Any) -> list[str]:
    """Run a captioner; its failure (out of memory, a broken model) is one line, and nothing has been stored."""
    try:
        return list(run(*args))
    except ClipsearchError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as e:
        raise ClipsearchError(f"captioning {what} failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); nothing was stored") from e


def caption_photos(catalog: Catalog, space_id: int | None, captioner: Any, ids: list[int] | None = None,
                   batch: int = 8192, skip_unreadable: bool = False) -> dict[int, str]:
    """Captions of catalogued photos: from their stored embeddings (every photo with a vector in the space when
    `ids` is None), or from their files for a pixel captioner (`ids` required). An id that is not an indexed photo
    (of this space) is a PhotoNotFound, raised before any caption is generated; an unreadable file a BadImage,
    unless `skip_unreadable` (then it is logged and left out)."""
    if ids is None:
        if _reads_pixels(captioner) or space_id is None:
            raise UsageError("caption_photos needs the photo ids for a captioner that reads pixels")
        ids = sorted(catalog.embedded_ids(space_id))
    else:
        rows = catalog.photos_by_id(list(ids))
        missing = [i for i in ids if i not in rows or rows[i]["status"] != PhotoStatus.INDEXED]
        if missing:
            raise PhotoNotFound(f"no indexed photo with id {missing[0]}")
    if _reads_pixels(captioner):
        return _caption_files(catalog, captioner, list(ids), min(batch, 16), skip_unreadable)
    out: dict[int, str] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        vecs = catalog.vectors_for(space_id, chunk) if space_id is not None else {}
        lost = [i for i in chunk if i not in vecs]
        if lost:
            raise PhotoNotFound(f"photo #{lost[0]} has no embedding for this model (run `clipsearch index`)")
        texts = _generate(f"{len(chunk)} photos", captioner.caption_vectors, np.stack([vecs[i] for i in chunk]))
        out.update(zip(chunk, texts, strict=True))
    return out


def _caption_files(catalog: Catalog, captioner: Any, ids: list[int], batch: int,
                   skip_unreadable: bool) -> dict[int, str]:
    out: dict[int, str] = {}
    for start in range(0, len(ids), batch):
        kept, images = [], []
        for i in ids[start : start + batch]:
            try:
                images.append(_open(read_ref(catalog, i, True), f"photo #{i}"))
                kept.append(i)
            except BadImage as e:
                if not skip_unreadable:
                    raise
                log.warning("%s: not captioned", e)
        out.update(zip(kept, _generate(f"{len(kept)} photos", captioner.caption_images, images), strict=True))
    return out


def _open(data: bytes, what: str) -> Any:
    try:
        return open_image(data, MAX_PIXELS)[0]
    except DecodeError as e:
        raise BadImage(f"cannot caption {what}: {e.reason}") from e


def caption_image(encoder: Any, captioner: Any, data: bytes) -> str:
    """Caption of one image file's bytes (decoded safely; a bad image is a one-line BadImage)."""
    if _reads_pixels(captioner):
        return _generate("the image", captioner.caption_images, [_open(data, "this image")])[0]
    return _generate("the image", captioner.caption_vectors, encoder.encode_image_bytes(data))[0]


def catalogued_id(catalog: Catalog, path: str) -> int | None:
    """The id of the indexed photo at `path` (as the indexer recorded it, an absolute path), else None."""
    full = os.fsencode(os.path.abspath(path))
    known = catalog.known_files(under=[os.path.dirname(full)]).get(full)
    return known.id if known is not None and known.status == PhotoStatus.INDEXED else None


def caption_library(catalog: Catalog, captioner: Any, label: str, space_id: int | None = None,
                    ids: list[int] | None = None, redo: bool = False, batch: int | None = None) -> dict[int, str]:
    """Generate and store captions; returns what was generated. Named `ids`: all generated, then stored in one
    transaction. Otherwise (`caption --all`) the indexed photos without a caption from `label` for their current
    content (all of them with `redo`), a batch at a time: each batch is generated whole, then stored in one
    transaction, so an interruption keeps finished batches and a failure writes nothing of its batch. Unreadable
    files are skipped there (logged), and an embedding captioner takes the photos with a vector in `space_id`."""
    store = CaptionStore(catalog)
    if ids is not None:
        found = caption_photos(catalog, space_id, captioner, ids)
        store.put(found, label)
        return found
    todo = store.photos_needing(label, redo)
    pixels = _reads_pixels(captioner)
    if not pixels:
        if space_id is None:
            raise UsageError("captioning from embeddings needs the library's model")
        todo = sorted(catalog.embedded_ids(space_id, among=todo))
    batch = batch or (64 if pixels else 8192)
    out: dict[int, str] = {}
    for start in range(0, len(todo), batch):
        found = caption_photos(catalog, space_id, captioner, todo[start : start + batch], skip_unreadable=True)
        store.put(found, label)
        out.update(found)
        log.info("captioned %d of %d photos", min(start + batch, len(todo)), len(todo))
    return out


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
