"""`clipsearch serve`: one warm SearchService (model and indexes loaded) behind a local HTTP API (FastAPI + uvicorn).

Why a server: a fresh process pays for importing torch and building the model on every query; a warm one answers
in milliseconds, and the CLI (through ui/client.py) and scripts share it. Replies are the JSON the CLI prints with
``--json``; what the CLI's text output adds travels in headers (X-Offset, X-Limit, X-Has-More, X-Strong-Cutoff,
X-Counts, X-Counts-Exact, X-Note) so bodies stay equal.

Safety rules: it binds 127.0.0.1 unless told otherwise, and a non-loopback bind needs a token that every request
then carries (``Authorization: Bearer TOKEN``). Photos are served by catalogue id only; the server never opens a
path a client names (query images are ids or uploads, labels and templates are text). Uploads are capped at
``config.max_upload_mb``. Every error is a 4xx/5xx with a one-line ``{"error": ..., "type": ...}``.

Freshness: each query reads the space's catalog generation (SearchService → VectorStore), so photos indexed by
another process while the server runs are searchable without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from clipsearch.indexer import errors
from clipsearch.indexer.config import AppConfig
from clipsearch.search.service import SearchOptions, SearchService

from . import server_io as io
from .client import db_key, find_server, remove_server_file, write_server_file

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765
MIN_TOKEN = 16  # characters: a non-loopback server is reachable by anyone on the network
MAX_K = SearchOptions().max_k
MAX_OFFSET = 1_000_000


class _Route(APIRoute):
    """Routes whose unexpected failures become a logged one-line 500, never a traceback in the reply."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (errors.ClipsearchError, HTTPException, RequestValidationError, ValidationError):
                raise
            except Exception as e:  # a bug: log it whole, answer one line
                log.exception("internal error on %s %s", request.method, request.url.path)
                return io.error_response(500, f"internal error: {type(e).__name__}: {io.one_line(e)}",
                                         "InternalError")

        return guarded


api = APIRouter(prefix="/api", route_class=_Route)


def _svc(request: Request) -> SearchService:
    return request.app.state.service


def _rank(k: int = Query(20, ge=1, le=MAX_K, description="hits per page"),
          offset: int = Query(0, ge=0, le=MAX_OFFSET, description="skip this many hits"),
          strong: bool = Query(False, description="only strong matches (calibrated cutoff)"),
          sort: Literal["relevance", "date"] = "relevance",
          folder: str | None = Query(None, description="only photos under this folder"),
          after: str | None = Query(None, description="only photos dated on/after (ISO date)"),
          before: str | None = Query(None, description="only photos dated before (ISO date)"),
          tag: list[str] = Query([], description="only photos with this tag (repeatable)"),
          format: list[str] = Query([], description="only this file type, e.g. JPEG (repeatable)"),
          stack: bool = Query(False, description="fold near-duplicates into one hit with a `stack` count")) -> io.Rank:
    return io.Rank(k, offset, strong, sort, io.photo_filter(folder, after, before, tag, format), stack)


def _box(box: str | None = Query(None, max_length=100, description="search with this region only: x,y,w,h in "
                                                                    "the photo's upright pixels")) -> str | None:
    return box


@api.get("/health", summary="Who this server is (the CLI's discovery check)")
def health(request: Request) -> Response:
    """pid, home, model and version: a client checks these before trusting HOME/server.json."""
    from clipsearch import __version__

    svc, cfg = _svc(request), request.app.state.config
    return io.json_response({"service": "clipsearch", "version": __version__, "pid": os.getpid(),
                             "home": str(cfg.home), "model": svc.encoder.spec})


@api.get("/status", summary="Counts, failures and embedding spaces (as `clipsearch status --json`)")
def status(request: Request) -> Response:
    """The same dict as the CLI's status."""
    return io.json_response(io.status_data(request.app.state.config))


@api.get("/search", summary="Text→image search (as `clipsearch search --json`)")
def search(request: Request, q: str = Query(..., min_length=1, max_length=2000, description="query text"),
           rank: io.Rank = Depends(_rank)) -> Response:
    """Combined syntax works with quoted texts and #ID terms; image terms must be uploads (POST /api/similar).
    `text:"words"` finds words in the photos (after OCR); hits matched through their text carry `ocr`."""
    return io.page_response(_svc(request).search(q, rank.k, rank.offset, rank.filters, rank.strong, rank.sort,
                                                 stack=rank.stack))


@api.get("/similar/{photo_id}", summary="Photos like an indexed photo (as `clipsearch similar ID --json`)")
def similar_id(request: Request, photo_id: int, rank: io.Rank = Depends(_rank),
               box: str | None = Depends(_box)) -> Response:
    """The photo itself is left out; `box` searches with a region of it."""
    return io.page_response(_svc(request).similar(photo_id, rank.k, rank.offset, rank.filters, rank.strong,
                                                  rank.sort, box=box, stack=rank.stack))


@api.post("/similar", summary="Photos like an uploaded image (multipart field `image`) or a photo id",
          openapi_extra=io.body_doc(io.SimilarBody, "image", many=False))
async def similar_upload(request: Request, rank: io.Rank = Depends(_rank),
                         box: str | None = Depends(_box)) -> Response:
    """Ranking options (and `box`) are query parameters, as for GET /api/similar/{id}."""
    _body, refs = await io.read_body(request, io.SimilarBody, "image")
    ref = io.one_ref(refs, "similar")
    page = await run_in_threadpool(partial(_svc(request).similar, box=box, stack=rank.stack), ref, rank.k,
                                   rank.offset, rank.filters, rank.strong, rank.sort)
    return io.page_response(page)


@api.post("/describe", summary="Image→text: rank labels, a vocabulary or a caption collection",
          openapi_extra=io.body_doc(io.DescribeBody, "image", many=False))
async def describe(request: Request) -> Response:
    """The image is a photo id or an upload; labels are text (a comma list, one per line, or a JSON list)."""
    body, refs = await io.read_body(request, io.DescribeBody, "image")
    ref = io.one_ref(refs, "describe")
    labels = io.checked_labels(body.labels) if body.labels is not None else None
    ranked = await run_in_threadpool(_svc(request).describe, ref, labels, body.vocab, body.texts, body.k,
                                     body.templates)
    return io.json_response([r.as_dict() for r in ranked])


@api.post("/classify", summary="Zero-shot classification of photo ids and/or uploads (field `images`)",
          openapi_extra=io.body_doc(io.ClassifyBody, "images", many=True))
async def classify(request: Request) -> Response:
    """Results come in the order the images were sent; an upload's `source` is "<upload>"."""
    body, refs = await io.read_body(request, io.ClassifyBody, "images")
    if not refs:
        raise errors.UsageError("no images to classify: send photo ids or uploads as `images`")
    results = await run_in_threadpool(_svc(request).classify, refs, io.checked_labels(body.labels), body.templates,
                                      body.multi_label, body.threshold, body.k)
    return io.json_response([r.as_dict() for r in results])


@api.post("/tag", summary="Batch-tag the library, or preview with dry_run (as `clipsearch tag --json`)",
          openapi_extra=io.body_doc(io.TagBody, None, many=False))
async def tag(request: Request) -> Response:
    """A label set is replaced as a whole; a dry run writes nothing."""
    body, _refs = await io.read_body(request, io.TagBody, None)
    flt = io.photo_filter(body.folder, body.after, body.before, body.tag, body.format)
    preview = await run_in_threadpool(partial(_svc(request).tag, strong_only=body.strong_only),
                                      io.checked_labels(body.labels), body.name, body.threshold, body.multi_label, flt,
                                      body.dry_run, body.templates)
    return io.json_response(preview.as_dict())


@api.delete("/tags/{label_set:path}", summary="Undo a tagging run (as `clipsearch tag --remove SET --json`)")
def remove_tags(request: Request, label_set: str) -> Response:
    """Deletes every tag of the set."""
    return io.json_response({"removed": _svc(request).remove_tags(label_set), "label_set": label_set})


@api.get("/photos/{photo_id}/thumbnail", summary="JPEG thumbnail of a catalogued photo",
         response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def thumbnail(request: Request, photo_id: int, size: int = Query(320, ge=16, le=1024)) -> Response:
    """By id only; generated once and cached in the home dir."""
    return Response(_svc(request).thumbnail(photo_id, size), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600"})


@api.get("/photos/{photo_id}/original", summary="The original file of a catalogued photo",
         response_class=FileResponse, responses={200: {"content": {"image/*": {}}}})
def original(request: Request, photo_id: int) -> FileResponse:
    """By id only, and only while the file on disk is still the one that was indexed (same size and mtime)."""
    path, media_type = io.original_file(_svc(request), photo_id)
    return FileResponse(path, media_type=media_type)


def create_app(config: AppConfig, service: SearchService | None = None, token: str | None = None) -> FastAPI:
    """The ASGI app over one warm service (built from `config` when not given: loads the model now). The service
    must refuse file paths (SearchOptions(allow_files=False)): nothing a client sends names a file here.

    With a token, every request (docs included) must carry ``Authorization: Bearer TOKEN``.
    """
    from clipsearch import __version__

    if service is None:
        from clipsearch.search import build_service

        service = build_service(config, SearchOptions(allow_files=False))
    elif service.options.allow_files:
        raise ValueError("the server needs a SearchService built with SearchOptions(allow_files=False)")
    io.warm(service)
    app = FastAPI(title="clipsearch", version=__version__, redoc_url=None,
                  description="Search a photo library by meaning. Replies equal `clipsearch ... --json`.")
    app.state.service, app.state.config = service, config
    app.include_router(api)
    io.install_error_handlers(app)
    limit = int(config.max_upload_mb * 2**20) + io.FORM_SLACK
    app.add_middleware(io.Guard, token=token, max_body=limit)
    return app


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (names other than localhost count as not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a (long enough) token: one line, before any model loads."""
    if is_loopback(host):
        return
    if not token:
        raise errors.UsageError(f"binding {host} exposes your photos to the network: it needs a token "
                                f"(e.g. --token \"$(python -c 'import secrets; print(secrets.token_urlsafe())')\")")
    if len(token) < MIN_TOKEN:
        raise errors.UsageError(f"the token is too short for a network bind (at least {MIN_TOKEN} characters)")


class QueryServer:
    """A server bound to its socket (so the port is known and conflicts show before the model loads), run by
    `run()`; it announces itself in HOME/server.json while it listens and removes the file when it stops."""

    def __init__(self, config: AppConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, service: SearchService | None = None, access_log: bool = False,
                 on_ready: Callable[[str], None] | None = None) -> None:
        check_bind(host, token)
        running = find_server(config)
        if running is not None:
            raise errors.UsageError(f"a clipsearch server for {config.home} is already running at {running.url}")
        self.config, self.host, self.token, self.on_ready = config, host, token, on_ready
        self.socket = _bind(host, port)
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://{_connect_host(host)}:{self.port}"
        try:
            app = create_app(config, service, token)
        except BaseException:
            self.socket.close()
            raise
        self.model = app.state.service.encoder.spec
        uv_config = uvicorn.Config(app, log_config=None, access_log=access_log, limit_concurrency=64,
                                   timeout_graceful_shutdown=5)
        self._server = _Uvicorn(uv_config, self._announce, self._withdraw)

    def _announce(self) -> None:
        write_server_file(self.config, {
            "pid": os.getpid(), "host": self.host, "port": self.port, "url": self.url, "token": self.token,
            "home": str(self.config.home), "db": db_key(self.config), "model": self.model,
            "max_upload_mb": self.config.max_upload_mb, "started": time.time()})
        log.info("clipsearch server for %s at %s (API docs at %s/docs)", self.config.home, self.url, self.url)
        if self.on_ready is not None:
            self.on_ready(self.url)

    def _withdraw(self) -> None:
        remove_server_file(self.config, os.getpid())

    def run(self) -> None:
        """Serve until stopped (Ctrl-C, SIGTERM or `stop()`); the discovery file goes away on the way out."""
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._withdraw()
            self.socket.close()

    def stop(self) -> None:
        """Ask the server to finish its requests and return from `run()` (thread-safe)."""
        self._server.should_exit = True


def serve(config: AppConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          access_log: bool = False, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the query server for a home until interrupted (what `clipsearch serve` calls); `on_ready(url)` runs
    once it accepts connections (the CLI prints the address there).

    numpy's BLAS runs on one thread here: a query's matrix products are small, and a second BLAS thread waiting
    for a core that another request (or process) holds made a warm query 4-6x slower (48-52 ms against 8 ms for
    30 repeated queries in one process; bench/RESULTS.md issue 13). Tagging splits its work per core itself."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        QueryServer(config, host, port, token, access_log=access_log, on_ready=on_ready).run()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line UsageError (port taken, address not on this machine)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _type, proto, _name, addr = infos[0]
        # proto must be IPPROTO_TCP: asyncio turns Nagle off (TCP_NODELAY) only for sockets that say so, and with
        # Nagle on, a reply written in two parts waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    except OSError as e:
        raise errors.UsageError(f"cannot bind {host}:{port}: {e.strerror or e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise errors.UsageError(f"cannot bind {host}:{port}: {e.strerror or e}"
                                f"{' (another server? choose --port)' if e.errno == 98 else ''}") from e
    sock.set_inheritable(False)
    return sock


def _connect_host(host: str) -> str:
    """The address a local client dials for a bind address (a wildcard bind is reached over loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, announcing itself once its sockets accept connections and withdrawing once they close.

    Withdrawing happens in `shutdown`, not after `run()` returns: after a graceful stop on SIGTERM uvicorn raises
    the signal again with its default action, which ends the process before any code after `run()`.
    """

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None], on_stopped: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started, self.on_stopped = on_started, on_stopped

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_stopped()
        await super().shutdown(sockets)
