"""Wiring: build the real catalog, store and encoder from an AppConfig, once, for the CLI and the UI alike."""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Catalog
from .config import AppConfig, IndexOptions
from .store import StoreOptions, VectorStore


@dataclass
class Parts:
    """The long-lived parts a service needs; the encoder is loaded lazily because it is the slow one."""

    config: AppConfig
    catalog: Catalog
    store: VectorStore


def open_parts(config: AppConfig, store_options: StoreOptions = StoreOptions()) -> Parts:
    """Open the catalog and the vector store of a home dir (creates the home dir on first use)."""
    config.home.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(config.resolved_db_url)
    return Parts(config, catalog, VectorStore(config.index_dir, catalog, store_options))


def build_indexer(config: AppConfig, options: IndexOptions = IndexOptions()):  # -> Indexer (lazy torch import)
    """An Indexer over the real parts for this config (loads the model)."""
    from .encoder import Encoder
    from .pipeline import Indexer

    parts = open_parts(config)
    encoder = Encoder(config.model, config.device)
    parts.catalog.set_meta("last_model", config.model)
    return Indexer(parts.catalog, parts.store, encoder, config.home, options)


def resolve_model(config: AppConfig, catalog: Catalog, explicit: bool = False) -> str:
    """The model to use: the configured one if given explicitly, else the one the library was last indexed with."""
    if explicit:
        return config.model
    return catalog.get_meta("last_model") or config.model
