"""Built-in vocabularies and prompt templates for image→text and zero-shot.

They are text files under search/data (generated once from open_clip's zero-shot metadata), so that nothing here
imports torch or open_clip: the ONNX backend and a search without a model to load start without them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from clipsearch.indexer.errors import UsageError

DATA = Path(__file__).parent / "data"
VOCABULARIES = ("imagenet",)
_SIMPLE = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
           "a {} in a video game.", "art of the {}.", "a photo of the small {}.")  # open_clip's 7-template subset


def _lines(name: str) -> list[str]:
    """Non-comment lines of a bundled data file."""
    text = (DATA / name).read_text(encoding="utf-8")
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


@lru_cache(maxsize=4)
def vocabulary(name: str) -> list[str]:
    """Label names of a built-in vocabulary."""
    if name == "imagenet":
        return _lines("imagenet_classes.txt")
    raise UsageError(f"unknown vocabulary '{name}' (available: {', '.join(VOCABULARIES)})")


@lru_cache(maxsize=1)
def default_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates: the default ensemble for classification and labels."""
    return _lines("imagenet_templates.txt")


def templates_for(names: list[str]) -> list[str]:
    """The full ensemble for user label lists; the 7-template subset for large vocabularies (80k prompts is slow)."""
    return default_templates() if len(names) <= 100 else list(_SIMPLE)
