"""The CLI over a real library (tiny model, real FAISS and SQLite), through `python -m clipsearch`: an out-of-range
value never touches data, status accounts for every file, and the commands with nothing to encode start without
torch or open_clip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import TINY, make_photo
from .test_cli_options import cli, one_line_error, probe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with 6 indexed photos, 3 files of extensions never scanned, and a tag set 'kinds' (read-mostly:
    tests that write restore what they change)."""
    root = tmp_path_factory.mktemp("cli-lib")
    photos, home = root / "photos", root / "home"
    for i in range(6):
        make_photo(photos / f"p{i}.jpg", i)
    for name in ("notes.txt", "readme.txt", "clip.xyz"):
        (photos / name).write_text("not a photo")
    r = cli("index", str(photos), "--home", str(home), "--model", TINY, "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("tag", "--labels", "cat,dog,car", "--name", "kinds", "--threshold", "0", "--home", str(home),
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return home


def _tags(home: Path, tmp_path: Path) -> list[dict]:
    out = tmp_path / "tags.json"
    r = cli("tag", "--export", str(out), "--name", "kinds", "--home", str(home))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_out_of_range_threshold_exits_2_and_the_tag_set_survives(home: Path, tmp_path: Path) -> None:
    before = _tags(home, tmp_path)
    assert len(before) == 6  # threshold 0: every photo got its top label
    for bad in ("5", "-1", "1.5", "nan"):
        r = cli("tag", "--labels", "cat,dog,car", "--name", "kinds", "--threshold", bad, "--home", str(home))
        assert r.returncode == 2 and "--threshold" in one_line_error(r)
        assert _tags(home, tmp_path) == before


def test_status_counts_files_skipped_by_extension(home: Path) -> None:
    st = json.loads(cli("status", "--json", "--home", str(home)).stdout)
    assert st["indexed"] == 6 and st["skipped_by_extension"] == {".txt": 2, ".xyz": 1}
    text = cli("status", "--home", str(home)).stdout
    assert "skipped (not a photo type): 3 files: .txt 2, .xyz 1" in text


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["status"], ["tag", "--export", "{tmp}/t.csv"],
                                  ["tag", "--remove", "no-such-set"], ["search", "--help"]],
                         ids=["help", "version", "status", "tag-export", "tag-remove", "search-help"])
def test_commands_with_nothing_to_encode_never_import_torch(argv: list[str], home: Path, tmp_path: Path) -> None:
    got, r = probe(*[a.replace("{tmp}", str(tmp_path)) for a in argv], "--home", str(home))
    assert got == {"rc": 0, "torch": False, "open_clip": False}, r.stderr
    if argv[0] == "tag" and argv[1] == "--export":
        assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + 6  # header + the 'kinds' tags


def test_tag_remove_undoes_a_set_without_a_model(home: Path, tmp_path: Path) -> None:
    r = cli("tag", "--labels", "red,blue", "--name", "colours", "--threshold", "0", "--home", str(home))
    assert r.returncode == 0, r.stderr
    got, r = probe("tag", "--remove", "colours", "--json", "--home", str(home))
    assert got["rc"] == 0 and not got["torch"]
    printed = "\n".join(r.stdout.strip().splitlines()[:-1])  # the command's --json, before the probe's line
    assert json.loads(printed) == {"removed": 6, "label_set": "colours"}
    assert len(_tags(home, tmp_path)) == 6  # the other set is untouched
