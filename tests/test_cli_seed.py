"""The seed systems from the command line: explain writes a heatmap, caption and ask answer from the demo models,
and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image


def _cli(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", *args, "--home", str(home)], capture_output=True,
                          text=True, timeout=600)


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
    assert len(rows) == 12 and all(r["caption"].startswith("a ") for r in rows)
    some_file = next(iter(truth))
    one = json.loads(_cli("caption", str(photos / some_file), "--json", home=home).stdout)[0]
    colour = truth[some_file].split()[2]
    assert colour in one["caption"]

    answer = _cli("ask", str(photos / some_file), "what colour is the shape?", "--json", home=home)
    assert answer.returncode == 0 and json.loads(answer.stdout)["answer"] == colour

    for bad in (("explain", "a star", "99999", "--out", str(tmp_path / "x.png")), ("caption",),
                ("ask", "99999", "what colour?")):
        r = _cli(*bad, home=home)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr


@pytest.mark.integration
def test_duplicates_groups_a_copied_photo_and_deletes_nothing(tmp_path) -> None:
    import shutil

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
