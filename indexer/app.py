"""Wiring: build the real catalog, store and encoder from an AppConfig, once, for the CLI, the UI and the API."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from clipsearch.indexer.config import DEFAULT_MODEL, AppConfig, IndexOptions, write_model_hint
from clipsearch.indexer.storage.catalog import Catalog
from clipsearch.indexer.storage.store import StoreOptions, VectorStore

if TYPE_CHECKING:
    from clipsearch.indexer.executors import Executor
    from clipsearch.indexer.model.protocol import Encoder
    from clipsearch.indexer.pipeline import Indexer


@dataclass
class Parts:
    """The long-lived parts a service needs; the encoder is built separately because it is the slow one."""

    config: AppConfig
    catalog: Catalog
    store: VectorStore


def open_parts(config: AppConfig, store_options: StoreOptions = StoreOptions()) -> Parts:
    """Open the catalog and the vector store of a home dir (creates the home dir on first use)."""
    config.home.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(config.resolved_db_url)
    return Parts(config, catalog, VectorStore(config.index_dir, catalog, store_options))


def resolve_model(config: AppConfig, catalog: Catalog) -> str:
    """The model a command uses: the one asked for, else the one the library was last indexed with, else the
    default. Every command resolves it here, so `--help` can state one default for all of them."""
    return config.model or catalog.get_meta("last_model") or DEFAULT_MODEL


def build_encoder(config: AppConfig, catalog: Catalog) -> Encoder:
    """The encoder for this config's model (loads it: the slow step). The spec is also noted in the home, so that
    the next CLI process can start loading the model before it has opened the catalog (config.read_model_hint)."""
    from clipsearch.indexer.model.factory import create_encoder

    spec = resolve_model(config, catalog)
    encoder = create_encoder(spec, config.device, config.backend, config.model_cache)
    write_model_hint(config, spec)
    return encoder


def build_indexer(config: AppConfig, options: IndexOptions = IndexOptions(),
                  executor: Executor | None = None) -> Indexer:
    """An Indexer over the real parts for this config; the model loads only if the run has something to embed."""
    from clipsearch.indexer.pipeline import EncoderSource, Indexer

    parts = open_parts(config)
    spec = resolve_model(config, parts.catalog)
    parts.catalog.set_meta("last_model", spec)
    write_model_hint(config, spec)
    source = EncoderSource(spec, lambda: build_encoder(replace(config, model=spec), parts.catalog))
    return Indexer(parts.catalog, parts.store, source, config.home, options, executor=executor,
                   db_url=config.db_url)
