"""A photo's status in the catalog: one StrEnum, so a typo is an AttributeError, not a silent new status."""

from __future__ import annotations

from enum import StrEnum


class PhotoStatus(StrEnum):
    """What happened to a catalogued file; stored as its string value."""

    INDEXED = "indexed"  # decoded and embedded
    FAILED = "failed"  # a supported format that could not be decoded (reason recorded)
    UNSUPPORTED = "unsupported"  # content is not an image format we decode (reason recorded)
    EMPTY = "empty"  # zero-byte file
