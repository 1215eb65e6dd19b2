"""Readers for captioned image sets (training and evaluation) and ImageFolder class layouts.

Caption layouts: Flickr8k ``captions.txt`` (``image,caption`` lines, several per image), Flickr8k tokens
(``image#n<TAB>caption``), CSV or JSONL with a path and a caption column, and Karpathy-split JSON
(Flickr30k / COCO ``dataset_*.json``; the ``test`` split is used when present).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.ingest.decode import IMAGE_EXTENSIONS

_PATH_KEYS = ("image", "path", "filepath", "file", "filename", "image_path")
_TEXT_KEYS = ("caption", "text", "title", "sentence")


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for k in keys:
        if k in row and row[k]:
            return str(row[k])
    raise UsageError(f"{where}: needs one of the columns {', '.join(keys)}")


def load_caption_pairs(root: Path, captions: str) -> dict[Path, list[str]]:
    """image path → its captions, from any supported layout; paths are resolved against `root`."""
    path = Path(captions) if Path(captions).is_absolute() else root / captions
    if not path.is_file():
        raise UsageError(f"caption file not found: {path}")
    out: dict[Path, list[str]] = {}

    def add(rel: str, caption: str) -> None:
        caption = caption.strip()
        if caption:
            out.setdefault((root / rel.strip()).resolve(), []).append(caption)

    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        imgs = data.get("images", [])
        test = [im for im in imgs if im.get("split") == "test"] or imgs
        for im in test:
            rel = str(Path(im.get("filepath", "")) / im["filename"])
            for s in im.get("sentences", []):
                add(rel, s.get("raw", ""))
    elif suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                add(_pick(row, _PATH_KEYS, f"{path}:{n}"), _pick(row, _TEXT_KEYS, f"{path}:{n}"))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            first = f.readline()
            f.seek(0)
            if "\t" in first and "#" in first.split("\t")[0]:  # Flickr8k.token.txt
                for line in f:
                    if "\t" in line:
                        img, cap = line.split("\t", 1)
                        add(img.split("#")[0], cap)
            elif suffix == ".csv" and first.count(",") > 1:
                for n, row in enumerate(csv.DictReader(f), 2):
                    add(_pick(row, _PATH_KEYS, f"{path}:{n}"), _pick(row, _TEXT_KEYS, f"{path}:{n}"))
            else:  # Flickr8k captions.txt: image,caption (the caption may contain commas)
                for n, line in enumerate(f):
                    if n == 0 and line.lower().startswith("image,"):
                        continue
                    if "," in line:
                        img, cap = line.rstrip("\n").split(",", 1)
                        add(img, cap.strip().strip('"'))
    if not out:
        raise UsageError(f"no image,caption pairs found in {path}")
    missing = [p for p in out if not p.is_file()]
    if missing:
        raise UsageError(f"{len(missing)} images named in {path.name} are missing, e.g. {missing[0]}")
    return out


def image_folder_classes(root: Path) -> dict[str, list[Path]]:
    """ImageFolder layout: class name (folder name, '_' as space) → its images; {} when not that layout."""
    classes: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            classes[d.name.replace("_", " ")] = files
    return classes if len(classes) >= 2 else {}
