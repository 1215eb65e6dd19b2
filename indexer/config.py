"""Configuration: one frozen AppConfig, built in one place (`load_config`) from the environment and flags.

The CLI, the UI, the Python API and the subprocesses the UI starts all go through `load_config`, so a
`CLIPSEARCH_*` variable means the same everywhere and is read nowhere else. The home dir holds the SQLite
catalog, the FAISS indexes and caches; it is never inside a photo root (the scanner also skips it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
ENV_PREFIX = "CLIPSEARCH_"


def default_home() -> Path:
    """The per-user data dir (e.g. ~/.local/share/clipsearch)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("clipsearch", appauthor=False))


@dataclass(frozen=True)
class AppConfig:
    """Where things live, which model is used and what the UI may touch; shared by the CLI, the UI and the API."""

    home: Path = field(default_factory=default_home)  # app data dir: catalog, indexes, caches ($CLIPSEARCH_HOME)
    db_url: str | None = None  # SQLAlchemy URL; None means SQLite at home/catalog.db ($CLIPSEARCH_DB)
    model: str | None = None  # model spec; None: the library's last model, else DEFAULT_MODEL ($CLIPSEARCH_MODEL)
    device: str | None = None  # "cuda", "mps", "cpu"; None picks the best available ($CLIPSEARCH_DEVICE)
    backend: str = "auto"  # auto (ONNX Runtime on CPU, torch on CUDA), onnx or torch ($CLIPSEARCH_BACKEND)
    model_cache: Path | None = None  # where downloaded weights live; None: the hub's default ($CLIPSEARCH_MODEL_CACHE)
    roots: tuple[Path, ...] = ()  # folders the UI may index (nothing else); ($CLIPSEARCH_ROOTS, os.pathsep-separated)
    max_upload_mb: float = 20.0  # largest upload the UI accepts ($CLIPSEARCH_MAX_UPLOAD_MB)
    debug: bool = False  # show tracebacks of internal errors ($CLIPSEARCH_DEBUG=1)

    @property
    def resolved_db_url(self) -> str:
        """The catalog URL, defaulting to an embedded SQLite file in the home dir."""
        return self.db_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    @property
    def index_dir(self) -> Path:
        """Folder of FAISS indexes and their manifests (one pair per embedding space)."""
        return self.home / "indexes"

    @property
    def cache_dir(self) -> Path:
        """Folder of derived, disposable files (thumbnails, label embeddings)."""
        return self.home / "cache"

    def as_env(self) -> dict[str, str]:
        """The `CLIPSEARCH_*` variables that make `load_config` in a child process give this same config."""
        env = {"CLIPSEARCH_HOME": str(self.home), "CLIPSEARCH_MAX_UPLOAD_MB": str(self.max_upload_mb)}
        optional = {"CLIPSEARCH_DB": self.db_url, "CLIPSEARCH_MODEL": self.model, "CLIPSEARCH_DEVICE": self.device,
                    "CLIPSEARCH_BACKEND": self.backend if self.backend != "auto" else None,
                    "CLIPSEARCH_MODEL_CACHE": self.model_cache and str(self.model_cache),
                    "CLIPSEARCH_ROOTS": os.pathsep.join(str(r) for r in self.roots) or None,
                    "CLIPSEARCH_DEBUG": "1" if self.debug else None}
        env.update({k: v for k, v in optional.items() if v})
        return env


MODEL_HINT = "model-hint"  # in a home's cache dir: the spec its last encoder was built from


def read_model_hint(config: AppConfig) -> str | None:
    """The model a home's next query will most likely use (--model, else the spec its last encoder was built
    from), read without opening the catalog: a guess to start loading early, never a decision."""
    if config.model:
        return config.model
    try:
        return (config.cache_dir / MODEL_HINT).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_model_hint(config: AppConfig, spec: str) -> None:
    """Note the spec an encoder was just built from (atomically; a read-only home only loses the head start)."""
    path = config.cache_dir / MODEL_HINT
    try:
        if path.read_text(encoding="utf-8") == spec:
            return
    except OSError:
        pass
    try:
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MODEL_HINT}.{os.getpid()}")
        tmp.write_text(spec, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def load_config(env: Mapping[str, str] | None = None, **flags: Any) -> AppConfig:
    """The one place that turns environment + flags into an AppConfig. A flag given (not None) wins over its
    variable; a variable wins over the default.
    Flags: home, db, model, device, backend, model_cache, roots, max_upload_mb."""
    env = os.environ if env is None else env

    def pick(flag: str, var: str) -> Any:
        value = flags.get(flag)
        return value if value not in (None, "", ()) else (env.get(ENV_PREFIX + var) or None)

    kw: dict[str, Any] = {"db_url": pick("db", "DB"), "model": pick("model", "MODEL"),
                          "device": pick("device", "DEVICE"), "backend": pick("backend", "BACKEND") or "auto",
                          "debug": env.get("CLIPSEARCH_DEBUG", "") not in ("", "0")}
    home = pick("home", "HOME")
    if home:
        kw["home"] = Path(home).expanduser()
    cache = pick("model_cache", "MODEL_CACHE")
    kw["model_cache"] = Path(cache).expanduser() if cache else None
    roots = pick("roots", "ROOTS")
    if isinstance(roots, str):
        roots = [r for r in roots.split(os.pathsep) if r]
    kw["roots"] = tuple(Path(r).expanduser().resolve() for r in roots or ())
    upload = pick("max_upload_mb", "MAX_UPLOAD_MB")
    if upload is not None:
        kw["max_upload_mb"] = float(upload)
    return AppConfig(**kw)


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
    gpu_decode: str = "auto"  # JPEG pixels on the GPU when the model runs on CUDA: auto | on | off (gpu_decode.py)
