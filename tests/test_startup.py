"""No model start-up where nothing needs encoding: an index run whose plan is empty never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import TINY

PROBE = ("import json, sys\nfrom clipsearch.ui.cli import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}))")


def _probe(*args: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=600, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_reindex_of_an_unchanged_folder_never_loads_torch(library, tmp_path) -> None:
    home = str(tmp_path / "home")
    env = {**os.environ, "CLIPSEARCH_MODEL_CACHE": str(tmp_path / "model-cache")}  # the first run exports
    first = _probe("index", str(library), "--home", home, "--model", TINY, "--device", "cpu", "--no-progress", env=env)
    assert first["rc"] == 0  # the first run embeds (with torch, or an ONNX export made earlier)
    again = _probe("index", str(library), "--home", home, "--model", TINY, "--device", "cpu", "--no-progress",
                   env=env)
    assert again == {"rc": 0, "torch": False, "open_clip": False}
    implicit = _probe("index", str(library), "--home", home, "--no-progress", env=env)  # the library's model, unnamed
    assert implicit == {"rc": 0, "torch": False, "open_clip": False}


@pytest.mark.integration
def test_a_cold_search_loads_the_librarys_model_in_the_background_with_the_same_answer(library, tmp_path) -> None:
    """The index run notes its model in the home; the next cold `search` starts that model's text session before
    opening the catalog, and answers exactly as a search that could not guess the model."""
    home = tmp_path / "home"
    env = {**os.environ, "CLIPSEARCH_MODEL_CACHE": str(tmp_path / "model-cache"), "CLIPSEARCH_BACKEND": "onnx"}
    base = [sys.executable, "-m", "clipsearch"]
    subprocess.run([*base, "index", str(library), "--home", str(home), "--model", TINY, "--no-progress"], env=env,
                   check=True, capture_output=True, timeout=600)
    assert (home / "cache" / "model-hint").read_text() == TINY
    search = [*base, "search", "a red circle", "--json", "--home", str(home), "-v"]
    warm = subprocess.run(search, env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0 and "in the background" in warm.stderr
    (home / "cache" / "model-hint").unlink()
    plain = subprocess.run(search, env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and "in the background" not in plain.stderr
    assert json.loads(warm.stdout) == json.loads(plain.stdout) and len(json.loads(warm.stdout)) > 0
