"""Shared fixtures: tiny untrained open_clip models (no downloads), generated libraries, catalogs (SQLite and a
real PostgreSQL server started from the installed binaries)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"
TINY = f"{DATA / 'tiny-vit.json'}:none"  # 32-d, 32 px
TINY2 = f"{DATA / 'tiny-vit-b.json'}:none"  # a second space: 24-d


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """ONNX exports of this run go to a fresh cache (inherited by CLI subprocesses), never the user's."""
    old = os.environ.get("CLIPSEARCH_MODEL_CACHE")
    os.environ["CLIPSEARCH_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if old is None:
        os.environ.pop("CLIPSEARCH_MODEL_CACHE", None)
    else:
        os.environ["CLIPSEARCH_MODEL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_encoder():
    """The tiny untrained encoder, loaded once (read-only, so sharing is safe)."""
    from clipsearch.indexer.model.factory import create_encoder

    return create_encoder(TINY, "cpu")


def make_photo(path: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str | None = None, **save) -> Path:
    """A deterministic photo-like image: coloured blocks and noise, distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **save)
    return path


@pytest.fixture()
def library(tmp_path: Path) -> Path:
    """A small folder of good photos in a few formats and sub-folders."""
    root = tmp_path / "photos"
    for i in range(6):
        make_photo(root / f"a/p{i}.jpg", i)
    make_photo(root / "b/q.png", 10)
    make_photo(root / "b/r.webp", 11)
    return root


@pytest.fixture()
def app_config(tmp_path: Path):
    """AppConfig with a fresh home and the tiny model."""
    from clipsearch.indexer.config import AppConfig

    return AppConfig(home=tmp_path / "home", model=TINY, device="cpu")


def make_indexer(config, encoder, **opts):
    """An Indexer over real parts with a shared encoder (no model reload per test)."""
    from clipsearch.indexer.app import open_parts
    from clipsearch.indexer.config import IndexOptions
    from clipsearch.indexer.pipeline import Indexer

    parts = open_parts(config)
    return Indexer(parts.catalog, parts.store, encoder, config.home, IndexOptions(**{"workers": 1, **opts}),
                   db_url=config.db_url)


# --- PostgreSQL --------------------------------------------------------------------------------------------------
def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return os.path.dirname(found[-1])
    exe = shutil.which("pg_ctl")
    return os.path.dirname(exe) if exe else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    """URL of a throwaway PostgreSQL server (initdb + pg_ctl from the installed binaries); skipped when absent."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs the postgresql package)")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="clipsearch-pg-"))  # not under pytest's 0700 tmp root: postgres must enter
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    subprocess.run(prefix + [f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-o", opts, "-w", "-l", str(base / "log"),
                             "start"], check=True, capture_output=True)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        yield url
    finally:
        subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def fresh_pg_url(postgres_url: str):
    """A new, empty database on the session's server."""
    import sqlalchemy as sa

    name = f"t{int(time.time() * 1e6)}"
    eng = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    eng.dispose()
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both catalog back-ends: SQLite in tmp_path and a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cat.db'}"
    request.applymarker(pytest.mark.postgres)
    return request.getfixturevalue("fresh_pg_url")
