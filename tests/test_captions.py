"""Captions (issue 18): the embedding-conditioned captioner, its loading rules, captioning catalogued photos from
their stored vectors, and the measurement (object + colour named, BLEU-4). bench/captions.py measures the bundled
demo captioner on a held-out make-sample seed."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.errors import ModelUnavailable, PhotoNotFound, UsageError
from clipsearch.indexer.model.sample import SampleItem, render
from clipsearch.search.captions import caption_image, caption_photos, caption_scores, corpus_bleu, load_captioner

from .conftest import TINY
from .fakes import FakeEncoder, concept, populate


def test_bleu_and_attribute_scores() -> None:
    assert corpus_bleu(["a small red star on grass"], ["a small red star on grass"]) == pytest.approx(1.0)
    assert corpus_bleu(["blue circle"], ["a small red star on grass"]) == 0.0
    item = SampleItem("star", "red", "night sky", "small")
    s = caption_scores(["a small red star on night sky", "a small blue star on night sky"], [item, item])
    assert s.object_and_colour == 0.5 and s.per_word == {"shape": 1.0, "colour": 0.5, "background": 1.0, "size": 1.0}
    assert 0.0 < s.bleu4 < 1.0
    with pytest.raises(UsageError):
        caption_scores(["a"], [])


@pytest.fixture(scope="module")
def fake_captioner():
    """A captioner trained in seconds on the fake encoder's space: each photo's vector is its caption's concept."""
    from clipsearch.indexer.model.captioner import train_captioner

    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "black") for s in ("star", "circle", "square")]
    vecs = np.stack([concept(t) for t in texts])
    return train_captioner(np.tile(vecs, (8, 1)), texts * 8, FakeEncoder.space.key, "fake", epochs=30,
                           batch_size=16, hidden=64)


def test_captioner_learns_and_survives_a_save(fake_captioner, tmp_path: Path) -> None:
    from clipsearch.indexer.model.captioner import Captioner

    texts = ["a blue square", "a red circle", "a black star"]
    assert fake_captioner.caption_vectors(np.stack([concept(t) for t in texts])) == texts
    loaded = Captioner.load(fake_captioner.save(tmp_path / "cap"))
    assert loaded.caption_vectors(np.stack([concept(t) for t in texts])) == texts
    with pytest.raises(UsageError, match="64-d"):
        loaded.caption_vectors(np.zeros((1, 3), np.float32))


def test_captions_of_catalogued_photos_come_from_stored_vectors(fake_captioner, tmp_path: Path) -> None:
    cat, _ = populate(tmp_path, [("/p/1.jpg", "red star", None), ("/p/2.jpg", "green circle", None)])
    sid = cat.ensure_space(FakeEncoder.space.key, "fake", "fake", 64)
    before = "\n".join(sqlite3.connect(tmp_path / "cat.db").iterdump())
    got = caption_photos(cat, sid, fake_captioner)
    assert sorted(got.values()) == ["a green circle", "a red star"]  # the files do not exist: nothing is decoded
    one = next(iter(got))
    assert caption_photos(cat, sid, fake_captioner, [one]) == {one: got[one]}
    with pytest.raises(PhotoNotFound, match="no indexed photo with id 999"):
        caption_photos(cat, sid, fake_captioner, [one, 999])
    assert "\n".join(sqlite3.connect(tmp_path / "cat.db").iterdump()) == before


def test_captioner_specs_give_one_line_errors(tmp_path: Path) -> None:
    from clipsearch.indexer.model.factory import create_encoder

    tiny = create_encoder(TINY, "cpu", backend="torch")
    coca = "coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k"
    for spec, err in ((coca, ModelUnavailable), (str(tmp_path), UsageError),
                      ("demo", UsageError)):  # demo reads the demo model's space, not the tiny model's
        with pytest.raises(err) as caught:
            load_captioner(spec, tiny)
        assert "\n" not in str(caught.value)
    assert "--model demo" in str(caught.value)


@pytest.mark.integration
def test_demo_captioner_names_the_object_and_its_colour() -> None:
    from clipsearch.indexer.model.factory import create_encoder

    demo = create_encoder("demo", "cpu", backend="torch")
    captioner = load_captioner("demo", demo)
    items = [SampleItem("star", "red", "grass", "large"), SampleItem("circle", "blue", "snow", "small"),
             SampleItem("hexagon", "yellow", "bricks", "large"), SampleItem("cross", "white", "night sky", "large")]
    said = []
    for i, item in enumerate(items):
        buf = io.BytesIO()
        render(item, 220, 180, np.random.default_rng(500 + i)).save(buf, "PNG")
        said.append(caption_image(demo, captioner, buf.getvalue()))
    assert caption_scores(said, items).object_and_colour >= 0.75, said  # 0.9+ on 600 held-out photos (bench)
