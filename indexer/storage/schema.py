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

# v2: tags reference integer label ids (tag_labels) instead of repeating the strings
# v3: every vector records the space generation that wrote it (embeddings.seq), removals leave a row in
#     embedding_removals, so the vector store applies only what changed since the generation its files cover
SCHEMA_VERSION = 3

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
    # Changes are on record from this generation on (0: since the space began). An index covering an older
    # generation cannot be brought up to date from the change record and is rebuilt.
    Column("diff_from", BigInteger, nullable=False, default=0, server_default="0"),
)

embeddings = Table(
    "embeddings",
    metadata,
    Column("photo_id", Integer, ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True),
    Column("space_id", Integer, ForeignKey("spaces.id", ondelete="CASCADE"), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # float32 little-endian, L2-normalised
    # The space generation of the transaction that wrote this vector: "what changed since generation G" is a range
    # scan of ix_embeddings_seq. Vectors written before schema v3 carry 0.
    Column("seq", BigInteger, nullable=False, default=0, server_default="0"),
    Index("ix_embeddings_space", "space_id", "photo_id"),
    Index("ix_embeddings_seq", "space_id", "seq", "photo_id"),
)

# One row per vector removed from a space (photo deleted, or changed: its old vector goes), with the generation of
# the removing transaction; clustered by (space, generation) so the store reads "removed since G" as one range.
embedding_removals = Table(
    "embedding_removals",
    metadata,
    Column("space_id", BigInteger, primary_key=True),
    Column("generation", BigInteger, primary_key=True),
    Column("photo_id", BigInteger, primary_key=True),
    sqlite_with_rowid=False,
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


def _v2_to_v3(conn: Connection) -> None:
    """Add the change record: embeddings.seq, spaces.diff_from (and embedding_removals, made by create_all).

    Resumable: each step checks what is already there (SQLite may commit the ALTERs on their own). Existing vectors
    get seq 0 and each space's record starts at its current generation, so an index written by v2 is rebuilt once
    rather than trusted with a change record it predates.
    """
    columns = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in ("embeddings", "spaces")}
    if "seq" not in columns["embeddings"]:
        conn.exec_driver_sql("ALTER TABLE embeddings ADD COLUMN seq BIGINT NOT NULL DEFAULT 0")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_embeddings_seq ON embeddings (space_id, seq, photo_id)")
    if "diff_from" not in columns["spaces"]:
        conn.exec_driver_sql("ALTER TABLE spaces ADD COLUMN diff_from BIGINT NOT NULL DEFAULT 0")
    conn.exec_driver_sql("UPDATE spaces SET diff_from = generation")  # in the transaction that records v3


# Migrations: MIGRATIONS[n] upgrades a catalog from version n to n + 1 inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3}


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
    v2_vectors = "embeddings" in tables and "seq" not in {c["name"] for c in inspect(conn).get_columns("embeddings")}
    version = 1 if v1_tags else 2 if v2_vectors else SCHEMA_VERSION
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
