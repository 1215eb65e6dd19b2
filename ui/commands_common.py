"""What the command modules share: range-checked option types, the filter and ranking options, the config from the
flags, `--json` output, and the services they call.

Numbers are checked here, at the CLI boundary, by argparse `type=` functions: an out-of-range value stops the
command with one line and exit code 2 before anything is read or written (`tag --threshold 5` used to replace a
tag set with nothing). The library checks the same values again for API and server callers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from clipsearch.indexer.config import AppConfig, load_config
from clipsearch.indexer.errors import EmptyLibrary, UsageError

if TYPE_CHECKING:
    from clipsearch.indexer.app import Parts
    from clipsearch.indexer.storage.filters import PhotoFilter
    from clipsearch.search.service import SearchService

log = logging.getLogger(__name__)

DATE_HELP = "YYYY-MM-DD or ISO date-time"
MAX_K = 10_000  # the service's largest page (SearchOptions.max_k)


# --- range-checked option types ----------------------------------------------------------------------------------
def _num(n: int) -> str:
    return f"{n:,}" if abs(n) >= 100_000 else str(n)


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, got '{text}'") from None
        if value < lo or (hi is not None and value > hi):
            span = f"from {_num(lo)} to {_num(hi)}" if hi is not None else f"{_num(lo)} or more"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(lo: float, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between lo and hi (each end closed unless marked open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got '{text}'") from None
        low_ok = value > lo if lo_open else value >= lo
        high_ok = hi is None or (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and low_ok and high_ok):
            low = f"{'above' if lo_open else 'at least'} {lo:g}"
            span = low if hi is None else f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if hi is not None else ''}{span}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


probability = float_range(0.0, 1.0)
fraction = float_range(0.0, 1.0, hi_open=True)
page_size = int_range(1, MAX_K)
non_negative = int_range(0)
positive = int_range(1)
port = int_range(1, 65535)


# --- shared options ----------------------------------------------------------------------------------------------
def add_filters(p: argparse.ArgumentParser) -> None:
    """--folder/--after/--before/--tag/--format (search, similar, tag)."""
    g = p.add_argument_group("filters")
    g.add_argument("--folder", help="only photos under this folder")
    g.add_argument("--after", help=f"only photos dated on/after ({DATE_HELP})")
    g.add_argument("--before", help=f"only photos dated before ({DATE_HELP})")
    g.add_argument("--tag", action="append", default=[], help="only photos with this tag (repeatable)")
    g.add_argument("--format", action="append", default=[], dest="formats",
                   help="only this file type, e.g. JPEG (repeatable)")


def add_ranking(p: argparse.ArgumentParser) -> None:
    """Paging, relevance cutoff and sort order (search, similar), then the filters."""
    p.add_argument("-k", type=page_size, default=20, metavar="N", help=f"hits per page, 1 to {MAX_K}")
    p.add_argument("--offset", type=non_negative, default=0, metavar="N", help="skip this many hits (pagination)")
    p.add_argument("--strong", action="store_true", help="only strong matches (calibrated cutoff)")
    p.add_argument("--sort", choices=["relevance", "date"], default="relevance", help="order of the hits")
    add_filters(p)


def _date(value: str | None, flag: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as e:
        raise UsageError(f"{flag} expects {DATE_HELP}, got '{value}'") from e


def filters_from(args: argparse.Namespace) -> PhotoFilter:
    """PhotoFilter from --folder/--after/--before/--tag/--format."""
    from clipsearch.indexer.storage.filters import PhotoFilter

    return PhotoFilter(folder=args.folder, after=_date(args.after, "--after"), before=_date(args.before, "--before"),
                       tags=tuple(args.tag), formats=tuple(args.formats))


def labels_from(value: str | None) -> str | list[str] | None:
    """`--labels FILE` or `--labels L1,L2`: the service takes text or a list only, so reading a named file is the
    CLI's explicit choice (a UI or server caller can never make it read one)."""
    if value is not None and os.path.isfile(os.path.expanduser(value)):
        from clipsearch.search.zeroshot import read_label_file

        return read_label_file(os.path.expanduser(value))
    return value


def templates_from(value: str | None) -> list[str] | None:
    """`--templates FILE` (one template with {} per line); a value with `{}` is taken as the templates' text."""
    if value is None:
        return None
    from clipsearch.search.zeroshot import parse_templates, read_template_file

    if "{}" in value and not os.path.isfile(os.path.expanduser(value)):
        return parse_templates(value)
    return read_template_file(os.path.expanduser(value))


# --- config, output, services ------------------------------------------------------------------------------------
def config_from(args: argparse.Namespace) -> AppConfig:
    """The AppConfig of this run: the global flags over the CLIPSEARCH_* environment (through load_config only)."""
    config = load_config(home=args.home, db=args.db, model=args.model, device=args.device, backend=args.backend,
                         roots=getattr(args, "roots", None))
    if config.home.exists() and not config.home.is_dir():
        raise UsageError(f"the home {config.home} is a file, not a folder (set --home or $CLIPSEARCH_HOME to a folder)")
    log.info("settings: home %s, catalog %s, model %s, device %s, backend %s", config.home,
             re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", config.resolved_db_url),
             config.model or "(the library's, else the default)", config.device or "(best available)", config.backend)
    return config


def out(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print `data` as JSON with --json, else the human-readable `text`."""
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False) if args.json else text)


def open_library(config: AppConfig) -> Parts:
    """The catalog and vector store of a home (no model)."""
    from clipsearch.indexer.app import open_parts

    return open_parts(config)


def library_model(config: AppConfig) -> str:
    """The model a command uses when --model is not given: the library's, else the default (resolve_model)."""
    if config.model:
        return config.model
    from clipsearch.indexer.app import resolve_model

    parts = open_library(config)
    try:
        return resolve_model(config, parts.catalog)
    finally:
        parts.catalog.dispose()


def require_indexed(config: AppConfig) -> None:
    """Refuse a query on a library with no indexed photo before any model is built (a killed first run would
    otherwise try the default model from the hub and report the hub as unreachable)."""
    parts = open_library(config)
    try:
        indexed = parts.catalog.counts_by_status().get("indexed", 0)
    finally:
        parts.catalog.dispose()
    if not indexed:
        raise EmptyLibrary(f"nothing is indexed yet in {config.home}; run clipsearch index PATH")


def service_for(args: argparse.Namespace, need_photos: bool = True) -> SearchService:
    """The service for this run: a running `clipsearch serve` of the same home and catalog when there is one (no
    model is loaded here; ui/routing.py), else the in-process SearchService, which loads the model. With
    need_photos, an empty library is refused before any model is built."""
    from .client import find_server
    from .routing import Routed

    config = config_from(args)
    client = find_server(config)
    if client is None:
        log.info("no server running for %s: answering in-process", config.home)
        _prewarm_model(config)
        return _local_service(config, need_photos)
    log.info("found the server at %s", client.url)
    return Routed(client, lambda: _local_service(config, need_photos))  # type: ignore[return-value]


def _prewarm_model(config: AppConfig) -> None:
    """Start building the text tower of the home's likely model on a thread while this one imports the catalog
    and the service (they take about as long, on one core each: indexer/model/onnx_sessions.py)."""
    from clipsearch.indexer.config import read_model_hint

    spec = read_model_hint(config)
    if not spec or config.backend == "torch":
        return
    from clipsearch.indexer.model.factory import _auto_backend

    if config.backend == "auto" and _auto_backend(config.device) != "onnx":
        return
    from clipsearch.indexer.ingest.cores import usable_cores
    from clipsearch.indexer.model.onnx_sessions import prewarm

    if prewarm(spec, config.model_cache, usable_cores()):
        log.info("loading model %s in the background", spec)


def _local_service(config: AppConfig, need_photos: bool) -> SearchService:
    from clipsearch.search import build_service

    if need_photos:
        require_indexed(config)
    return build_service(config)
