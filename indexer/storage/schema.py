"""SQL catalog schema (SQLAlchemy 2.0 Core), its version, and the migration path.

The catalog is the source of truth: photos, their per-space embeddings, tags and text collections.
FAISS indexes are derived from it and can always be rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
)
from sqlalchemy.engine import Connection

from clipsearch.indexer.errors import CatalogError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # v2: tags reference integer label ids (tag_labels) instead of repeating the strings

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))

photos = Table(
    "photos",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path_bytes", LargeBinary, nullable=False, unique=True),  # os.fsencode(path): lossless for any name
    Column("path", Text, nullable=False),  # display form (undecodable bytes replaced)
    Column("folder", Text, nullable=False, index=True),  # display form of the parent dir, for prefix filters
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("content_hash", String(64), index=True),
    Column("width", Integer),
    Column("height", Integer),
    Column("taken_at", DateTime),  # EXIF DateTimeOriginal when present
    Column("date", DateTime, index=True),  # taken_at, else file mtime: the date users filter and sort by
    Column("camera_make", String(128)),
    Column("camera_model", String(128)),
    Column("format", String(16)),
    Column("status", String(16), nullable=False, index=True),
    Column("reason", Text),
    Column("updated_at", DateTime, nullable=False),
)

spaces = Table(
    "spaces",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
    Column("label", Text, nullable=False),
    Column("model_spec", Text, nullable=False),
    Column("dim", Integer, nullable=False),
    Column("generation", BigInteger, nullable=False, default=0),  # bumped by every change to its vectors
    Column("created_at", DateTime, nullable=False),
)

embeddings = Table(
    "embeddings",
    metadata,
    Column("photo_id", Integer, ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True),
    Column("space_id", Integer, ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # float32 little-endian, L2-normalised
    Index("ix_embeddings_space", "space_id", "photo_id"),
)

tag_labels = Table(
    "tag_labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label_set", String(128), nullable=False),
    Column("label", String(256), nullable=False),
    Column("space_id", Integer, ForeignKey("spaces.id", ondelete="CASCADE"), nullable=False),
    UniqueConstraint("label_set", "label"),
    Index("ix_tag_labels_label", "label"),
)

# A tagging run writes up to one row per photo and label set (a million at a time), so rows are three numbers,
# clustered by label (SQLite WITHOUT ROWID): a run's labels get fresh ids, so its rows append to the table, and
# replacing or removing a set deletes one contiguous range. Against string labels clustered by photo, the bulk
# insert and the delete of a million tags each cost about half. label_id has no foreign key on purpose: its check
# slowed the insert by a third, and the only writers (TagSetWriter, TagStore.remove_set) insert and delete labels
# and their tags in one transaction.
tags = Table(
    "tags",
    metadata,
    Column("label_id", Integer, primary_key=True),  # tag_labels.id
    Column("photo_id", Integer, ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True),
    Column("score", Float, nullable=False),
    Index("ix_tags_photo", "photo_id"),
    sqlite_with_rowid=False,
)

text_collections = Table(
    "text_collections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("space_id", Integer, ForeignKey("spaces.id", ondelete="CASCADE"), nullable=False),
    Column("generation", BigInteger, nullable=False, default=0),
    UniqueConstraint("name", "space_id"),
)

text_entries = Table(
    "text_entries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("collection_id", Integer, ForeignKey("text_collections.id", ondelete="CASCADE"), nullable=False),
    Column("text", Text, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Index("ix_text_entries_collection", "collection_id", "id"),
)

# The v1 tags table (label strings on every row), kept for the migration and its test.
_v1 = MetaData()
TAGS_V1 = Table(
    "tags",
    _v1,
    Column("photo_id", Integer, primary_key=True),
    Column("label_set", String(128), primary_key=True),
    Column("label", String(256), primary_key=True),
    Column("score", Float, nullable=False),
    Column("space_id", Integer, nullable=False),
    Index("ix_tags_label", "label", "photo_id"),
)


def _v1_to_v2(conn: Connection) -> None:
    """Move the tag strings into tag_labels and rewrite tags as (photo_id, label_id, score).

    Resumable: SQLite runs DDL outside the transaction, so a run killed half-way leaves tags_v1 (the old rows,
    copied in one statement) behind, and the next open starts again from it.
    """
    if "tags_v1" not in inspect(conn).get_table_names():
        conn.exec_driver_sql("CREATE TABLE tags_v1 AS SELECT photo_id, label_set, label, score, space_id FROM tags")
    conn.exec_driver_sql("DROP TABLE IF EXISTS tags")  # its indexes and constraint names go with it
    tag_labels.create(conn, checkfirst=True)
    tags.create(conn)
    conn.execute(tag_labels.delete())  # rows of a killed earlier attempt
    conn.exec_driver_sql("INSERT INTO tag_labels (label_set, label, space_id) "
                         "SELECT label_set, label, MIN(space_id) FROM tags_v1 GROUP BY label_set, label")
    conn.exec_driver_sql("INSERT INTO tags (photo_id, label_id, score) SELECT t.photo_id, l.id, t.score "
                         "FROM tags_v1 t JOIN tag_labels l ON l.label_set = t.label_set AND l.label = t.label")
    conn.exec_driver_sql("DROP TABLE tags_v1")


# Migrations: MIGRATIONS[n] upgrades a catalog from version n to n + 1 inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2}


def _stored_version(conn: Connection, tables: set[str]) -> int:
    """The catalog's schema version. When the row is missing, the tables tell which version made them, and the row
    is written.

    The row can be missing for two reasons. A process may have been killed while it created a fresh catalog:
    SQLite commits each CREATE TABLE on its own, so the tables can outlive the version row. Or another process
    may be creating the catalog right now. Guessing v1 there would run the v1 -> v2 migration on v2 tables.
    """
    row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
    if row is not None:
        return int(row[0])
    v1_tags = "tags_v1" in tables or (
        "tags" in tables and "label_set" in {c["name"] for c in inspect(conn).get_columns("tags")})
    version = 1 if v1_tags else SCHEMA_VERSION
    conn.execute(meta.insert().values(key="schema_version", value=str(version)))
    return version


def ensure_schema(conn: Connection) -> None:
    """Create a fresh schema, or migrate an older one; refuse a catalog written by a newer clipsearch."""
    existing = set(inspect(conn).get_table_names())
    # checkfirst: creates a fresh catalog, the tables a killed creation left out, and tables a later version added
    metadata.create_all(conn, checkfirst=True)
    version = _stored_version(conn, existing)
    if version > SCHEMA_VERSION:
        raise CatalogError(
            f"the catalog uses schema v{version}, newer than this clipsearch (v{SCHEMA_VERSION}); upgrade clipsearch"
        )
    while version < SCHEMA_VERSION:
        log.warning("migrating catalog schema v%d -> v%d", version, version + 1)
        MIGRATIONS[version](conn)
        version += 1
        conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(version)))
