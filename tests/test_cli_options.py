"""The CLI's conventions as a user meets them, through real `python -m clipsearch` processes, with no model loaded:
global options before and after the command, --version, --help with true defaults and examples, range-checked
numbers (one line, exit 2, nothing touched), and one-line messages for a bad home or an empty library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PROBE = ("import json, sys\nfrom clipsearch.ui.cli import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}))")
MODEL_DEFAULT = "else the model the library was indexed with, else ViT-B-32:laion2b_s34b_b79k"
COMMANDS = ["index", "status", "reindex", "optimize", "ocr", "search", "similar", "describe", "classify", "tag",
            "texts", "make-sample", "train", "eval", "ui", "demo", "serve"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True, text=True, env=_env(),
                          timeout=120)


def probe(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Run the CLI's main() and report whether torch or open_clip were imported."""
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=_env(), timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command, checked to be one line without a traceback, usage block or SQL."""
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    for bad in ("Traceback", "usage:", "internal error", "[SQL", "SELECT ", "INSERT ", "UPDATE "):
        assert bad not in err, err
    return err


# --- global options ----------------------------------------------------------------------------------------------
def test_every_global_option_works_before_and_after_the_command(tmp_path: Path) -> None:
    home, db = tmp_path / "home", tmp_path / "elsewhere.db"
    opts = ["--home", str(home), "--db", f"sqlite:///{db}", "--model", "my-model:none", "--device", "cpu",
            "--backend", "onnx", "--json", "-v"]
    for argv in (opts + ["status"], ["status"] + opts, opts[:6] + ["status"] + opts[6:]):
        r = cli(*argv)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)  # --json
        assert st["home"] == str(home) and st["catalog"] == f"sqlite:///{db}", argv  # --home, --db
        assert "model my-model:none, device cpu, backend onnx" in r.stderr, (argv, r.stderr)  # -v shows the rest
    plain = cli("status", "--home", str(home))
    assert not plain.stdout.startswith("{") and "settings:" not in plain.stderr  # without --json and -v


def test_device_and_backend_take_effect_in_either_position(tmp_path: Path) -> None:
    """--backend onnx with --device cuda is refused before any model loads: proof both values arrived."""
    home = str(tmp_path / "home")
    before = cli("--home", home, "--backend", "onnx", "--device", "cuda", "describe", "x.jpg", "--labels", "a,b")
    after = cli("describe", "x.jpg", "--labels", "a,b", "--home", home, "--backend", "onnx", "--device", "cuda")
    for r in (before, after):
        assert r.returncode == 2 and "ONNX backend runs on the CPU only" in one_line_error(r) and "'cuda'" in r.stderr


def test_a_global_option_after_the_command_wins(tmp_path: Path) -> None:
    r = cli("--home", str(tmp_path / "a"), "status", "--home", str(tmp_path / "b"), "--json")
    assert json.loads(r.stdout)["home"] == str(tmp_path / "b")


def test_version() -> None:
    import clipsearch

    r = cli("--version")
    assert r.returncode == 0 and r.stdout == f"clipsearch {clipsearch.__version__}\n"


# --- help --------------------------------------------------------------------------------------------------------
def test_main_help_lists_every_command() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert f"\n    {name} " in r.stdout, name


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_help_shows_defaults_and_examples(name: str) -> None:
    r = cli(name, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    examples = r.stdout.split("examples:\n", 1)[1].splitlines()
    assert 2 <= sum(line.startswith("  clipsearch ") for line in examples) <= 3, r.stdout
    model = "else the bundled 'demo' model" if name == "demo" else MODEL_DEFAULT
    assert f"--model SPEC ARCH:WEIGHTS, a model folder, or 'demo' (default: $CLIPSEARCH_MODEL, {model})" in text
    for option in ("--home", "--db", "--device", "--backend", "--json", "--verbose"):
        assert option in text


@pytest.mark.parametrize(("name", "shown"), [
    ("index", ["--batch-size N images per embedding batch and per catalog transaction (default: 32)",
               "(default: all cores; cores - 1 with a GPU)", "(default: 100,000,000)"]),
    ("search", ["-k N hits per page, 1 to 10000 (default: 20)", "(pagination) (default: 0)"]),
    ("describe", ["(default: 10)"]), ("classify", ["(default: 5)", "(default: 0.5 with --multi-label"]),
    ("tag", ["minimum probability, 0 to 1 (default: 0.5)", "(default: 'zeroshot'"]),
    ("ui", ["(default: 8501)", "(default: 127.0.0.1)"]), ("serve", ["(default: 8765)"]),
    ("demo", ["(default: 240)", "(default: 8501)"]), ("make-sample", ["(default: 300)"]),
    ("train", ["(default: 10)", "(default: 128)", "(default: 0.001)", "(default: 0.5)"]),
])
def test_help_states_the_true_defaults(name: str, shown: list[str]) -> None:
    text = " ".join(cli(name, "--help").stdout.split())
    for s in shown:
        assert s in text, (s, text)


# --- range checks ------------------------------------------------------------------------------------------------
RANGES = [
    (["tag", "--labels", "a,b", "--threshold", "5"], "--threshold"),
    (["tag", "--labels", "a,b", "--threshold", "-1"], "--threshold"),
    (["tag", "--labels", "a,b", "--threshold", "nan"], "--threshold"),
    (["classify", "x.jpg", "--labels", "a,b", "--threshold", "7"], "--threshold"),
    (["search", "q", "-k", "0"], "-k"), (["search", "q", "-k", "10001"], "-k"), (["search", "q", "-k", "many"], "-k"),
    (["similar", "1", "--offset", "-1"], "--offset"), (["describe", "x.jpg", "--labels", "a", "-k", "0"], "-k"),
    (["index", ".", "--batch-size", "0"], "--batch-size"), (["index", ".", "--batch-size", "-5"], "--batch-size"),
    (["index", ".", "--workers", "-3"], "--workers"), (["index", ".", "--max-pixels", "0"], "--max-pixels"),
    (["index", ".", "--max-pixels", "999999"], "--max-pixels"),
    (["make-sample", "d", "--count", "0"], "--count"), (["demo", "--count", "-1"], "--count"),
    (["ui", "--port", "0"], "--port"), (["ui", "--port", "65536"], "--port"), (["serve", "--port", "70000"], "--port"),
    (["train", "d", "--out", "o", "--epochs", "0"], "--epochs"),
    (["train", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["train", "d", "--out", "o", "--lr", "0"], "--lr"),
    (["train", "d", "--out", "o", "--val-fraction", "1"], "--val-fraction"),
    (["train", "d", "--out", "o", "--hard-batches", "-0.1"], "--hard-batches"),
]


@pytest.mark.parametrize(("argv", "option"), RANGES, ids=[" ".join(a) for a, _ in RANGES])
def test_out_of_range_numbers_are_one_line_usage_errors(argv: list[str], option: str, tmp_path: Path) -> None:
    r = cli(*argv, "--home", str(tmp_path / "home"))
    assert r.returncode == 2
    assert one_line_error(r).startswith(f"clipsearch {argv[0]}: error: argument {option}"), r.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was opened


def test_describe_without_what_to_rank_prints_the_error_and_one_hint(tmp_path: Path) -> None:
    r = cli("describe", "photo.jpg", "--home", str(tmp_path / "home"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "clipsearch describe: error: one of the arguments --labels --vocab --texts is required"
    assert len(lines) == 2 and lines[1].startswith("clipsearch describe: hint:") and "--labels" in lines[1]
    assert "usage:" not in r.stderr


# --- messages ----------------------------------------------------------------------------------------------------
def test_search_of_an_empty_library_says_so_without_loading_a_model(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert cli("status", "--home", str(home)).returncode == 0  # a catalog with nothing in it
    got, r = probe("search", "a dog", "--home", str(home))  # no --model: the default would be a hub model
    assert got == {"rc": 3, "torch": False, "open_clip": False}
    assert one_line_error(r) == f"clipsearch: error: nothing is indexed yet in {home}; run clipsearch index PATH"


def test_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    for argv in (["status"], ["index", str(tmp_path)], ["search", "x"]):
        r = cli(*argv, "--home", str(tmp_path / "file"))
        assert r.returncode == 2 and "is a file, not a folder" in one_line_error(r)


def test_ui_roots_must_be_folders(tmp_path: Path) -> None:
    for name in ("ui", "demo"):
        r = cli(name, "--roots", str(tmp_path / "missing"), "--home", str(tmp_path / "home"))
        assert r.returncode == 2 and f"--roots {tmp_path / 'missing'} is not a folder" in one_line_error(r)


def test_tag_export_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    r = cli("tag", "--export", str(tmp_path / "missing" / "tags.csv"), "--home", str(tmp_path / "home"))
    assert r.returncode == 2 and "cannot write" in one_line_error(r) and "No such file" in r.stderr


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make paths unwritable: chmod for a user, the immutable attribute for root (whom modes do not stop)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in paths:
                p.chmod(modes[p])
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *map(str, paths)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root where files cannot be made immutable: no way to get a read-only home")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def test_read_only_home_is_one_line(tmp_path: Path) -> None:
    photos, home, fresh = tmp_path / "photos", tmp_path / "home", tmp_path / "fresh"
    photos.mkdir()
    fresh.mkdir()
    assert cli("status", "--home", str(home)).returncode == 0
    with read_only(fresh):  # a home that cannot be written at all
        for argv in (["status", "--home", str(fresh)], ["index", str(photos), "--home", str(fresh)],
                     ["status", "--home", str(fresh / "sub")]):
            r = cli(*argv)
            assert r.returncode == 3 and one_line_error(r).startswith("clipsearch: error: "), (argv, r.stderr)
    with read_only(home / "catalog.db"):  # a catalog that cannot be written
        r = cli("tag", "--remove", "animals", "--home", str(home))
        assert r.returncode == 3 and "readonly" in one_line_error(r).replace("-", "").replace(" ", ""), r.stderr
