"""Questions about a photo (issue 18): generated demo questions, the answerer, left/right from the explain
heatmap, and one-line errors that write nothing. bench/questions.py measures the bundled demo answerer."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageOps

from clipsearch.indexer.errors import BadImage, ModelUnavailable, PhotoNotFound, UsageError
from clipsearch.indexer.model.sample import SampleItem, render
from clipsearch.search.questions import (
    answerer_kind,
    ask,
    ask_ref,
    demo_questions,
    load_answerer,
    position_object,
    question_scores,
    reads_embeddings,
)

from .conftest import TINY
from .fakes import FakeEncoder, concept, populate


def test_demo_questions_have_the_right_answers() -> None:
    item = SampleItem("star", "red", "night sky", "small")
    rng = np.random.default_rng(0)
    for _ in range(20):
        qs = demo_questions(item, rng, side="left")
        got = {k: (q, a) for q, a, k in qs}
        assert [k for _, _, k in qs] == ["colour", "shape", "background", "size", "count", "yes/no", "position"]
        assert [got[k][1] for k in ("colour", "shape", "background", "size", "count", "position")] == \
            ["red", "star", "night sky", "small", "one", "left"]
        question, answer = got["yes/no"]
        asks_truth = all(w in ("is", "there", "a", "it", "the", "background", "red", "star", "night", "sky")
                         for w in question.rstrip("?").split())
        assert (answer == "yes") == asks_truth, question
    assert demo_questions(None, rng, count=2)[0][1:] == ("two", "count")
    assert all(k != "position" for _, _, k in demo_questions(item, rng))


def test_position_questions_name_their_object() -> None:
    assert position_object("Is the red star on the left or the right?") == "a red star"
    assert position_object("which side is the circle on, left or right?") == "a circle"
    assert position_object("what colour is the star?") is None
    assert question_scores(["Red", "no", "left"], ["red", "yes", "left"], ["colour", "yes/no", "position"]) == \
        {"overall": pytest.approx(2 / 3), "colour": 1.0, "yes/no": 0.0, "position": 1.0}


@pytest.fixture(scope="module")
def fake_answerer():
    """An answerer trained in seconds on the fake encoder's space (a photo's vector is its concept)."""
    from clipsearch.indexer.model.vqa import train_answerer

    things = [(c, s) for c in ("red", "green", "blue") for s in ("star", "circle", "square")]
    vecs, qs, ans = [], [], []
    for c, s in things * 4:
        for q, a in (("what colour is it?", c), ("what shape is it?", s)):
            vecs.append(concept(f"{c} {s}"))
            qs.append(q)
            ans.append(a)
    return train_answerer(np.stack(vecs), qs, ans, FakeEncoder.space.key, "fake", epochs=40, batch_size=16,
                          hidden=64)


def test_answerer_answers_from_the_embedding_and_survives_a_save(fake_answerer, tmp_path: Path) -> None:
    from clipsearch.indexer.model.vqa import Answerer

    loaded = Answerer.load(fake_answerer.save(tmp_path / "a"))
    for model in (fake_answerer, loaded):
        got = ask(FakeEncoder(), model, concept("blue circle"), "what shape is it?")
        assert (got.text, got.how) == ("circle", "answerer") and 0.5 < got.confidence <= 1.0
        assert ask(FakeEncoder(), model, concept("green star"), "What colour is it?").text == "green"


def test_asking_about_catalogued_photos_reads_only(fake_answerer, tmp_path: Path) -> None:
    cat, _ = populate(tmp_path, [("/p/missing.jpg", "red square", None)])
    sid = cat.ensure_space(FakeEncoder.space.key, "fake", "fake", 64)
    pid = next(iter(cat.embedded_ids(sid)))
    before = "\n".join(sqlite3.connect(tmp_path / "cat.db").iterdump())
    assert ask_ref(cat, sid, FakeEncoder(), fake_answerer, pid, "what colour is it?").text == "red"
    for ref, question, err in ((999, "what colour is it?", PhotoNotFound), (pid, " ", UsageError),
                               (pid, "is it on the left or the right?", BadImage),  # the file is gone
                               (b"junk", "what colour is it?", BadImage)):
        with pytest.raises(err) as caught:
            ask_ref(cat, sid, FakeEncoder(), fake_answerer, ref, question)
        assert "\n" not in str(caught.value)
    assert "\n".join(sqlite3.connect(tmp_path / "cat.db").iterdump()) == before


@pytest.mark.integration
def test_demo_answerer_and_left_right_from_the_heatmap() -> None:
    from clipsearch.indexer.model.factory import create_encoder

    demo = create_encoder("demo", "cpu", backend="torch")
    answerer = load_answerer("demo", demo)
    photo = render(SampleItem("star", "red", "grass", "small"), 300, 200, np.random.default_rng(4))
    mask = np.abs(np.asarray(photo, np.int16) - np.asarray(render(SampleItem("star", "black", "grass", "small"), 300,
                                                                  200, np.random.default_rng(4)), np.int16)) > 40
    left = mask.any(axis=-1).nonzero()[1].mean() < 150
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    vec = demo.encode_image_bytes(buf.getvalue())[0]
    assert ask(demo, answerer, vec, "what colour is the star?").text == "red"
    assert ask(demo, answerer, vec, "what shape is it?").text == "star"
    where = ask(demo, answerer, vec, "is the red star on the left or the right?", buf.getvalue())
    assert where.how == "heatmap" and where.text == ("left" if left else "right")
    mirrored = ask(demo, answerer, vec, "is the red star on the left or the right?", ImageOps.mirror(photo))
    assert mirrored.text == ("right" if left else "left")


def test_question_model_specs_give_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    from clipsearch.indexer.model import pixel_models
    from clipsearch.indexer.model.factory import create_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pixel_models, "has_transformers", lambda: False)
    tiny = create_encoder(TINY, "cpu", backend="torch")
    vilt = "vilt:dandelin/vilt-b32-finetuned-vqa"
    for spec, err in (("dandelin/vilt-b32-finetuned-vqa", UsageError), (str(tmp_path), UsageError),
                      (str(tmp_path / "gone"), UsageError), ("vilt:", UsageError), (vilt, ModelUnavailable),
                      ("demo", UsageError)):
        with pytest.raises(err) as caught:
            load_answerer(spec, tiny)
        assert "\n" not in str(caught.value), spec
    with pytest.raises(ModelUnavailable) as caught:
        load_answerer(vilt)
    line = str(caught.value)  # what to install, which weights, where, and the offline alternative
    assert "pip install transformers" in line and "hf download dandelin/vilt-b32-finetuned-vqa" in line
    assert "--answerer demo" in line
    assert answerer_kind(vilt) == ("vilt", "dandelin/vilt-b32-finetuned-vqa") and not reads_embeddings(vilt)
    assert reads_embeddings("demo")


class _PixelAnswerer:
    """Stands in for ViLT: reads the photo itself and says how wide it is."""

    reads = "pixels"

    def answer_images(self, images, questions):
        return [(f"{im.size[0]} wide", 0.9) for im in images]


def test_a_pixel_answerer_reads_the_photo_for_every_question(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    render(SampleItem("star", "red", "grass", "small"), 60, 40, np.random.default_rng(1)).save(path)
    cat, _ = populate(tmp_path, [(str(path), "red star", None), ("/p/missing.jpg", "red square", None)])
    for ref in (1, str(path), path.read_bytes()):
        got = ask_ref(cat, None, None, _PixelAnswerer(), ref, "is it on the left or the right?")
        assert (got.text, got.how) == ("60 wide", "answerer")
    for ref, err in ((2, BadImage), (999, PhotoNotFound), (b"junk", BadImage)):
        with pytest.raises(err):
            ask_ref(cat, None, None, _PixelAnswerer(), ref, "what is it?")
