"""A stdlib-only client for a running `clipsearch serve` of the same home: how the CLI answers without a model.

Discovery goes through HOME/server.json, which the server writes (mode 0600) once it listens and removes when it
stops: ``{pid, host, port, url, token, home, db, model, max_upload_mb, version}``. A file whose process is gone,
whose catalog or model differs from what the caller asked for, or whose server does not answer its health check
in time is ignored, so a crashed server never makes a command fail: the caller falls back to in-process.

Only the standard library and clipsearch's own light modules are imported here (no numpy, torch, faiss or
sqlalchemy): a command answered by a server starts in a fraction of a second. `Client` has SearchService's method
signatures and its replies are the JSON the CLI prints with ``--json``, readable like the service's results; server
errors come back as the same typed exceptions, so exit codes do not change. `ServerUnavailable` means "run this
call in-process" (the server stopped answering, or an image is over its upload cap).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.indexer import errors
from clipsearch.indexer.config import AppConfig

SERVER_FILE = "server.json"


ServerUnavailable, TooLargeToUpload = errors.ServerUnavailable, errors.TooLargeToUpload  # re-exported


def server_file(config: AppConfig) -> Path:
    """Where a server for this home announces itself."""
    return config.home / SERVER_FILE


def db_key(config: AppConfig) -> str:
    """A digest of the catalog URL (never the URL itself: it may hold a password) to match a server's catalog."""
    return hashlib.sha256(config.resolved_db_url.encode()).hexdigest()[:16]


def write_server_file(config: AppConfig, info: dict[str, Any]) -> Path:
    """Atomically write the discovery file, readable by its owner only (it may hold the token)."""
    path = server_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SERVER_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)
    return path


def remove_server_file(config: AppConfig, pid: int) -> None:
    """Remove the discovery file if it is still this process's (a newer server may have replaced it)."""
    info = read_server_file(config)
    if info is not None and info.get("pid") == pid:
        server_file(config).unlink(missing_ok=True)


def read_server_file(config: AppConfig) -> dict[str, Any] | None:
    """The discovery file's content, or None when absent or unreadable."""
    try:
        info = json.loads(server_file(config).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def find_server(config: AppConfig, timeout: float = 1.0) -> Client | None:
    """A client for a live server of this config's home, catalog and model, or None (then run in-process).

    The model must match only when the caller names one: a plain command uses whatever model the library (and so
    the server) uses, as the in-process path would.
    """
    info = read_server_file(config)
    if info is None or not _pid_alive(info.get("pid")) or info.get("db") != db_key(config):
        return None
    if config.model and config.model != info.get("model"):
        return None
    client = Client(str(info.get("url", "")), info.get("token"), timeout=timeout,
                    max_upload_mb=float(info.get("max_upload_mb") or 0) or None)
    try:
        health = client.health()
    except errors.ClipsearchError:
        return None
    if health.get("pid") != info.get("pid"):
        return None
    client.timeout = None  # found: from now on a query may take as long as it takes (a big tagging run)
    return client


class Record(dict):
    """A reply object exactly as `--json` prints it, also readable like the service's result objects (r.score,
    p.dry_run, r.as_dict()), so the CLI prints a server's answer with the same code as an in-process one."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts and lists all the way down (what `--json` prints)."""
        return json.loads(json.dumps(self))


def _records(value: Any) -> Any:
    if isinstance(value, dict):
        return Record({k: _records(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_records(v) for v in value]
    return value


@dataclass
class RemotePage:
    """A page as the server sent it, shaped like SearchPage (hits, paging, counts) so the CLI prints either one;
    `as_list()` is exactly what `--json` prints."""

    hits: list[Record]
    offset: int
    limit: int
    has_more: bool
    strong_cutoff: float | None = None
    counts: dict[str, int] | None = None  # text queries: photos per relevance label
    counts_exact: bool = True
    note: str | None = None

    def as_list(self) -> list[dict[str, Any]]:
        """The hits as dicts (what `--json` prints)."""
        return [h.as_dict() for h in self.hits]


@dataclass
class _Multipart:
    """A multipart/form-data body built with the standard library (fields and files, in order)."""

    parts: list[tuple[str, str | tuple[str, bytes]]] = field(default_factory=list)

    def encode(self) -> tuple[bytes, str]:
        boundary = secrets.token_hex(16)
        out = bytearray()
        for name, value in self.parts:
            out += f"--{boundary}\r\n".encode()
            if isinstance(value, tuple):
                filename = urllib.parse.quote(value[0])
                out += (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                        "Content-Type: application/octet-stream\r\n\r\n").encode()
                out += value[1]
            else:
                out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode()
            out += b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        return bytes(out), f"multipart/form-data; boundary={boundary}"


def _local_file(value: Any) -> bytes | None:
    """The bytes of a local label/template file the caller named (the CLI's `--labels FILE`), else None."""
    if isinstance(value, str) and "\n" not in value and os.path.isfile(os.path.expanduser(value)):
        try:
            with open(os.path.expanduser(value), "rb") as f:
                return f.read()
        except OSError as e:
            raise errors.UsageError(f"cannot read {value}: {e.strerror or e}") from e
    return None


def _text_lines(data: bytes) -> list[str]:
    """A label/template file's items as the server reads an uploaded one: one per line, blank and # lines out."""
    text = data.decode("utf-8-sig", errors="replace")
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def _add_text(form: _Multipart, name: str, value: str | list[str] | None) -> None:
    """Labels/templates: text as a field; a local file, or a list, as an uploaded text file (one item per line,
    so a single item is never split on its commas)."""
    data = _local_file(value)
    if data is None and isinstance(value, list):
        data = ("\n".join(value) + "\n").encode()
    if data is not None:
        form.parts.append((name, (f"{name}.txt", data)))
    elif value is not None:
        form.parts.append((name, value))  # type: ignore[arg-type]


def _json_text(value: str | list[str] | None) -> str | list[str] | None:
    """Labels/templates for a JSON body: a local file becomes its list of lines."""
    data = _local_file(value)
    return _text_lines(data) if data is not None else value


def _error_from(status: int, body: bytes) -> errors.ClipsearchError:
    """The typed exception the server reported (same class, so the CLI's exit code is unchanged)."""
    try:
        data = json.loads(body)
        message, kind = str(data.get("error", "")), str(data.get("type", ""))
    except (ValueError, AttributeError):
        message, kind = body.decode("utf-8", "replace").strip()[:300], ""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ClipsearchError)):
        cls = errors.UsageError if 400 <= status < 500 else errors.ClipsearchError
    return cls(message or f"server answered HTTP {status}")


class Client:
    """Calls one running server with SearchService's method signatures, so the CLI can use either one: results are
    what the CLI prints with `--json`, readable like the service's result objects (RemotePage, Record)."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None,
                 max_upload_mb: float | None = None) -> None:
        self.url, self.token, self.timeout, self.max_upload_mb = url.rstrip("/"), token, timeout, max_upload_mb
        self.last_headers: dict[str, str] = {}

    def request(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        """One HTTP call; `body` is a dict (sent as JSON) or a _Multipart. Returns the decoded JSON reply."""
        query = urllib.parse.urlencode([(k, _plain(v)) for k, vals in (params or {}).items()
                                        for v in (vals if isinstance(vals, list | tuple) else [vals])
                                        if v is not None], doseq=False)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if isinstance(body, _Multipart):
            data, headers["Content-Type"] = body.encode()
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(f"{self.url}{path}{'?' + query if query else ''}", data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                self.last_headers = {k.lower(): v for k, v in resp.headers.items()}
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise _error_from(e.code, e.read()) from e
        except (OSError, ValueError) as e:  # refused, reset, timed out, or not JSON: not a usable server
            raise ServerUnavailable(f"the clipsearch server at {self.url} did not answer: {e}") from e

    def health(self) -> dict[str, Any]:
        """Who the server is: pid, home, model, version."""
        return self.request("GET", "/api/health")

    def status(self) -> dict[str, Any]:
        """What `clipsearch status --json` prints."""
        return self.request("GET", "/api/status")

    def search(self, query: str, k: int = 20, offset: int = 0, filters: Any = None, strong: bool = False,
               sort: str = "relevance", stack: bool = False) -> RemotePage:
        """As SearchService.search. A combined query naming a local image file is the in-process path's to answer
        (the server reads no paths): ServerUnavailable."""
        from clipsearch.search.query import parse_query  # light: no numpy, no model

        if any(t.kind == "image" for t in parse_query(query)):
            raise ServerUnavailable("the query names a local image file: answered in-process")
        params = {"q": query, "k": k, "offset": offset, "strong": strong, "sort": sort, "stack": stack or None,
                  **_filter_params(filters)}
        return self._page(self.request("GET", "/api/search", params))

    def similar(self, ref: int | str | bytes, k: int = 20, offset: int = 0, filters: Any = None,
                strong: bool = False, sort: str = "relevance", box: Any = None, stack: bool = False) -> RemotePage:
        """As SearchService.similar: an indexed id, a local image file (uploaded) or image bytes; `box` as
        (x, y, w, h) or "x,y,w,h"."""
        if box is not None and not isinstance(box, str):
            box = ",".join(str(int(v)) for v in box)
        params = {"k": k, "offset": offset, "strong": strong, "sort": sort, "box": box, "stack": stack or None,
                  **_filter_params(filters)}
        if isinstance(ref, int):
            return self._page(self.request("GET", f"/api/similar/{ref}", params))
        form = _Multipart()
        self._add_image(form, "image", ref)
        return self._page(self.request("POST", "/api/similar", params, form))

    def describe(self, image: int | str | bytes, labels: str | list[str] | None = None, vocab: str | None = None,
                 texts: str | None = None, k: int = 10, templates: str | list[str] | None = None) -> list[Record]:
        """As SearchService.describe; `labels`/`templates` are text, a list, or a local file (read here)."""
        form = _Multipart()
        self._add_image(form, "image", image)
        _add_text(form, "labels", labels)
        _add_text(form, "templates", templates)
        _add_fields(form, {"vocab": vocab, "texts": texts, "k": k})
        return _records(self.request("POST", "/api/describe", body=form))

    def classify(self, images: list[int | str | bytes], labels: str | list[str],
                 templates: str | list[str] | None = None, multi_label: bool = False, threshold: float | None = None,
                 k: int = 5) -> list[Record]:
        """As SearchService.classify; each result's `source` is the image as given (path or #id), as in-process."""
        form = _Multipart()
        for image in images:
            self._add_image(form, "images", image)
        _add_text(form, "labels", labels)
        _add_text(form, "templates", templates)
        _add_fields(form, {"multi_label": multi_label, "threshold": threshold, "k": k})
        results = _records(self.request("POST", "/api/classify", body=form))
        for result, image in zip(results, images, strict=False):
            if isinstance(image, str) and not image.isdigit():
                result["source"] = image
        return results

    def tag(self, labels: str | list[str], name: str | None = None, threshold: float | None = None,
            multi_label: bool = False, filters: Any = None, dry_run: bool = False,
            templates: str | list[str] | None = None, on_progress: Any = None, strong_only: bool = False) -> Record:
        """As SearchService.tag (the server reports no progress: `on_progress` is not called)."""
        body = {"labels": _json_text(labels), "name": name, "threshold": threshold, "multi_label": multi_label,
                "dry_run": dry_run, "strong_only": strong_only, "templates": _json_text(templates),
                **_filter_params(filters)}
        return _records(self.request("POST", "/api/tag", body={k: v for k, v in body.items() if v is not None}))

    def remove_tags(self, label_set: str) -> int:
        """As SearchService.remove_tags: how many tags went."""
        return int(self.request("DELETE", f"/api/tags/{urllib.parse.quote(label_set, safe='')}")["removed"])

    def _page(self, hits: list[dict[str, Any]]) -> RemotePage:
        h = self.last_headers
        cutoff, counts, note = h.get("x-strong-cutoff"), h.get("x-counts"), h.get("x-note")
        return RemotePage(_records(hits), int(h.get("x-offset", 0)), int(h.get("x-limit", len(hits))),
                          h.get("x-has-more") == "true", float(cutoff) if cutoff else None,
                          json.loads(counts) if counts else None, h.get("x-counts-exact", "true") == "true",
                          json.loads(note) if note else None)

    def _add_image(self, form: _Multipart, name: str, image: int | str | bytes) -> None:
        """An id goes as a field; a local file or bytes as an upload (checked against the server's cap first)."""
        if isinstance(image, int) or (isinstance(image, str) and image.isdigit() and not os.path.exists(image)):
            form.parts.append((name, str(image)))
            return
        if isinstance(image, bytes):
            filename, data = "upload", image
        else:
            try:
                with open(os.path.expanduser(image), "rb") as f:
                    filename, data = os.path.basename(image), f.read()
            except OSError as e:
                raise errors.BadImage(f"cannot read image {image}: {e.strerror or e}") from e
        if self.max_upload_mb and len(data) > self.max_upload_mb * 2**20:
            raise TooLargeToUpload(f"{filename} is {len(data) / 2**20:.0f} MB; the server takes at most "
                                  f"{self.max_upload_mb:g} MB per upload")
        form.parts.append((name, (filename, data)))


def _plain(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _filter_params(filters: Any) -> dict[str, Any]:
    """A PhotoFilter (or anything with its attributes: folder, after, before, tags, formats) as query parameters."""
    if filters is None:
        return {}
    out: dict[str, Any] = {"folder": getattr(filters, "folder", None) or None}
    for name in ("after", "before"):
        value = getattr(filters, name, None)
        out[name] = value.isoformat() if hasattr(value, "isoformat") else value
    out["tag"] = list(getattr(filters, "tags", ()) or ())
    out["format"] = list(getattr(filters, "formats", ()) or ())
    return {k: v for k, v in out.items() if v not in (None, "", [])}


def _add_fields(form: _Multipart, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                form.parts.append((name, _plain(v)))
