"""The CLI's service: a running `clipsearch serve` of the same home when there is one, else the in-process service.

A query answered by the server costs an HTTP request instead of importing the model stack and building the model
(seconds; bench/RESULTS.md, issue 13). `Routed` sends a call to the server only when the server can take it exactly
as asked: a method the client has, with arguments its signature accepts. Anything else (the encoder or the catalog
themselves, a seed command such as `explain`, an option the server does not offer) and any call the server cannot
answer (`ServerUnavailable`: it stopped, or a local image is over its upload cap) runs in-process, built on first
need. Errors the server answers (unknown id, bad image, empty library) are the same typed exceptions as in-process,
so exit codes and messages do not depend on where a command ran. `-v` says which path answered.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from clipsearch.indexer.errors import ServerUnavailable

log = logging.getLogger(__name__)

ROUTED_METHODS = frozenset({"search", "similar", "describe", "classify", "tag", "remove_tags"})


class Routed:
    """SearchService's interface over a server `client`, falling back to `local()` (built once, on first need)."""

    def __init__(self, client: Any, local: Callable[[], Any]) -> None:
        self.client, self._make_local, self._local = client, local, None
        self.answered_by_server = 0  # calls the server answered (for tests and -v)

    def local(self) -> Any:
        """The in-process service, built on first use (this is what imports the model stack)."""
        if self._local is None:
            self._local = self._make_local()
        return self._local

    def _fits(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any] | None:
        method = getattr(self.client, name, None) if name in ROUTED_METHODS else None
        if method is None:
            return None
        try:
            inspect.signature(method).bind(*args, **kwargs)
        except TypeError:
            log.info("the server does not take %s(%s): answering in-process", name, ", ".join(kwargs))
            return None
        return method

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in ROUTED_METHODS:
            return getattr(self.local(), name)

        def call(*args: Any, **kwargs: Any) -> Any:
            method = self._fits(name, args, kwargs)
            if method is not None:
                try:
                    result = method(*args, **kwargs)
                except ServerUnavailable as e:
                    log.info("the server at %s cannot answer %s (%s): answering in-process", self.client.url,
                             name, e)
                else:
                    self.answered_by_server += 1
                    log.info("%s answered by the server at %s", name, self.client.url)
                    return result
            return getattr(self.local(), name)(*args, **kwargs)

        return call
