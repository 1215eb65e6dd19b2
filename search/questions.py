"""Questions about a photo: "what colour is the star?", "how many shapes are there?", "is it on the left?".

Most questions are answered by the answerer model (indexer/model/vqa.py) from the photo's CLIP embedding, stored
for catalogued photos, so nothing is decoded. Position questions (left or right) are not: a pooled embedding
barely keeps where things are (the demo model was even trained with flipped photos), so they are answered from
where the "why did it match" heatmap (search/explain.py) peaks for the object the question names. A ViLT model
(``vilt:NAME`` through transformers, for users who have its weights; indexer/model/pixel_models.py) reads the
photo itself instead and answers every kind of question.
`demo_questions` writes the generated questions the demo answerer is trained and measured on. Nothing here writes
to the catalog. torch is reached only through the indexer's model modules, imported when first used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import BadImage, ModelUnavailable, PhotoNotFound, UsageError
from clipsearch.indexer.ingest.decode import DecodeError, open_image
from clipsearch.indexer.model.sample import BACKGROUNDS, COLOURS, SHAPES
from clipsearch.indexer.storage.catalog import Catalog

from .explain import explain, read_ref

_POSITION = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_NOT_OBJECT = {"is", "the", "it", "on", "in", "at", "to", "left", "right", "or", "which", "side", "of", "photo",
               "image", "picture", "this", "a", "an", "where", "half"}


@dataclass(frozen=True)
class Answer:
    """An answer to one question about one photo."""

    question: str  # as asked
    text: str  # the answer: a word such as "red", "star", "yes", "two", "left"
    confidence: float  # the model's probability, or for position answers how far off-centre the heatmap peaks
    how: str  # "answerer" (from the embedding) or "heatmap" (position, from explain)


_FORMS = ("use demo, a trained answerer folder, or vilt:NAME (transformers ViLT, e.g. "
          "vilt:dandelin/vilt-b32-finetuned-vqa)")


def answerer_kind(spec: str) -> tuple[str, str]:
    """("embedding", folder) for ``demo`` or a trained answerer folder (answerer.json), ("vilt", hub name or
    folder) for ``vilt:NAME`` or a folder of a transformers ViLT model (config.json); one-line UsageError
    otherwise. Nothing is loaded or fetched here."""
    spec = (spec or "").strip()
    if not spec:
        raise UsageError(f"the question model spec is empty: {_FORMS}")
    if spec == "demo":
        import clipsearch.indexer.model as model_pkg

        return "embedding", str(Path(model_pkg.__file__).parent / "demo_answerer")
    if spec.startswith("vilt:"):
        if not spec[5:].strip():
            raise UsageError("vilt: needs a model name or folder, e.g. vilt:dandelin/vilt-b32-finetuned-vqa")
        return "vilt", spec[5:].strip()
    if os.path.isdir(spec):
        if (Path(spec) / "answerer.json").is_file():
            return "embedding", spec
        if (Path(spec) / "config.json").is_file():
            return "vilt", spec
        raise UsageError(f"answerer folder {spec} has no answerer.json (nor a ViLT config.json)")
    raise UsageError(f"unknown question model '{spec}' (no such folder here): {_FORMS}")


def reads_embeddings(spec: str) -> bool:
    """True when the answerer reads stored CLIP embeddings (it needs the encoder's space), False for pixels."""
    return answerer_kind(spec)[0] == "embedding"


def load_answerer(spec: str, encoder: Any = None, device: str | None = None) -> Any:
    """An answerer for `spec` (see answerer_kind), one-line errors otherwise. An embedding answerer must read
    `encoder`'s space; ViLT reads the photo (the encoder may be None) and, when its weights are not here, the error
    names what to install and fetch."""
    kind, what = answerer_kind(spec)
    if kind == "vilt":
        from clipsearch.indexer.model.pixel_models import ViltAnswerer

        try:
            return ViltAnswerer(spec.strip(), what, device)
        except ModelUnavailable as e:
            raise ModelUnavailable(f"{e}; the demo answerer works offline: --answerer demo") from e
    folder = Path(what)
    if not (folder / "answerer.json").is_file():
        raise ModelUnavailable(f"the demo answerer is missing from {folder}: reinstall clipsearch or rebuild it "
                               "with `python bench/questions.py --out <that folder>`")
    if encoder is None:
        raise UsageError(f"question model '{spec}' reads CLIP embeddings: it needs the library's model")
    from clipsearch.indexer.model.vqa import Answerer

    answerer = Answerer.load(folder)
    if answerer.config.space_key != encoder.space.key:
        label = answerer.config.space_label
        raise UsageError(f"question model '{spec}' reads embeddings of {label}, not of {encoder.space.label} (the "
                         f"model in use): use --model {'demo' if label.startswith('demo:') else label}")
    return answerer


def _reads_pixels(answerer: Any) -> bool:
    return getattr(answerer, "reads", "embeddings") == "pixels"


def position_object(question: str) -> str | None:
    """For a left/right question, the object it names as a search text ("a red star"); None for other questions."""
    if not _POSITION.search(question):
        return None
    rest = [w for w in re.findall(r"[a-z]+", question.lower()) if w not in _NOT_OBJECT]
    return "a " + " ".join(rest) if rest else "a shape"


def ask(encoder: Any, answerer: Any, vector: np.ndarray, question: str, image: Any = None) -> Answer:
    """Answer `question` about a photo given its embedding (and its image, bytes or PIL, for position questions)."""
    question = (question or "").strip()
    if not question:
        raise UsageError("the question is empty")
    if _reads_pixels(answerer):
        if image is None:
            raise UsageError("this question model reads the photo itself, not its embedding")
        text, prob = answerer.answer_images([_as_image(image)], [question])[0]
        return Answer(question, text, prob, "answerer")
    target = position_object(question)
    if target is not None:
        if image is None:
            raise UsageError("a left/right question needs the photo itself, not only its embedding")
        heat = explain(encoder, image, target)
        if heat.peak is None:
            return Answer(question, "unknown", 0.0, "heatmap")
        offset = heat.peak[0] / max(1, heat.size[0] - 1) - 0.5
        return Answer(question, "left" if offset < 0 else "right", min(1.0, abs(offset) * 2), "heatmap")
    text, prob = answerer.answer(np.asarray(vector, np.float32)[None], [question])[0]
    return Answer(question, text, prob, "answerer")


def _as_image(image: Any) -> Any:
    """An upright RGB PIL image from bytes (decoded safely: a bad image is a one-line BadImage) or a PIL image."""
    if not isinstance(image, bytes | bytearray):
        return image.convert("RGB") if image.mode != "RGB" else image
    try:
        return open_image(bytes(image), 100_000_000)[0]
    except DecodeError as e:
        raise BadImage(f"cannot use this image: {e.reason}") from e


def ask_ref(catalog: Catalog, space_id: int | None, encoder: Any, answerer: Any, ref: int | str | bytes,
            question: str, allow_files: bool = True) -> Answer:
    """`ask` about a catalogued photo id (its stored embedding, or its file for a ViLT model), an image file (where
    `allow_files`) or uploaded bytes. An unknown id is a one-line PhotoNotFound, an unreadable image a BadImage;
    the catalog is only read."""
    if _reads_pixels(answerer):  # ViLT: the photo itself, for every question
        return ask(encoder, answerer, None, question, read_ref(catalog, ref, allow_files))
    needs_image = position_object(question or "") is not None
    if isinstance(ref, int):
        vec = catalog.vectors_for(space_id, [ref]).get(ref)
        if vec is None:
            raise PhotoNotFound(f"no indexed photo with id {ref} for this model")
        data = read_ref(catalog, ref, allow_files) if needs_image else None
    else:
        data = read_ref(catalog, ref, allow_files)
        vec = encoder.encode_image_bytes(data)[0]
    return ask(encoder, answerer, vec, question, data)


def demo_questions(item: Any, rng: np.random.Generator, side: str | None = None,
                   count: int = 1) -> list[tuple[str, str, str]]:
    """(question, answer, kind) about a sample-library photo of `item` (a SampleItem): colour, shape, background,
    size, yes/no and count; position too when `side` ("left"/"right") is known. A photo of `count` == 2 shapes
    (two composed renders) gets only the count question: the others would be ambiguous."""
    if count != 1:
        return [(str(rng.choice(["how many shapes are there?", "how many objects are in the photo?"])), "two",
                 "count")]
    c, s, b, z = item.colour, item.shape, item.background, item.size
    pick = lambda options: str(rng.choice(options))  # noqa: E731 - one seeded choice among phrasings
    out = [
        (pick([f"what colour is the {s}?", "what color is the shape?", "which colour is it?"]), c, "colour"),
        (pick(["what shape is it?", f"what is the {c} shape?", "which shape is in the photo?"]), s, "shape"),
        (pick(["what is the background?", f"what is the {s} on?", f"what is behind the {s}?"]), b, "background"),
        (pick([f"is the {s} large or small?", f"how big is the {s}?", "is the shape small or large?"]), z, "size"),
        (pick(["how many shapes are there?", "how many objects are in the photo?"]), "one", "count"),
        _yes_no(item, rng),
    ]
    if side is not None:
        out.append((pick([f"is the {c} {s} on the left or the right?", f"which side is the {s} on, left or right?"]),
                    side, "position"))
    return out


def _yes_no(item: Any, rng: np.random.Generator) -> tuple[str, str, str]:
    """A yes/no question, true half the time; a false one changes the colour, shape or background asked about."""
    truth = bool(rng.random() < 0.5)
    c, s, b = item.colour, item.shape, item.background
    kind = int(rng.integers(4))
    if not truth:
        if kind in (0, 1):
            c = str(rng.choice([x for x in COLOURS if x != c]))
        if kind in (0, 2):
            s = str(rng.choice([x for x in SHAPES if x != s]))
        if kind == 3:
            b = str(rng.choice([x for x in BACKGROUNDS if x != b]))
    question = [f"is there a {c} {s}?", f"is the {item.shape} {c}?", f"is it a {s}?",
                f"is the background {b}?"][kind]
    return question, "yes" if truth else "no", "yes/no"


def question_scores(predicted: list[str], truth: list[str], kinds: list[str]) -> dict[str, float]:
    """Answer accuracy overall and per question kind (exact, case-insensitive)."""
    if not (len(predicted) == len(truth) == len(kinds)) or not truth:
        raise UsageError("question_scores needs one prediction per known answer")
    right = [p.strip().lower() == t.strip().lower() for p, t in zip(predicted, truth, strict=True)]
    out = {"overall": float(np.mean(right))}
    for kind in dict.fromkeys(kinds):
        out[kind] = float(np.mean([r for r, k in zip(right, kinds, strict=True) if k == kind]))
    return out
