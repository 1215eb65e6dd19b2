"""Calibrated relevance (search/relevance.py): what a user sees as strong / possible / weak, with the fake encoder
(every word a fixed direction, photos built from words) and with the bundled demo model on a generated library."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.indexer.errors import UsageError
from clipsearch.search.relevance import (
    GENERAL_VOCAB,
    POSSIBLE,
    STRONG,
    WEAK,
    Relevance,
    load_vocab,
    parse_vocab,
    suggest_queries,
    vocab_for,
)
from clipsearch.search.zeroshot import LabelVectors

from .fakes import FakeEncoder, concept

CLOSED = """
@closed
@strong 0.5
@possible 0.2
@examples a {colour} {shape}
[shape]
circle
star
square
[colour]
red
blue
green
"""


def relevance(text: str = CLOSED) -> Relevance:
    enc = FakeEncoder()
    return Relevance(enc, parse_vocab(text, "test"), LabelVectors(enc))


def labels_for(rel: Relevance, query: str, photos: list[str]) -> list[str]:
    vecs = np.stack([concept(p) for p in photos])
    return rel.label_photos(query, concept(query), vecs)[2]


def test_a_photo_is_strong_when_the_query_beats_its_contradictions() -> None:
    rel = relevance()
    assert labels_for(rel, "a red circle", ["red circle", "blue circle", "red star", "green square"]) == \
        [STRONG, WEAK, WEAK, WEAK]
    # what the query does not say never counts against it: every circle is a strong "circle", whatever its colour
    assert labels_for(rel, "a circle", ["red circle", "blue circle", "red star"]) == [STRONG, STRONG, WEAK]


def test_unknown_words_cap_the_label_and_are_named() -> None:
    rel = relevance()
    plan = rel.plan("a red giraffe")
    assert plan.unknown == ("giraffe",) and "'giraffe'" in plan.note()
    assert labels_for(rel, "a red giraffe", ["red circle", "blue star"]) == [POSSIBLE, WEAK]
    nonsense = rel.plan("xkq zvbt")
    assert not nonsense.checkable and "no result can be a strong match" in nonsense.note()
    assert labels_for(rel, "xkq zvbt", ["red circle"]) == [WEAK]
    assert labels_for(rel, "一只猫", ["red circle"]) == [WEAK]  # another script: unknown words too


def test_an_open_vocabulary_never_refuses_words() -> None:
    rel = relevance(CLOSED.replace("@closed", ""))
    assert rel.plan("a red giraffe").unknown == ()
    assert labels_for(rel, "a red giraffe", ["red giraffe", "blue giraffe"])[1] == WEAK


def test_refinements_of_the_query_are_not_contrasts() -> None:
    rel = relevance("[object]\ncat\ntabby cat\ndog\n")
    plan = rel.plan("a cat")
    assert plan.named == {"object": "cat"} and plan.contrasts == ["a dog"]


def test_a_query_naming_no_entry_is_contrasted_with_the_whole_vocabulary() -> None:
    rel = relevance(CLOSED.replace("@closed", ""))
    plan = rel.plan("a sunset")
    assert plan.fallback and len(plan.contrasts) == 6
    assert labels_for(rel, "a sunset", ["sunset", "red circle"]) == [STRONG, WEAK]


def test_vocabulary_files_and_settings() -> None:
    v = parse_vocab(CLOSED, "x")
    assert v.closed and v.strong == 0.5 and v.groups["colour"] == ("red", "blue", "green")
    assert v.examples == ("a {colour} {shape}",)
    with pytest.raises(UsageError):
        parse_vocab("circle\n", "bad")
    with pytest.raises(UsageError):
        parse_vocab("@strong high\n[a]\nb\n", "bad")
    general = load_vocab(GENERAL_VOCAB)
    assert not general.closed and {"object", "scene", "colour"} <= set(general.groups)
    assert len(general.groups["object"]) > 1000 and "beach" not in general.groups["object"]
    assert vocab_for(FakeEncoder()) is general  # a model without its own vocabulary gets the general one


def test_suggested_queries_have_strong_matches() -> None:
    rel = relevance()
    sample = np.stack([concept(p) for p in ["red circle"] * 3 + ["blue star"] * 2 + ["green square"]])
    assert suggest_queries(rel, sample, 2) == ["a red circle", "a blue star"]


@pytest.mark.integration
def test_demo_model_strong_hits_on_a_generated_library(tmp_path) -> None:
    """The shipped calibration of the demo model, on a seed used neither for training it nor for its thresholds:
    class queries find their photos as strong matches, absent things get none (bench/RESULTS.md has the full
    600-photo figures)."""
    from clipsearch.indexer.model.factory import create_encoder
    from clipsearch.indexer.model.sample import make_sample
    from clipsearch.search.evaluate import evaluate

    make_sample(tmp_path / "lib", 120, seed=4242)
    encoder = create_encoder("demo", "cpu")
    assert vocab_for(encoder).closed
    rel = evaluate(tmp_path / "lib", encoder)["relevance"]
    assert rel["present"]["precision"] >= 0.9 and rel["present"]["recall"] >= 0.8, rel["present"]
    assert rel["absent"]["strong"] <= 1, rel["absent"]
