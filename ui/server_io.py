"""The query server's edges: reading requests safely, writing replies and errors, and the request guard.

Kept apart from the routes (ui/server.py) so that every rule about untrusted input sits in one place: bodies are
capped before they are parsed, uploads are the only images, labels and templates are text (never a path the server
would open), catalogued originals are served only while unchanged, and every failure is one line of JSON.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_origin

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipsearch.indexer import errors
from clipsearch.indexer.config import AppConfig
from clipsearch.indexer.status import PhotoStatus
from clipsearch.indexer.storage.filters import PhotoFilter
from clipsearch.search.results import SearchPage
from clipsearch.search.service import ImageRef, SearchService
from clipsearch.search.zeroshot import label_lines

log = logging.getLogger(__name__)

FORM_SLACK = 1 << 20  # bytes allowed over max_upload_mb for multipart framing and text fields
MAX_FILES = 64  # uploads per request (classify)
MAX_FIELD = 2 << 20  # bytes of one text field (a long label list)
TEXT_FILE_FIELDS = ("labels", "templates")  # text fields that may also come as one uploaded text file
_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
          "TIFF": "image/tiff", "HEIF": "image/heif", "AVIF": "image/avif"}
_NO_PATHS = "the server never reads a path: send a photo id or upload the file"


class UploadTooLarge(errors.BadImage):
    """A request body over the upload cap (answered 413 before it is parsed)."""


# --- replies -----------------------------------------------------------------------------------------------------
def one_line(e: BaseException | str) -> str:
    """The first line of a message, bounded: replies never carry tracebacks or multi-line dumps."""
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:500]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON exactly as the CLI's `--json` serialises it (dates and paths as strings)."""
    body = json.dumps(data, default=str, ensure_ascii=False)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    """The one error shape: {"error": one line, "type": the exception class the CLI would raise}."""
    return json_response({"error": one_line(message) or "error", "type": kind}, status, headers)


def page_response(page: SearchPage) -> Response:
    """A page's hits (the CLI's --json list) with the paging facts in headers."""
    headers = {"X-Offset": str(page.offset), "X-Limit": str(page.limit),
               "X-Has-More": "true" if page.has_more else "false"}
    if page.strong_cutoff is not None:
        headers["X-Strong-Cutoff"] = repr(float(page.strong_cutoff))
    if getattr(page, "counts", None) is not None:  # text queries: photos per relevance label
        headers["X-Counts"] = json.dumps(page.counts)
        headers["X-Counts-Exact"] = "true" if getattr(page, "counts_exact", True) else "false"
    if getattr(page, "note", None):
        headers["X-Note"] = json.dumps(page.note)  # ASCII-escaped: header values are latin-1
    return json_response(page.as_list(), headers=headers)


_STATUS: list[tuple[type[errors.ClipsearchError], int]] = [
    (UploadTooLarge, 413), (errors.PhotoNotFound, 404), (errors.BadImage, 422), (errors.EmptyLibrary, 409),
    (errors.UsageError, 400), (errors.ModelUnavailable, 503), (errors.IndexUnavailable, 503),
    (errors.CatalogError, 503)]


def status_for(e: errors.ClipsearchError) -> int:
    """HTTP status of a typed error; an unknown subclass follows its CLI exit code (2 usage → 400, else 503)."""
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return 400 if e.exit_code == 2 else 503


def _kind(e: BaseException) -> str:
    """The nearest class the client can find in clipsearch.indexer.errors (so it raises the same type)."""
    for cls in type(e).__mro__:
        if getattr(errors, cls.__name__, None) is cls:
            return cls.__name__
    return "ClipsearchError"


def _validation_line(errs: list[Any]) -> str:
    first = errs[0] if errs else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid request')}{more}"


def install_error_handlers(app: FastAPI) -> None:
    """Typed errors → 4xx/503, bad parameters → 400, unknown routes → 404, anything else → a logged 500."""

    async def typed(_request: Request, e: Exception) -> Response:
        assert isinstance(e, errors.ClipsearchError)
        return error_response(status_for(e), str(e), _kind(e))

    async def invalid(_request: Request, e: Exception) -> Response:
        return error_response(400, _validation_line(e.errors()), "UsageError")  # type: ignore[attr-defined]

    async def http(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        detail = e.detail if e.status_code != 404 or e.detail != "Not Found" else f"not found: {request.url.path}"
        return error_response(e.status_code, str(detail), "UsageError" if e.status_code < 500 else "ClipsearchError",
                              dict(e.headers or {}))

    async def crash(request: Request, e: Exception) -> Response:
        log.error("internal error on %s %s: %s", request.method, request.url.path, one_line(repr(e)))
        return error_response(500, f"internal error: {type(e).__name__}: {one_line(e)}", "InternalError")

    app.add_exception_handler(errors.ClipsearchError, typed)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, crash)


# --- the guard: token and body cap, before any route runs --------------------------------------------------------
class Guard:
    """ASGI middleware: checks the bearer token (when one is set) and caps request bodies.

    A declared Content-Length over the cap is answered 413 at once, without reading the body; a chunked body is
    counted as it streams and cut off with the same 413 when it passes the cap. Replies carry a Server-Timing
    header (time inside the app), so a client can tell the HTTP hop from the work.
    """

    def __init__(self, app: ASGIApp, token: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            reply = error_response(401, "missing or wrong token: send `Authorization: Bearer TOKEN`", "UsageError",
                                   {"WWW-Authenticate": "Bearer"})
            await reply(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            reply = error_response(413 if declared.isdigit() else 400, self._too_large() if declared.isdigit()
                                   else "bad Content-Length", "BadImage" if declared.isdigit() else "UsageError")
            await reply(scope, receive, send)
            return
        seen, started = 0, time.perf_counter()

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise UploadTooLarge(self._too_large())
            return message

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":  # Server-Timing: what the HTTP hop adds is measurable
                took = f"app;dur={(time.perf_counter() - started) * 1000:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", took)]}
            await send(message)

        await self.app(scope, counted, timed)

    def _too_large(self) -> str:
        return f"the request body is over the {(self.max_body - FORM_SLACK) / 2**20:g} MB upload limit"


# --- request bodies ----------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimilarBody(_Body):
    """POST /api/similar: the image as a multipart upload `image` (or a photo id); ranking options in the query."""

    image: int | None = Field(None, description="an indexed photo id (or upload a file as multipart `image`)")


class DescribeBody(_Body):
    """POST /api/describe: one image and exactly one of labels, vocab, texts."""

    image: int | None = Field(None, description="an indexed photo id (or upload a file as multipart `image`)")
    labels: str | list[str] | None = Field(None, description="text: 'a,b,c', one per line, or a list")
    vocab: str | None = Field(None, description="a built-in vocabulary (imagenet)")
    texts: str | None = Field(None, description="a caption collection added with `clipsearch texts add`")
    templates: str | list[str] | None = Field(None, description="prompt templates with {}, one per line or a list")
    k: int = Field(10, ge=1, le=1000)


class ClassifyBody(_Body):
    """POST /api/classify: photo ids and/or uploads in `images`, in the order results should come."""

    images: list[int] = Field(default_factory=list, max_length=1000, description="photo ids (or uploads)")
    labels: str | list[str] = Field(..., description="text: 'a,b=0.7,c', one per line, or a list")
    templates: str | list[str] | None = Field(None, description="prompt templates with {}, one per line or a list")
    multi_label: bool = False
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    k: int = Field(5, ge=1, le=1000)


class TagBody(_Body):
    """POST /api/tag: label the library (or preview with dry_run), optionally only the filtered photos."""

    labels: str | list[str] = Field(..., description="text: 'a,b=0.7,c', one per line, or a list")
    name: str | None = Field(None, max_length=200, description="label set name (default 'zeroshot')")
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    multi_label: bool = False
    dry_run: bool = False
    strong_only: bool = Field(False, description="tag only the strong matches of each label (as `tag --strong`)")
    templates: str | list[str] | None = None
    folder: str | None = None
    after: str | None = None
    before: str | None = None
    tag: list[str] = Field(default_factory=list)
    format: list[str] = Field(default_factory=list)


def body_doc(model: type[BaseModel], upload_field: str | None, many: bool) -> dict[str, Any]:
    """OpenAPI requestBody for a route that reads JSON or multipart itself (so /docs shows both forms)."""
    schema = model.model_json_schema()
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if upload_field:
        props = dict(schema.get("properties", {}))
        binary = {"type": "string", "format": "binary"}
        props[upload_field] = {"type": "array", "items": binary} if many else binary
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": props}}
    return {"requestBody": {"required": True, "content": content}}


def _is_list_field(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    return info is not None and get_origin(info.annotation) is list


async def read_body(request: Request, model: type[BaseModel], image_field: str | None) -> tuple[Any, list[ImageRef]]:
    """Parse a JSON or multipart body into `model` plus the images (ids or uploaded bytes, in order)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw_images: list[Any] = []
    if ctype == "application/json":
        try:
            data = json.loads(await request.body())
        except ValueError as e:
            raise errors.UsageError(f"malformed JSON body: {one_line(e)}") from e
        if not isinstance(data, dict):
            raise errors.UsageError("the JSON body must be an object")
        if image_field and image_field in data:
            value = data.pop(image_field)
            raw_images = value if isinstance(value, list) else [value]
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=MAX_FILES, max_part_size=MAX_FIELD)
        data = {}
        for key in dict.fromkeys(form.keys()):
            values = form.getlist(key)
            if key == image_field:
                raw_images = values
            elif any(isinstance(v, UploadFile) for v in values):
                data[key] = await _text_file(key, values)
            else:
                data[key] = values if _is_list_field(model, key) or len(values) > 1 else values[0]
    else:
        raise HTTPException(415, "send application/json or multipart/form-data")
    body = model.model_validate(data)
    return body, [await _image_ref(v) for v in raw_images]


async def _text_file(key: str, values: list[Any]) -> list[str]:
    """An uploaded label or template file: its lines, read exactly as the CLI reads `--labels FILE`."""
    if key not in TEXT_FILE_FIELDS or len(values) != 1 or not isinstance(values[0], UploadFile):
        raise errors.UsageError(f"`{key}` takes text{' (or one uploaded file)' if key in TEXT_FILE_FIELDS else ''}")
    return label_lines(await values[0].read(), values[0].filename or "upload")


async def _image_ref(value: Any) -> ImageRef:
    """An uploaded file's bytes, or a photo id; a string that is not an id is refused, never opened."""
    if isinstance(value, UploadFile):
        data = await value.read()
        if not data:
            raise errors.BadImage(f"the upload {value.filename or ''} is empty".replace("  ", " "))
        return data
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise errors.UsageError(f"{str(value)[:100]!r} is not a photo id; {_NO_PATHS}")


def one_ref(refs: list[ImageRef], what: str) -> ImageRef:
    """The single image a route needs."""
    if len(refs) != 1:
        raise errors.UsageError(f"{what} needs exactly one image (a photo id or an uploaded file), got {len(refs)}")
    return refs[0]


# --- arguments ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rank:
    """Ranking options shared by search and similar."""

    k: int
    offset: int
    strong: bool
    sort: str
    filters: PhotoFilter
    stack: bool = False  # fold near-duplicates into one hit with a count (search/stacks.py)


def _date(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as e:
        raise errors.UsageError(f"{name} expects YYYY-MM-DD, got {value[:40]!r}") from e


def photo_filter(folder: str | None, after: str | None, before: str | None, tags: list[str],
                 formats: list[str]) -> PhotoFilter:
    """The CLI's filters (a folder filter only narrows catalogued paths; nothing is read from it)."""
    return PhotoFilter(folder=folder or None, after=_date(after, "after"), before=_date(before, "before"),
                       tags=tuple(tags), formats=tuple(formats))


def _looks_like_path(text: str) -> bool:
    return text.strip().startswith(("/", "~", "./", "../", "\\"))


def checked_labels(value: str | list[str]) -> str | list[str]:
    """Labels as given, refusing what looks like a server path: labels are text (the service never opens a file
    either; this says so in one line instead of tagging photos with a label named "/etc/passwd")."""
    items = value if isinstance(value, list) else value.splitlines() if "\n" in value else value.split(",")
    for item in items:
        if _looks_like_path(item):
            raise errors.UsageError(f"labels are text, and {item.strip()[:100]!r} looks like a file path: the "
                                    "server never reads files; send the labels themselves (or upload the file)")
    return value


# --- photos and status -------------------------------------------------------------------------------------------
def original_file(svc: SearchService, photo_id: int) -> tuple[str, str]:
    """Path and media type of a catalogued photo's file, if it is still the file that was indexed."""
    row = svc.catalog.photos_by_id([photo_id]).get(photo_id)
    if row is None or row["status"] != PhotoStatus.INDEXED:
        raise errors.PhotoNotFound(f"no indexed photo with id {photo_id}")
    path = os.fsdecode(bytes(row["path_bytes"]))
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.PhotoNotFound(f"photo #{photo_id} is no longer on disk") from e
    if not stat.S_ISREG(st.st_mode) or st.st_size != row["size"] or st.st_mtime_ns != row["mtime_ns"]:
        raise errors.PhotoNotFound(f"photo #{photo_id} changed on disk since it was indexed (re-index to serve it)")
    return path, _MEDIA.get(str(row["format"] or "").upper(), "application/octet-stream")


def status_data(config: AppConfig) -> dict[str, Any]:
    """What `clipsearch status --json` prints (shared code, so the shapes cannot drift)."""
    try:
        from clipsearch.ui.status import status_data as data  # type: ignore[import-not-found]
    except ImportError:
        from clipsearch.ui.commands import status_data as data
    return data(config)


def warm(svc: SearchService) -> None:
    """Load the index, the calibration sample and the text path once, so the first client query is warm too."""
    try:
        svc.search("a photo", k=1)
    except errors.ClipsearchError as e:  # an empty library is fine: it fills while the server runs
        log.info("warm-up skipped: %s", one_line(e))
