"""Captions (issue 18): the embedding-conditioned captioner, its loading rules (demo, folders, CoCa and BLIP specs,
one-line offline errors), captioning catalogued photos from their stored vectors or (CoCa) their files, and the
measurement (object + colour named, BLEU-4). bench/captions.py measures the bundled
demo captioner on a held-out make-sample seed."""

from __future__ import annotations

import io
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.errors import BadImage, ModelUnavailable, PhotoNotFound, UsageError
from clipsearch.indexer.model.sample import SampleItem, render
from clipsearch.search.captions import (
    caption_image,
    caption_library,
    caption_photos,
    caption_scores,
    captioner_kind,
    captioner_label,
    corpus_bleu,
    load_captioner,
    reads_embeddings,
)

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


def test_captioner_specs_give_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    from clipsearch.indexer.model.factory import create_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = create_encoder(TINY, "cpu", backend="torch")
    coca = "coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k"
    for spec, err in ((coca, ModelUnavailable), (str(tmp_path), UsageError), (str(tmp_path / "gone"), UsageError),
                      ("Salesforce/blip-image-captioning-base", UsageError), ("blip:", UsageError), ("", UsageError),
                      (TINY, UsageError),  # an open_clip CLIP model without a caption decoder
                      ("demo", UsageError)):  # demo reads the demo model's space, not the tiny model's
        with pytest.raises(err) as caught:
            load_captioner(spec, tiny)
        assert "\n" not in str(caught.value), spec
    assert "--model demo" in str(caught.value)
    with pytest.raises(ModelUnavailable) as caught:
        load_captioner(coca, tiny)
    line = str(caught.value)  # which weights, where they go, and the offline alternative
    assert "hf download laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k" in line and os.environ[
        "CLIPSEARCH_MODEL_CACHE"] in line and "--captioner demo" in line and "HF_HUB_OFFLINE" in line


def test_blip_names_what_to_install_and_fetch(monkeypatch) -> None:
    from clipsearch.indexer.model import pixel_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pixel_models, "has_transformers", lambda: False)
    with pytest.raises(ModelUnavailable) as caught:
        load_captioner("blip:Salesforce/blip-image-captioning-base")
    line = str(caught.value)
    assert "\n" not in line and "pip install transformers" in line and "--captioner demo" in line
    assert "hf download Salesforce/blip-image-captioning-base" in line


def test_captioner_labels_and_kinds(tmp_path: Path) -> None:
    assert (captioner_kind("demo")[0], captioner_label("demo"), reads_embeddings("demo")) == ("embedding", "demo",
                                                                                                True)
    coca = "coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k"
    assert captioner_kind(coca) == ("coca", coca) and captioner_label(coca) == coca and not reads_embeddings(coca)
    assert captioner_kind("blip:Salesforce/x") == ("blip", "Salesforce/x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert captioner_kind(str(tmp_path / "hf"))[0] == "blip"
    assert captioner_label(str(tmp_path / "hf")) == f"blip:{(tmp_path / 'hf').resolve()}"


TINY_COCA = {  # an untrained open_clip CoCa small enough to build and caption in seconds on a CPU
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


@pytest.mark.integration
def test_an_open_clip_coca_captions_files_and_catalogued_photos(tmp_path: Path) -> None:
    """The real CoCa path (open_clip create_model + decoding), on untrained weights: captions carry no meaning,
    but they are generated from the pixels, stored, and found again."""
    from clipsearch.indexer.storage.caption_store import CaptionStore
    from clipsearch.indexer.storage.catalog import Catalog, PhotoRecord

    config = tmp_path / "coca-tiny.json"
    config.write_text(json.dumps(TINY_COCA))
    spec = f"{config}:none"
    captioner = load_captioner(spec)  # no CLIP encoder needed: it reads pixels
    photos = []
    for i, item in enumerate([SampleItem("star", "red", "grass", "large"), SampleItem("circle", "blue", "snow",
                                                                                         "small")]):
        path = tmp_path / f"p{i}.png"
        render(item, 64, 48, np.random.default_rng(i)).save(path)
        photos.append(path)
    said = caption_image(None, captioner, photos[0].read_bytes())
    assert isinstance(said, str) and "<" not in said
    cat = Catalog(f"sqlite:///{tmp_path / 'cat.db'}")
    recs = [PhotoRecord(str(p).encode(), 1, 1, "indexed", content_hash=f"h{i}") for i, p in enumerate(photos)]
    recs.append(PhotoRecord(str(tmp_path / "gone.png").encode(), 1, 1, "indexed", content_hash="h9"))
    cat.write_batch(cat.ensure_space("k", "l", "m", 4), recs, {})
    got = caption_library(cat, captioner, captioner_label(spec))  # the missing file is skipped, not fatal
    assert sorted(got) == [1, 2] and got[1] == said
    assert CaptionStore(cat).captions_of([1, 2, 3]) == got and CaptionStore(cat).photos_needing(spec) == [3]
    with pytest.raises(BadImage, match="#3"):
        caption_library(cat, captioner, captioner_label(spec), ids=[1, 3])  # named photos must all be readable
    cat.dispose()


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
