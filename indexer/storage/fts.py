"""Full-text indexes beside additive catalog tables: SQLite FTS5, or PostgreSQL tsvector + GIN.

Additive tables (captions, OCR text) live outside the versioned schema and are created on first use, so every
store needs the same three things: creating its tables once even when two processes open the catalog together,
a full-text index that follows the table's rows without the store having to remember, and one way of turning a
user's words into a query both back-ends read alike. They are here so that a new store does not copy them.

The index follows its table by itself: on SQLite an external-content FTS5 table kept in step by triggers (so rows
removed by `ON DELETE CASCADE` leave the index too), on PostgreSQL a generated tsvector column with a GIN index.
Words are as written (unicode61 tokenizer without stemming; PostgreSQL's 'simple' configuration), any language.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from clipsearch.indexer.errors import CatalogError

_WORD = re.compile(r"\w+", re.UNICODE)
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def words(query: str) -> list[str]:
    """The words of a query as the full-text index sees them (letters and digits; punctuation separates)."""
    return [w.lower() for w in _WORD.findall(query)]


def create_once(engine: Engine, create: Callable[[Connection], None], what: str) -> None:
    """Run `create` (idempotent DDL) in a transaction, retrying when another process creates the same objects at
    that moment; a failure is one CatalogError line naming `what`."""
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                create(conn)
            return
        except SQLAlchemyError as e:
            if attempt == 2 or "already exists" not in str(e):
                raise CatalogError(f"cannot create the {what} tables: {str(e).splitlines()[0]}") from e
            time.sleep(0.2)


def fts_name(table: str) -> str:
    """The SQLite FTS5 table indexing `table`."""
    return f"{table}_fts"


def create_fts(conn: Connection, table: str, column: str = "text", key: str = "id") -> None:
    """A full-text index over `table.column` that follows the table's inserts, updates and deletes by itself.

    SQLite: an external-content FTS5 table (rowid = `key`, an integer primary key) and three triggers; PostgreSQL:
    a generated `tsv` column and a GIN index on it."""
    for name in (table, column, key):
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a plain SQL name: {name!r}")
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tsv tsvector GENERATED ALWAYS AS "
                             f"(to_tsvector('simple', coalesce({column}, ''))) STORED")
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_{table}_tsv ON {table} USING GIN (tsv)")
        return
    fts = fts_name(table)
    add = f"INSERT INTO {fts}(rowid, {column}) VALUES (new.{key}, new.{column});"
    drop = f"INSERT INTO {fts}({fts}, rowid, {column}) VALUES ('delete', old.{key}, old.{column});"
    conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS {fts} USING fts5({column}, content='{table}', "
                         f"content_rowid='{key}', tokenize='unicode61 remove_diacritics 2')")
    conn.exec_driver_sql(f"CREATE TRIGGER IF NOT EXISTS {fts}_ai AFTER INSERT ON {table} BEGIN {add} END")
    conn.exec_driver_sql(f"CREATE TRIGGER IF NOT EXISTS {fts}_ad AFTER DELETE ON {table} BEGIN {drop} END")
    conn.exec_driver_sql(f"CREATE TRIGGER IF NOT EXISTS {fts}_au AFTER UPDATE ON {table} BEGIN {drop} {add} END")


def all_words(terms: list[str], sqlite: bool) -> str:
    """A query matching rows that hold every one of `terms` (anywhere, any order): an FTS5 MATCH expression on
    SQLite, else the text for PostgreSQL's plainto_tsquery('simple', ...). Terms are `words()` output, so quoting
    them is enough to keep FTS5 operators out."""
    if sqlite:
        return " AND ".join(f'"{t}"' for t in terms)
    return " ".join(terms)
