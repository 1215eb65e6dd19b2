"""Configuration as frozen dataclasses, and where the app keeps its data.

The home dir holds the SQLite catalog, the FAISS indexes and the thumbnail cache. It is never inside a photo
root (the scanner also skips it explicitly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"


def default_home() -> Path:
    """`$CLIPSEARCH_HOME` if set, else the per-user data dir (e.g. ~/.local/share/clipsearch)."""
    env = os.environ.get("CLIPSEARCH_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("clipsearch", appauthor=False))


@dataclass(frozen=True)
class AppConfig:
    """Where things live and which model is used; shared by the CLI and the UI."""

    home: Path = field(default_factory=default_home)  # app data dir: catalog, indexes, thumbnails
    db_url: str | None = None  # SQLAlchemy URL; None means SQLite at home/catalog.db
    model: str = DEFAULT_MODEL  # model spec ARCH:WEIGHTS, a config+weights folder, or "demo"
    device: str | None = None  # "cuda", "mps", "cpu"; None picks the best available

    @property
    def resolved_db_url(self) -> str:
        """The catalog URL, defaulting to an embedded SQLite file in the home dir."""
        return self.db_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    @property
    def index_dir(self) -> Path:
        """Folder of FAISS indexes and their manifests (one pair per embedding space)."""
        return self.home / "indexes"

    @property
    def thumb_dir(self) -> Path:
        """Folder of cached JPEG thumbnails, keyed by photo id."""
        return self.home / "thumbs"


@dataclass(frozen=True)
class IndexOptions:
    """Knobs of one indexing run."""

    batch_size: int = 32  # images per embedding batch (and per catalog transaction)
    workers: int | None = None  # decode processes; None: every core on a CPU-only machine, cores - 1 beside a GPU
    force: bool = False  # purge vanished files even when most of the library vanished at once
    max_pixels: int = 100_000_000  # decompression-bomb limit (width * height)
    follow_symlinks: bool = False  # follow symlinked dirs/files while walking (loop-safe either way)
    progress: bool = False  # show a progress bar (the CLI turns it on)
    torch_threads: int | None = None  # model CPU threads while indexing; None keeps torch's default
    vanish_ratio: float = 0.5  # refuse to purge when more than this fraction of known files vanished
