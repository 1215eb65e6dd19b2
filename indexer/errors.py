"""Typed exceptions. Only the CLI `main()` and the Streamlit pages turn them into exit codes or messages.

Every error carries a one-line, user-readable message; `exit_code` follows the CLI contract
(2 usage, 3 fatal).
"""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class: a failure we can explain to the user in one line."""

    exit_code: int = 3


class UsageError(ClipsearchError):
    """The user asked for something malformed (bad flag value, empty label list...)."""

    exit_code = 2


class ModelUnavailable(ClipsearchError):
    """Model weights could not be found locally nor downloaded."""


class CatalogError(ClipsearchError):
    """The SQL catalog cannot be opened, is from a newer version, or a query failed."""


class IndexUnavailable(ClipsearchError):
    """No usable vector index for the requested embedding space; `clipsearch reindex` fixes it."""


class PhotoNotFound(ClipsearchError):
    """An id or path that the catalog does not know."""

    exit_code = 2


class BadImage(ClipsearchError):
    """A query image that cannot be decoded safely (not an image, truncated, too large...)."""

    exit_code = 2


class EmptyLibrary(ClipsearchError):
    """A query against a catalog with no indexed photos in the current embedding space."""


class ClusterError(ClipsearchError):
    """The Ray engine cannot run: Ray is not installed (`pip install clipsearch[ray]`), the cluster address is
    unreachable, or the cluster failed the job (committed batches stay; a re-run completes it)."""


class LibraryBusy(ClipsearchError):
    """Another writer (a `clipsearch index` run) holds this library's writer lock; the message names it (pid, since
    when). Exit code 4, not 3: nothing is wrong with the library, so a script can wait and retry."""

    exit_code = 4


class ServerUnavailable(ClipsearchError):
    """A running `clipsearch serve` cannot answer this call (it stopped answering, or cannot take the input): the
    caller runs it in-process instead, so the user never sees this one."""


class TooLargeToUpload(ServerUnavailable):
    """A local image over the server's upload cap: the in-process path reads it directly."""
