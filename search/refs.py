"""What a photo reference on the command line means, without importing the search stack (numpy, FAISS, the model):
the CLI parses references before it knows whether a running server or the in-process service will answer."""

from __future__ import annotations

import os

ImageRef = int | str | bytes  # an indexed photo id, an image file path, or raw image bytes


def image_ref(value: ImageRef) -> ImageRef:
    """A string of digits that is not an existing file means a photo id; anything else is kept as given."""
    if isinstance(value, str) and value.isdigit() and not os.path.exists(value):
        return int(value)
    return value
