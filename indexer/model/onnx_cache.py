"""Where ONNX exports live and how one is found and trusted, without torch (the ONNX backend's start-up path).

Layout under the model cache (``AppConfig.model_cache`` / ``$CLIPSEARCH_MODEL_CACHE``, else the user cache dir)::

    onnx/<space key>/          one export per embedding space: image.onnx, text.onnx, the BPE vocabulary, export.json
    onnx/sources/<source key>  which space a model spec resolves to (a spec is resolved without torch by its source key)

The space key is the torch encoder's (it needs open_clip to compute), so a spec is first mapped to a source key made
of what can be read without torch: the spec's parts, the stat of its weight files, the open_clip version. A changed
checkpoint or an upgraded open_clip is a new source; a source that maps to an existing space reuses its export.
export.json carries a SHA-256 per file and one over its own fields: a missing, truncated or edited export is detected
and rebuilt, never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import PreprocessSpec
from clipsearch.indexer.model.protocol import EmbeddingSpace

FORMAT = 1  # bump when the exported graphs' inputs/outputs or export.json change meaning
META_FILE = "export.json"
TOWERS = ("image", "text")
# Texts every export is checked on before it is installed: plain, empty, one character, non-Latin with an emoji and
# an HTML entity (the tokenizer's cleaning), over-long (truncation), mixed case and punctuation.
PROBE_TEXTS = ["a photo of a dog", "", "x", "Café naïve 東京 🐶 &amp; don't", "a " * 100, "A RED circle, on grass."]
DEMO_DIR = Path(__file__).parent / "demo"  # the bundled model (torch_encoder.DEMO_DIR, without importing torch)


class OnnxUnsupported(UsageError):
    """This model cannot run on the ONNX backend (tokenizer, exporter or accuracy check); `auto` falls back to torch.

    Belongs in clipsearch.indexer.errors (kept here while that module has another owner)."""


@dataclass(frozen=True)
class ExportMeta:
    """export.json: what the ONNX encoder needs to stand in for the torch one without loading it."""

    format: int  # FORMAT at export time
    spec: str  # the model spec it was exported from (for messages)
    space: EmbeddingSpace  # the torch encoder's space: both backends share one index
    preprocess: PreprocessSpec  # decoder settings, as the torch encoder's
    logit_scale: float  # the model's learned temperature
    context_length: int  # tokenizer context
    clean: str  # tokenizer cleaning mode (open_clip's `clean`)
    special_tokens: list[str]  # additional special tokens after <start_of_text>, <end_of_text>
    text_dynamic_length: bool  # the text graph accepts rows cut after their end-of-text token
    files: dict[str, dict[str, str]]  # tower (image, text, vocab) -> {file name: sha256}
    cosine_checked: float  # lowest cosine torch vs ONNX seen by the export's own check

    def to_json(self) -> str:
        """Canonical JSON with a checksum over the fields, so an edited or truncated export.json is detected."""
        body = asdict(self)
        body["checksum"] = _digest_text(json.dumps(body, sort_keys=True))
        return json.dumps(body, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ExportMeta:
        """Parse and check export.json; ValueError (with the reason) when it is not one this version wrote."""
        body = json.loads(text)
        claimed = body.pop("checksum", None)
        if claimed != _digest_text(json.dumps(body, sort_keys=True)):
            raise ValueError("export.json checksum mismatch")
        if body.get("format") != FORMAT:
            raise ValueError(f"export format {body.get('format')} (this version reads {FORMAT})")
        body["space"] = EmbeddingSpace(**body["space"])
        body["preprocess"] = PreprocessSpec(**body["preprocess"])
        return cls(**body)


def _digest_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (hashlib releases the GIL, so this can overlap with ONNX Runtime building a session)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_root(model_cache: str | Path | None = None) -> Path:
    """The folder of ONNX exports: <model cache>/onnx, the model cache being the argument, $CLIPSEARCH_MODEL_CACHE
    (as the torch backend reads it), else the per-user cache dir (e.g. ~/.cache/clipsearch)."""
    base = model_cache or os.environ.get("CLIPSEARCH_MODEL_CACHE")
    if not base:
        import platformdirs

        base = platformdirs.user_cache_dir("clipsearch", appauthor=False)
    return Path(base).expanduser() / "onnx"


def labels_root(model_cache: str | Path | None = None) -> Path:
    """Where label and vocabulary embeddings are kept beside the exports (<model cache>/labels): they depend only
    on the model, so every library on the machine shares them."""
    return cache_root(model_cache).parent / "labels"


def model_folder(spec: str) -> Path | None:
    """The model folder of a folder spec ('demo' included), else None (the torch encoder's `folder`)."""
    spec = spec.strip()
    if spec == "demo":
        return DEMO_DIR
    return Path(spec).resolve() if os.path.isdir(spec) else None


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def source_key(spec: str) -> str:
    """A torch-free identity of what a spec loads: its parts, the stat of local weight and config files, and the
    open_clip version. Equal keys load equal models; a changed file gives a new key (and a new export check)."""
    spec = spec.strip()
    parts: dict[str, Any] = {"format": FORMAT}
    folder = model_folder(spec)
    if folder is not None:
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "open_clip_config.json"]
        parts["folder"] = [_stat(p) for p in files if p.is_file()]
    else:
        arch, sep, weights = spec.partition(":")
        if not sep or not weights:
            raise UsageError(f"model spec '{spec}' must be ARCH:WEIGHTS (e.g. ViT-B-32:laion2b_s34b_b79k), "
                             "a model folder or 'demo'")
        parts["arch"] = _stat(Path(arch)) if arch.endswith(".json") and os.path.isfile(arch) else arch
        parts["weights"] = _stat(Path(weights)) if os.path.isfile(weights) else weights.lower()
    for dist in ("open_clip_torch", "timm"):
        try:
            parts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            parts[dist] = None
    return _digest_text(json.dumps(parts, sort_keys=True))[:20]


def pointer_path(root: Path, source: str) -> Path:
    """The file naming the space a source resolved to (or, ending .unsupported, why it cannot be exported)."""
    return root / "sources" / source


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that a reader sees the old or the new content, never a half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def find_export(root: Path, source: str) -> tuple[Path, ExportMeta] | None:
    """The export a source resolved to before, if its export.json is intact and every file it lists is present;
    the files' checksums are verified when each tower's session is built (see OnnxEncoder)."""
    try:
        space_key = pointer_path(root, source).read_text(encoding="utf-8").strip()
        folder = root / space_key
        meta = ExportMeta.from_json((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if meta.space.key != space_key:
        return None
    if not all((folder / name).is_file() for files in meta.files.values() for name in files):
        return None
    return folder, meta


def unsupported_reason(root: Path, source: str) -> str | None:
    """Why an earlier export of this source failed (recorded so `auto` does not retry it at every start)."""
    path = pointer_path(root, source).with_suffix(".unsupported")
    try:
        return path.read_text(encoding="utf-8").strip() or "unsupported"
    except OSError:
        return None


def _signature(path: Path) -> list[int]:
    """What changes whenever a file's bytes can have changed: size, inode, mtime and ctime (ctime is set by the
    kernel on every write, rename, chmod or utime, so a file edited and given its old mtime back still differs)."""
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _stamp_path(folder: Path, tower: str) -> Path:
    return folder / f".verified-{tower}.json"


def verify_files(folder: Path, meta: ExportMeta, tower: str) -> str | None:
    """None when every file of a tower matches its recorded SHA-256, else a one-line reason.

    Hashing a ViT-B-32 text tower (254 MB) costs ~0.2 s of CPU in every process that opens it, a fifth of a cold
    query. So, as git does for its index, a passed check is stamped with each file's stat signature, and a file
    whose signature still equals its stamp is not hashed again; any write to the file (or a replaced file) changes
    the signature and the next open hashes it in full."""
    stamp_path = _stamp_path(folder, tower)
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = {}
    fresh: dict[str, list[Any]] = {}
    for name, digest in meta.files[tower].items():
        path = folder / name
        try:
            sig = _signature(path)
            if stamp.get(name) != [digest, *sig] and file_sha256(path) != digest:
                return f"{path} does not match its checksum"
        except OSError as e:
            return f"{path} cannot be read ({e.strerror or e})"
        fresh[name] = [digest, *sig]
    if fresh != stamp:
        with contextlib.suppress(OSError):  # a read-only cache is checked in full every time, nothing worse
            write_atomic(stamp_path, json.dumps(fresh, sort_keys=True))
    return None


def remove_export(folder: Path) -> None:
    """Delete a folder after renaming it aside, so no reader ever opens a half-deleted export."""
    if folder.exists():
        aside = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


def tower_hashes(folder: Path) -> dict[str, dict[str, str]]:
    """SHA-256 of each tower's files (its graph and weights side file) in an export folder: export.json's `files`."""
    return {tower: {p.name: file_sha256(p) for p in sorted(folder.glob(f"{tower}.onnx*"))} for tower in TOWERS}


def intact_export(folder: Path, space: EmbeddingSpace) -> bool:
    """Whether `folder` holds a complete, unedited export of `space` (export.json readable, every file's SHA-256
    as recorded), so that a builder reuses it instead of building it again."""
    try:
        meta = ExportMeta.from_json((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return meta.space == space and all(verify_files(folder, meta, tower) is None for tower in meta.files)


def install_export(tmp: Path, final: Path) -> None:
    """Move a checked export from its temporary folder into place (readers see none or all of it). A damaged export
    there is removed first; when another process installs the same space meanwhile, theirs stays (it passed the
    same checks) and `tmp` is left for the caller to delete."""
    remove_export(final)
    with contextlib.suppress(OSError):
        os.rename(tmp, final)
