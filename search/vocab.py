"""Built-in vocabularies and prompt templates for image→text and zero-shot (from open_clip's metadata)."""

from __future__ import annotations

from functools import lru_cache

from clipsearch.indexer.errors import UsageError
from clipsearch.indexer.model.torch_encoder import imagenet_classnames, imagenet_templates

VOCABULARIES = ("imagenet",)
_SIMPLE = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
           "a {} in a video game.", "art of the {}.", "a photo of the small {}.")  # open_clip's 7-template subset


@lru_cache(maxsize=4)
def vocabulary(name: str) -> list[str]:
    """Label names of a built-in vocabulary."""
    if name == "imagenet":
        return imagenet_classnames()
    raise UsageError(f"unknown vocabulary '{name}' (available: {', '.join(VOCABULARIES)})")


@lru_cache(maxsize=1)
def default_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates: the default ensemble for classification and labels."""
    return imagenet_templates()


def templates_for(names: list[str]) -> list[str]:
    """The full ensemble for user label lists; the 7-template subset for large vocabularies (80k prompts is slow)."""
    return default_templates() if len(names) <= 100 else list(_SIMPLE)
