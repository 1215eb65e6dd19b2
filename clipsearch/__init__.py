"""clipsearch: search a photo library by meaning.

The Python API is one object per library::

    import clipsearch

    lib = clipsearch.open(home="~/.clipsearch-demo", model="demo")
    lib.index(["~/Pictures"])
    page = lib.search("dog on a beach at sunset", k=10)

Importing this package is cheap: torch, open_clip and FAISS load only when a call needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipsearch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from clipsearch.api import Library, make_sample, open  # noqa: E402  (after __version__)

__all__ = ["Library", "__version__", "make_sample", "open"]
