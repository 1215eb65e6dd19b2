"""open_clip's ImageNet class names and prompt templates, read without importing open_clip (so without torch).

`open_clip/__init__.py` imports torch, so `from open_clip.zero_shot_metadata import ...` costs a zero-shot query on
the ONNX backend the seconds of start-up that backend avoids. The metadata module itself imports nothing, so it is
loaded here straight from its file in the installed open_clip package.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from clipsearch.indexer.errors import ModelUnavailable


@lru_cache(maxsize=1)
def _metadata() -> ModuleType:
    found = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    folders = list(found.submodule_search_locations or []) if found else []
    path = next((Path(f) / "zero_shot_metadata.py" for f in folders if (Path(f) / "zero_shot_metadata.py").is_file()),
                None)
    if path is None:
        raise ModelUnavailable("open_clip's zero_shot_metadata.py is not installed (pip install open_clip_torch)")
    spec = importlib.util.spec_from_file_location("_clipsearch_open_clip_zero_shot_metadata", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet class names from open_clip's zero-shot metadata (a built-in vocabulary)."""
    return list(_metadata().IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates as ``{}`` format strings (the default prompt ensemble)."""
    return [t("{}") if callable(t) else str(t) for t in _metadata().OPENAI_IMAGENET_TEMPLATES]
