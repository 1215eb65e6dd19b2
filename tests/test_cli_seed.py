"""The seed systems from the command line: explain writes a heatmap, caption and ask answer from the demo models
(captions are stored in the catalog and found again by their words), and bad input is one line: a model that is
not here says which weights to fetch and where."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image


def _cli(*args: str, home, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", *args, "--home", str(home)], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.integration
def test_explain_caption_ask_on_the_demo_library(tmp_path) -> None:
    photos, home = tmp_path / "photos", tmp_path / "home"
    assert _cli("make-sample", str(photos), "--count", "12", home=home).returncode == 0
    assert _cli("index", str(photos), "--model", "demo", "--no-progress", home=home).returncode == 0
    truth = dict(line.split(",", 1) for line in (photos / "captions.txt").read_text().splitlines()[1:])

    heat = _cli("explain", "a red star", "1", "--out", str(tmp_path / "heat.png"), "--json", home=home)
    assert heat.returncode == 0, heat.stderr
    info = json.loads(heat.stdout)
    with Image.open(tmp_path / "heat.png") as im:
        assert list(im.size) == info["size"]

    caps = _cli("caption", "--all", "--json", home=home)
    assert caps.returncode == 0, caps.stderr
    rows = json.loads(caps.stdout)
    assert len(rows) == 12 and all(r["caption"].startswith("a ") and r["stored"] for r in rows)
    again = _cli("caption", "--all", home=home)  # only missing or stale captions are made
    assert again.returncode == 0 and "already has a caption from demo" in again.stdout, again.stderr
    _captions_are_searchable(home, rows)
    some_file = next(iter(truth))
    one = json.loads(_cli("caption", str(photos / some_file), "--json", home=home).stdout)[0]
    colour = truth[some_file].split()[2]
    assert colour in one["caption"] and one["stored"]  # a catalogued path: stored under its id
    outside = tmp_path / "outside.jpg"
    shutil.copy(photos / some_file, outside)
    loose = json.loads(_cli("caption", str(outside), "--json", home=home).stdout)[0]
    assert loose == {"source": str(outside), "caption": one["caption"], "stored": False}

    answer = _cli("ask", str(photos / some_file), "what colour is the shape?", "--json", home=home)
    assert answer.returncode == 0 and json.loads(answer.stdout)["answer"] == colour

    before = _caption_rows(home)
    for bad in (("explain", "a star", "99999", "--out", str(tmp_path / "x.png")), ("caption",),
                ("caption", "1", "99999"), ("caption", "1", "--redo"), ("ask", "99999", "what colour?")):
        r = _cli(*bad, home=home)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr
    assert _caption_rows(home) == before  # a failed caption run writes nothing


def _catalog(home):
    from clipsearch.indexer.config import AppConfig
    from clipsearch.indexer.storage.catalog import Catalog

    return Catalog(AppConfig(home=home).resolved_db_url)


def _caption_rows(home) -> list:
    cat = _catalog(home)
    with cat.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM caption_texts ORDER BY id").all()
    cat.dispose()
    return [tuple(r) for r in rows]


def _captions_are_searchable(home, rows: list[dict]) -> None:
    """`caption:WORD` finds exactly the photos whose stored caption holds the word (search/caption_search.py)."""
    from clipsearch.search.caption_search import caption_hits, captions_of

    cat = _catalog(home)
    by_id = {int(r["source"][1:]): r["caption"] for r in rows}
    assert captions_of(cat, list(by_id)) == by_id
    for word in {r["caption"].split()[2] for r in rows}:  # "a <size> <colour> <shape> ..."
        got = {i for i, _ in caption_hits(cat, f'caption:"{word}"', 50)}
        assert got == {i for i, c in by_id.items() if word in c.split()}, word
    cat.dispose()


def test_model_specs_that_are_not_here_give_one_line(tmp_path) -> None:
    """Registry captioners and question models that are not available offline say which weights to fetch and where
    to put them (and what to install); nothing is downloaded (HF_HUB_OFFLINE) and no traceback is printed."""
    import importlib.util

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    no_transformers = importlib.util.find_spec("transformers") is None
    cases = [(("caption", "x.jpg", "--captioner", "coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k"), 3,
              "hf download laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k"),
             (("caption", "x.jpg", "--captioner", "blip:Salesforce/blip-image-captioning-base"), 3,
              "pip install transformers" if no_transformers else "hf download Salesforce/blip-image-captioning-base"),
             (("caption", "x.jpg", "--captioner", str(tmp_path / "no-such-folder")), 2, "no such folder"),
             (("ask", "x.jpg", "what is it?", "--answerer", "vilt:dandelin/vilt-b32-finetuned-vqa"), 3,
              "pip install transformers" if no_transformers else "hf download dandelin/vilt-b32-finetuned-vqa"),
             (("ask", "x.jpg", "what is it?", "--answerer", str(tmp_path / "no-such-folder")), 2, "no such folder")]
    for args, code, said in cases:
        r = _cli(*args, home=tmp_path / "home", env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and len(lines) == 1 and said in lines[0], (args, r.stderr)
        assert "offline" in lines[0] or code == 2


@pytest.mark.integration
def test_duplicates_groups_a_copied_photo_and_deletes_nothing(tmp_path) -> None:
    photos, home = tmp_path / "photos", tmp_path / "home"
    assert _cli("make-sample", str(photos), "--count", "12", home=home).returncode == 0
    original = sorted(photos.glob("*/*.jpg"))[0]
    shutil.copy(original, photos / "copy-of-it.jpg")
    assert _cli("index", str(photos), "--model", "demo", "--no-progress", home=home).returncode == 0
    r = _cli("duplicates", "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    paths = {m["path"] for g in doc["items"] for m in g["members"]}
    assert doc["groups"] >= 1 and {str(original), str(photos / "copy-of-it.jpg")} <= paths
    assert original.is_file() and (photos / "copy-of-it.jpg").is_file()
