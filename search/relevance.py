"""Calibrated relevance: is this photo a strong, possible or weak match for this text query?

Raw cosine scores and per-query z-scores cannot say it: measured on the demo library, queries about absent things
("a dolphin", "a blue truck") reach the same scores as the true matches of present classes. What does work is a
per-photo contrast: a photo is a strong match when the query explains it better than the query's own
*contradictions*. The model's reference vocabulary (shipped with the model, see `ReferenceVocab`) is a set of groups
of mutually exclusive alternatives (shapes, colours, scenes, objects, ...). Every alternative of a group entry the
query names gives a contrast, the query with that entry swapped ("a red circle" → "a blue circle", "a red star"),
and

    P(query | photo) = softmax over {query} ∪ contrasts of (logit_scale · cosine)

is compared with the vocabulary's thresholds (strong ≥ 0.5, possible ≥ 0.2 by default). Contrasts are
contradictions only: a photo of a red circle on grass must not count against "a circle" because "grass" also fits
it (that is why a contrast against a whole vocabulary loses recall). The model's own temperature (logit_scale)
makes the probability comparable across models: an untrained model, whose texts all look alike, gives every
contrast the same probability and so no strong match.

A query naming no group entry is contrasted with every entry of the vocabulary instead. A model trained on a
closed vocabulary (the demo model) cannot know other words: "a giraffe" is embedded from untrained token vectors
and lands near whatever the known words of the query say. For such a vocabulary a query with unknown words is at
most "possible", and the unknown words are reported, so the UI can say which words the model does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.errors import UsageError

from .text_cache import TextVectors

STRONG, POSSIBLE, WEAK = "strong", "possible", "weak"
LEVELS = (STRONG, POSSIBLE, WEAK)
VOCAB_FILE = "reference_vocab.txt"  # looked up in a model folder; else the general one below
GENERAL_VOCAB = Path(__file__).parent / "data" / VOCAB_FILE
# Words that carry no content of their own: never contrasted, never "unknown" to a closed vocabulary.
STOP_WORDS = frozenset(
    "a an the of on in at with and or to by from for near over under its this that some there is are photo photos "
    "picture pictures image images shot".split())
_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)


def content_words(text: str) -> list[str]:
    """Lower-cased words of a text without stop words (any script: a word the vocabulary lacks is reported)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


@dataclass(frozen=True)
class ReferenceVocab:
    """A model's reference vocabulary and its thresholds (parsed from reference_vocab.txt)."""

    groups: dict[str, tuple[str, ...]]  # group name → mutually exclusive alternatives (lower case)
    closed: bool = False  # the model was trained on these words only: other words cannot be checked
    known: frozenset[str] = frozenset()  # words a closed vocabulary knows besides its entries ("photo", ...)
    strong: float = 0.5  # P(query | photo) against its contrasts from which a photo is a strong match
    possible: float = 0.2  # ... and a possible one
    fallback_template: str = "{}"  # how entries are phrased when a query names none of them
    max_alternatives: int = 32  # contrasts per group, the alternatives most like the best candidates
    examples: tuple[str, ...] = ()  # query patterns for suggested queries, e.g. "a {colour} {shape}"
    source: str = ""  # where it was read from (shown by `eval` and in the UI's help)

    @property
    def known_words(self) -> frozenset[str]:
        """Every word a closed vocabulary knows."""
        return self.known | {w for entries in self.groups.values() for e in entries for w in content_words(e)}

    def entries(self) -> list[str]:
        """All entries, each once, in file order."""
        return list(dict.fromkeys(e for entries in self.groups.values() for e in entries))


def parse_vocab(text: str, source: str = "") -> ReferenceVocab:
    """Read the vocabulary format: ``[group]`` headers, one entry per line, ``#`` comments, and settings
    ``@closed``, ``@known WORD...``, ``@strong P``, ``@possible P``, ``@fallback TEMPLATE``, ``@alternatives N``,
    ``@examples PATTERN|PATTERN`` (suggested queries, ``{group}`` filled from the library)."""
    groups: dict[str, list[str]] = {}
    settings: dict[str, Any] = {}
    current: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            key, _, value = line[1:].partition(" ")
            settings[key] = value.strip()
        elif line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            groups.setdefault(current, [])
        elif current is None:
            raise UsageError(f"{source}:{n}: an entry before any [group] header")
        else:
            groups[current].append(line.lower())
    try:
        return ReferenceVocab(
            {g: tuple(dict.fromkeys(e)) for g, e in groups.items() if e}, closed="closed" in settings,
            known=frozenset(settings.get("known", "").lower().split()),
            strong=float(settings.get("strong", 0.5)), possible=float(settings.get("possible", 0.2)),
            fallback_template=settings.get("fallback", "{}"), max_alternatives=int(settings.get("alternatives", 32)),
            examples=tuple(p.strip() for p in settings.get("examples", "").split("|") if p.strip()), source=source)
    except ValueError as e:
        raise UsageError(f"{source}: bad setting: {e}") from e


@lru_cache(maxsize=8)
def load_vocab(path: Path) -> ReferenceVocab:
    """A vocabulary file, parsed once per process."""
    return parse_vocab(path.read_text(encoding="utf-8"), str(path))


def vocab_for(encoder: Any) -> ReferenceVocab:
    """The encoder's model folder's own vocabulary if it ships one, else the general one (ImageNet, COCO, scenes)."""
    folder = getattr(encoder, "folder", None)
    own = Path(folder) / VOCAB_FILE if folder else None
    return load_vocab(own if own and own.is_file() else GENERAL_VOCAB)


def warm_vocabulary(encoder: Any, cache_dir: Path) -> int:
    """Embed the model's reference vocabulary into the shared label cache now (what `clipsearch index` does after
    a run that loaded the model), so that the first query on this machine does not pay for it (~6 s for the
    general vocabulary's 1,100 entries with ViT-B-32 on 2 CPU cores). Returns the entries newly embedded."""
    from .zeroshot import LabelVectors

    labels, vocab, done = LabelVectors(encoder, cache_dir), vocab_for(encoder), 0
    for entries in vocab.groups.values():
        if len(entries) > vocab.max_alternatives and not labels.on_disk(list(entries), None):
            labels(list(entries), None)
            done += len(entries)
    return done


@dataclass(frozen=True)
class QueryPlan:
    """How one query is checked: the entries it names, the words the vocabulary lacks, its contrasts."""

    query: str
    named: dict[str, str]  # group → the entry of that group the query names
    unknown: tuple[str, ...] = ()  # content words a closed vocabulary does not know
    contrasts: list[str] = field(default_factory=list)  # texts that contradict the query (or all entries)
    fallback: bool = False  # no entry named: contrasted with the whole vocabulary

    @property
    def checkable(self) -> bool:
        """Whether the query has anything the model can check (else every photo is weak)."""
        return bool(self.named) or any(w not in self.unknown for w in content_words(self.query))

    def note(self) -> str | None:
        """A sentence for the user when the labels are limited, else None."""
        if not self.unknown:
            return None
        words = ", ".join(f"'{w}'" for w in self.unknown[:8])
        if not self.checkable:
            return f"The model does not know {words}: no result can be a strong match."
        return f"The model does not know {words}: results match the rest of the query at best (possible)."


def _find(query: str, entry: str) -> re.Match[str] | None:
    return re.search(rf"(?<![^\W_]){re.escape(entry)}(?![^\W_])", query, re.IGNORECASE)


def named_entries(query: str, vocab: ReferenceVocab) -> dict[str, tuple[str, re.Match[str]]]:
    """group → (entry, where) for each group one of whose entries the query names (the longest one)."""
    out, lowered = {}, query.lower()
    for group, entries in vocab.groups.items():
        for entry in sorted(entries, key=len, reverse=True):
            m = _find(query, entry) if entry.lower() in lowered else None  # no regex for the ~1,000 absent ones
            if m:
                out[group] = (entry, m)
                break
    return out


def _entails(text: str, query_words: set[str]) -> bool:
    """A contrast that says everything the query says (a refinement, "a tabby cat" for "a cat") is no contrast."""
    return bool(query_words) and query_words <= set(content_words(text))


class Relevance:
    """Strong / possible / weak labels for text queries, calibrated per model by its reference vocabulary.

    It receives the encoder (texts and logit scale), the vocabulary, and a label-vector cache (entries are
    embedded once per process, and on disk for large vocabularies)."""

    def __init__(self, encoder: Any, vocab: ReferenceVocab, label_vectors: Any,
                 text_vectors: TextVectors | None = None) -> None:
        self.encoder, self.vocab, self.label_vectors = encoder, vocab, label_vectors
        self.text_vectors = text_vectors or TextVectors(encoder)  # contrast texts, kept across queries

    def plan(self, query: str, candidates: np.ndarray | None = None) -> QueryPlan:
        """The contrasts of a query. For large groups only the alternatives that score best on `candidates` (the
        query's best photos, (N, D)) are used: the others cannot win the softmax on those photos anyway."""
        query = " ".join(query.split())
        words = content_words(query)
        unknown = tuple(dict.fromkeys(w for w in words if w not in self.vocab.known_words)) \
            if self.vocab.closed else ()
        named = named_entries(query, self.vocab)
        qwords = set(words)
        if not named:
            contrasts = [self.vocab.fallback_template.format(e) for e in self.vocab.entries()]
            contrasts = [c for c in contrasts if not _entails(c, qwords)]
            return QueryPlan(query, {}, unknown, contrasts, fallback=True)
        contrasts: list[str] = []
        for group, (entry, m) in named.items():
            for alt in self._alternatives(group, entry, candidates):
                text = query[: m.start()] + alt + query[m.end():]
                if not _entails(text, qwords):
                    contrasts.append(text)
        return QueryPlan(query, {g: e for g, (e, _) in named.items()}, unknown, list(dict.fromkeys(contrasts)))

    def _alternatives(self, group: str, entry: str, candidates: np.ndarray | None) -> list[str]:
        entries = list(self.vocab.groups[group])
        keep = [i for i, e in enumerate(entries) if e != entry]
        alts = [entries[i] for i in keep]
        k = self.vocab.max_alternatives
        if len(alts) <= k or candidates is None or not len(candidates):
            return alts if len(alts) <= k else alts[:k]
        vecs = self.label_vectors(entries, None)[keep]  # the whole group, embedded once for every entry it names
        best = (candidates @ vecs.T).max(axis=0)
        return [alts[i] for i in np.argsort(-best)[:k]]

    def probabilities(self, plan: QueryPlan, qvec: np.ndarray, photos: np.ndarray) -> np.ndarray:
        """P(query | photo) against the plan's contrasts for each row of `photos` (N, D)."""
        if not len(photos):
            return np.zeros(0, np.float32)
        if not plan.contrasts:
            return np.ones(len(photos), np.float32)
        cvecs = self._contrast_vectors(plan)
        scale = np.float32(self.encoder.logit_scale)
        logits = scale * np.concatenate([(photos @ qvec)[:, None], photos @ cvecs.T], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        return (logits[:, 0] / logits.sum(axis=1)).astype(np.float32)

    def _contrast_vectors(self, plan: QueryPlan) -> np.ndarray:
        """The whole vocabulary is embedded once (cached, on disk when large) and subset for a fallback plan;
        a query's own contrasts go through the process's text cache (related queries share most of them)."""
        if not plan.fallback:
            return self.text_vectors(plan.contrasts)
        texts = [self.vocab.fallback_template.format(e) for e in self.vocab.entries()]
        row = {t: i for i, t in enumerate(texts)}
        return self.label_vectors(texts, None)[[row[c] for c in plan.contrasts]]

    def labels(self, plan: QueryPlan, probs: np.ndarray) -> list[str]:
        """strong / possible / weak per probability; a query with unknown words is at most possible."""
        if not plan.checkable:
            return [WEAK] * len(probs)
        top = POSSIBLE if plan.unknown else STRONG
        out = []
        for p in probs.tolist():
            level = STRONG if p >= self.vocab.strong else POSSIBLE if p >= self.vocab.possible else WEAK
            out.append(POSSIBLE if level == STRONG and top == POSSIBLE else level)
        return out

    def label_photos(self, query: str, qvec: np.ndarray, photos: np.ndarray,
                     n_candidates: int = 64) -> tuple[QueryPlan, np.ndarray, list[str]]:
        """Plan, probabilities and labels for photos given best first (the first ones prune large groups)."""
        plan = self.plan(query, photos[:n_candidates])
        probs = self.probabilities(plan, qvec, photos)
        return plan, probs, self.labels(plan, probs)


def robust_location_scale(scores: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based sigma of a query's similarity to the library: the matching minority (what the user is
    looking for) does not inflate them, so z-scores and the strong cutoff stay meaningful in small libraries."""
    if len(scores) == 0:
        return 0.0, 1.0
    med = float(np.median(scores))
    mad = float(np.median(np.abs(scores - med))) * 1.4826
    return med, max(mad, float(scores.std()) * 0.1, 1e-6)


def suggest_queries(relevance: Relevance, sample: np.ndarray, n: int = 6) -> list[str]:
    """Example queries that have strong matches in a library, from a sample of its vectors: each photo's best entry
    per group fills the vocabulary's example patterns; the most frequent fillings that the calibration itself
    labels strong for at least two sampled photos (one when the sample is small) are kept."""
    vocab = relevance.vocab
    if not len(sample) or not vocab.examples:
        return []
    best = {g: [e[i] for i in (sample @ relevance.label_vectors(list(e), None).T).argmax(axis=1)]
            for g, e in vocab.groups.items()}
    counts: dict[str, int] = {}
    for row in range(len(sample)):
        for pattern in vocab.examples:
            try:
                q = pattern.format(**{g: best[g][row] for g in best})
            except (KeyError, IndexError):
                continue
            counts[q] = counts.get(q, 0) + 1
    need = 2 if len(sample) >= 50 else 1
    out: list[str] = []
    ranked = sorted(counts, key=lambda q: (-counts[q], q))[: n * 3]
    for q, qvec in zip(ranked, relevance.encoder.encode_texts(ranked) if ranked else [], strict=True):
        order = np.argsort(-(sample @ qvec))[:256]
        _, _, labels = relevance.label_photos(q, qvec, sample[order])
        if labels.count(STRONG) >= need:
            out.append(q)
        if len(out) == n:
            break
    return out
