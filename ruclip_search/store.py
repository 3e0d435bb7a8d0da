"""The index's database (SQLAlchemy Core): roots, per-image metadata and float16 embeddings, meta keys.

SQLite (`index.db` in the index folder) by default; PostgreSQL when a `db` URL is given (the folder then holds
only the FAISS files and the lock). Every statement for both lives here; dialect differences stay inside.
Writers (the indexer) hold the directory lock; readers (search, server) use the read API below and may run
at any time: SQLite in WAL mode, and PostgreSQL, give them a consistent snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import sqlalchemy as sa

from ._threads import shared_pool
from .errors import IndexLockedError, IndexNotFoundError, QueryError, StorageError
from .filters import SearchFilters, validate_key, validate_name

DB_NAME = "index.db"
LOCK_NAME = ".lock"
COPY_CHUNK = 5_000  # rows per round trip when copying an index between databases (~8 MB of 768-d embeddings)

#: Ids are FAISS's int64 ids: BIGINT on PostgreSQL; on SQLite `INTEGER PRIMARY KEY` (the 64-bit rowid).
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # sizes and nanosecond mtimes overflow int32
_TIME = sa.REAL().with_variant(sa.Double(), "postgresql")  # PostgreSQL's REAL is float4: seconds since 1970 need 8

metadata = sa.MetaData()
meta_table = sa.Table("meta", metadata, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))
roots_table = sa.Table(
    "roots",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("path", sa.LargeBinary, nullable=False, unique=True),
)


def _embedded_index(name: str, column: str) -> sa.Index:
    """A partial index on (column, id) of embedded images: a filter reads only it (covering), and photos without
    an embedding take no room."""
    embedded = sa.text("embedding IS NOT NULL")
    return sa.Index(name, column, "id", sqlite_where=embedded, postgresql_where=embedded)


images_table = sa.Table(
    "images",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("root_id", _ID, sa.ForeignKey("roots.id")),  # NULL (with relpath) for photos put by key
    sa.Column("relpath", sa.LargeBinary),
    sa.Column("size", _BIG, nullable=False),
    sa.Column("mtime_ns", _BIG, nullable=False),
    sa.Column("content_hash", sa.LargeBinary),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("format", sa.Text),
    sa.Column("taken_at", sa.Text),
    sa.Column("camera_make", sa.Text),
    sa.Column("camera_model", sa.Text),
    sa.Column("indexed_at", _TIME),
    sa.Column("error", sa.Text),
    sa.Column("embedding", sa.LargeBinary),
    sa.Column("key", sa.Text),  # the application's id of a photo put through the API (NULL for folder files)
    sa.Column("collection", sa.Text),
    # m004 (media): NULL for a photo, "video", or "frame": a sampled frame of the video `parent_id`, at `t` s
    sa.Column("media", sa.Text),
    sa.Column("parent_id", _ID),
    sa.Column("t", _TIME),  # a frame's time in its video; a video's own embedding is its frame at `t`
    sa.Column("duration", _TIME),  # a video's length in seconds
    sa.Column("raw_name", sa.LargeBinary),  # file name of the RAW of a RAW+JPEG pair (same folder and stem)
    sa.Column("live_name", sa.LargeBinary),  # file name of the video of a Live Photo (same folder and stem)
    sa.UniqueConstraint("root_id", "relpath"),
    sa.Index("ix_images_content_hash", "content_hash"),
    sa.Index("ix_images_key", "key", unique=True),
    _embedded_index("ix_images_collection", "collection"),
    sa.Index(
        "ix_images_parent",
        "parent_id",
        sqlite_where=sa.text("parent_id IS NOT NULL"),
        postgresql_where=sa.text("parent_id IS NOT NULL"),
    ),  # fmt: skip
    sa.Index(  # m006: `has_videos` (asked by every search) without a table scan
        "ix_images_media",
        "media",
        sqlite_where=sa.text("media IS NOT NULL"),
        postgresql_where=sa.text("media IS NOT NULL"),
    ),  # fmt: skip
    # m007: the search filters' date range and formats read an index, not every row (filter_ids)
    _embedded_index("ix_images_taken_at", "taken_at"),
    _embedded_index("ix_images_format", "format"),
    sqlite_autoincrement=True,  # ids are FAISS ids: never reuse the id of a deleted row
)
labels_table = sa.Table(
    "labels",
    metadata,
    sa.Column("image_id", _ID, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("label", sa.Text, primary_key=True),
    sa.Index("ix_labels_label", "label", "image_id"),
)
#: One row per image whose embedding was written, replaced or deleted, in the transaction that did it: how
#: readers bring a loaded FAISS file up to date (meta `faiss_seq` is the last seq that file covers).
changes_table = sa.Table(
    "changes",
    metadata,
    sa.Column("seq", _ID, primary_key=True),
    sa.Column("image_id", _ID, nullable=False),
    sqlite_autoincrement=True,
)

# Numbered migrations: frozen SQL, never edited once released. Index i upgrades schema i -> i+1.
MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "m001_initial",
        [
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
            "CREATE TABLE roots (id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE)",
            """CREATE TABLE images (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                root_id INTEGER NOT NULL REFERENCES roots(id),
                relpath BLOB NOT NULL,
                size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL,
                content_hash BLOB,
                width INTEGER, height INTEGER, format TEXT,
                indexed_at REAL,
                error TEXT,
                embedding BLOB,
                UNIQUE (root_id, relpath))""",
        ],
    ),
    (
        "m002_exif_and_hash_index",
        [
            "ALTER TABLE images ADD COLUMN taken_at TEXT",
            "ALTER TABLE images ADD COLUMN camera_make TEXT",
            "ALTER TABLE images ADD COLUMN camera_model TEXT",
            "CREATE INDEX ix_images_content_hash ON images (content_hash)",
        ],
    ),
    (
        # SQLite cannot drop NOT NULL: rebuild `images` keeping every id and the AUTOINCREMENT high-water mark
        # (the ids are FAISS ids and a deleted row's id must never come back).
        "m003_online_store",
        [
            """CREATE TABLE images_new (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                root_id INTEGER REFERENCES roots(id),
                relpath BLOB,
                size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL,
                content_hash BLOB,
                width INTEGER, height INTEGER, format TEXT,
                taken_at TEXT, camera_make TEXT, camera_model TEXT,
                indexed_at REAL,
                error TEXT,
                embedding BLOB,
                key TEXT,
                collection TEXT,
                UNIQUE (root_id, relpath))""",
            """INSERT INTO images_new (id, root_id, relpath, size, mtime_ns, content_hash, width, height, format,
                taken_at, camera_make, camera_model, indexed_at, error, embedding)
               SELECT id, root_id, relpath, size, mtime_ns, content_hash, width, height, format,
                taken_at, camera_make, camera_model, indexed_at, error, embedding FROM images""",
            "DELETE FROM sqlite_sequence WHERE name = 'images_new'",
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'images_new', seq FROM sqlite_sequence WHERE name = 'images'",
            "DROP TABLE images",
            "ALTER TABLE images_new RENAME TO images",
            "CREATE INDEX ix_images_content_hash ON images (content_hash)",
            "CREATE UNIQUE INDEX ix_images_key ON images (key)",
            # partial: a scoped search asks for embedded photos of a collection; without the WHERE, SQLite
            # fetched every matching row to test `embedding IS NOT NULL` (30 ms -> 0.5 ms at 1M photos)
            "CREATE INDEX ix_images_collection ON images (collection, id) WHERE embedding IS NOT NULL",
            """CREATE TABLE labels (
                image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
                label TEXT NOT NULL,
                PRIMARY KEY (image_id, label))""",
            "CREATE INDEX ix_labels_label ON labels (label, image_id)",
            "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL)",
        ],
    ),
    (
        # Videos (a row per video, one per sampled frame below it), RAW+JPEG pairs and Live Photos.
        "m004_media",
        [
            "ALTER TABLE images ADD COLUMN media TEXT",
            "ALTER TABLE images ADD COLUMN parent_id INTEGER",
            "ALTER TABLE images ADD COLUMN t REAL",
            "ALTER TABLE images ADD COLUMN duration REAL",
            "ALTER TABLE images ADD COLUMN raw_name BLOB",
            "ALTER TABLE images ADD COLUMN live_name BLOB",
            "CREATE INDEX ix_images_parent ON images (parent_id) WHERE parent_id IS NOT NULL",
        ],
    ),
    (
        # Every search asks whether any video is stored (`has_videos`): without an index that was a full table
        # scan (1.05 s per search at 1M photos). Partial: photos (NULL) take no room; `media = ?` implies it.
        "m006_media_index",
        ["CREATE INDEX ix_images_media ON images (media) WHERE media IS NOT NULL"],
    ),
    (
        # The search filters `date_from`/`date_to` and `formats` scanned the whole table (about 1 s per search at
        # 1M photos). Partial and covering, like ix_images_collection: filter_ids reads only (value, id).
        # (`under` uses the UNIQUE (root_id, relpath) index: filter_ids asks for a relpath range.)
        "m007_filter_indexes",
        [
            "CREATE INDEX ix_images_taken_at ON images (taken_at, id) WHERE embedding IS NOT NULL",
            "CREATE INDEX ix_images_format ON images (format, id) WHERE embedding IS NOT NULL",
        ],
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
# an index migrated to this schema version (m007's filter indexes) gets planner statistics (Store.analyze)
ANALYZED_FROM = [name for name, _ in MIGRATIONS].index("m007_filter_indexes") + 1
ANALYSIS_LIMIT = 1000  # rows SQLite's ANALYZE samples per index (PRAGMA analysis_limit)

# PostgreSQL's text of a migration whose SQLite text does not run there (BLOB, AUTOINCREMENT, sqlite_sequence,
# a table rebuild to drop NOT NULL); a migration not named here runs on PostgreSQL as written. Same frozen rule.
# A new migration: write portable SQL (TEXT, INTEGER, ADD COLUMN, CREATE INDEX) or add its variant here;
# tests/test_pg.py checks that both dialects end with exactly the tables store.py declares.
PG_MIGRATIONS: dict[str, list[str]] = {
    "m001_initial": [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
        "CREATE TABLE roots (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, path BYTEA NOT NULL UNIQUE)",
        """CREATE TABLE images (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            root_id BIGINT NOT NULL REFERENCES roots(id),
            relpath BYTEA NOT NULL,
            size BIGINT NOT NULL,
            mtime_ns BIGINT NOT NULL,
            content_hash BYTEA,
            width INTEGER, height INTEGER, format TEXT,
            indexed_at DOUBLE PRECISION,
            error TEXT,
            embedding BYTEA,
            UNIQUE (root_id, relpath))""",
    ],
    "m003_online_store": [
        "ALTER TABLE images ALTER COLUMN root_id DROP NOT NULL",
        "ALTER TABLE images ALTER COLUMN relpath DROP NOT NULL",
        "ALTER TABLE images ADD COLUMN key TEXT",
        "ALTER TABLE images ADD COLUMN collection TEXT",
        "CREATE UNIQUE INDEX ix_images_key ON images (key)",
        "CREATE INDEX ix_images_collection ON images (collection, id) WHERE embedding IS NOT NULL",
        """CREATE TABLE labels (
            image_id BIGINT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            PRIMARY KEY (image_id, label))""",
        "CREATE INDEX ix_labels_label ON labels (label, image_id)",
        "CREATE TABLE changes (seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, image_id BIGINT NOT NULL)",
    ],
    "m004_media": [
        "ALTER TABLE images ADD COLUMN media TEXT",
        "ALTER TABLE images ADD COLUMN parent_id BIGINT",
        "ALTER TABLE images ADD COLUMN t DOUBLE PRECISION",
        "ALTER TABLE images ADD COLUMN duration DOUBLE PRECISION",
        "ALTER TABLE images ADD COLUMN raw_name BYTEA",
        "ALTER TABLE images ADD COLUMN live_name BYTEA",
        "CREATE INDEX ix_images_parent ON images (parent_id) WHERE parent_id IS NOT NULL",
    ],
}


def migration_sql(index: int, dialect: str) -> list[str]:
    """The statements of MIGRATIONS[index] for a dialect ("sqlite" or "postgresql")."""
    name, statements = MIGRATIONS[index]
    return PG_MIGRATIONS.get(name, statements) if dialect == "postgresql" else statements


#: Every image column but the embedding (what readers load per record), from the table definition.
IMAGE_COLUMNS = tuple(c.name for c in images_table.columns if c.name != "embedding")
_LABEL_SEP = "\x1f"  # joins a record's labels in one query (names cannot hold control characters)
#: What a file's header/EXIF says (loader.FileMeta has these fields, in this order).
META_COLUMNS = ("width", "height", "format", "taken_at", "camera_make", "camera_model")


class FileMetaLike(Protocol):
    """Header/EXIF metadata of one file: loader.FileMeta, or the `ImageMeta` the store read back."""

    @property
    def width(self) -> int | None: ...
    @property
    def height(self) -> int | None: ...
    @property
    def format(self) -> str | None: ...
    @property
    def taken_at(self) -> str | None: ...
    @property
    def camera_make(self) -> str | None: ...
    @property
    def camera_model(self) -> str | None: ...


class ImageMeta(NamedTuple):
    """Header/EXIF metadata as stored (same fields as loader.FileMeta)."""

    width: int | None
    height: int | None
    format: str | None
    taken_at: str | None
    camera_make: str | None
    camera_model: str | None


class ScanRow(NamedTuple):
    """What the indexer's diff needs of one stored file (see `Store.scan_state`)."""

    id: int
    size: int
    mtime_ns: int
    content_hash: bytes | None
    has_embedding: bool
    has_error: bool
    raw_name: bytes | None = None  # the pair's RAW file, if any
    live_name: bytes | None = None  # the Live Photo's video, if any


class StoredContent(NamedTuple):
    """A stored embedding of some content and that file's metadata (reused for moves and duplicates)."""

    embedding: bytes
    meta: ImageMeta


@dataclass(frozen=True, slots=True)
class ImageWrite:
    """One row the indexer writes: a file, its content hash, metadata, and an embedding or an error."""

    root_id: int
    relpath: bytes
    size: int
    mtime_ns: int
    content_hash: bytes | None = None
    meta: FileMetaLike | None = None
    embedding: bytes | None = None
    error: str | None = None
    indexed_at: float | None = None  # None: now
    media: str | None = None  # None (a photo) or "video"
    t: float | None = None  # a video: the time of the frame whose embedding is the row's own
    duration: float | None = None
    raw_name: bytes | None = None
    live_name: bytes | None = None

    def values(self) -> dict[str, Any]:
        """Column -> value for an INSERT or UPDATE."""
        meta = self.meta
        return {
            "root_id": self.root_id, "relpath": self.relpath, "size": self.size, "mtime_ns": self.mtime_ns,
            "content_hash": self.content_hash, "embedding": self.embedding, "error": self.error,
            "indexed_at": time.time() if self.indexed_at is None else self.indexed_at,
            **{c: getattr(meta, c) if meta is not None else None for c in META_COLUMNS},
            "media": self.media, "t": self.t, "duration": self.duration, "raw_name": self.raw_name,
            "live_name": self.live_name,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class PhotoWrite:
    """One photo put through the API by its key: an embedding (float16 bytes), metadata, collection, labels.

    `root_id`/`relpath` only for a photo that is also a file under an indexed root; `size`/`mtime_ns` None: 0.
    """

    key: str
    embedding: bytes
    content_hash: bytes | None = None
    meta: FileMetaLike | None = None
    collection: str | None = None
    labels: tuple[str, ...] = ()
    root_id: int | None = None
    relpath: bytes | None = None
    size: int | None = None
    mtime_ns: int | None = None

    def values(self) -> dict[str, Any]:
        """Column -> value for an INSERT or UPDATE (validated: QueryError for a bad key, collection or label)."""
        validate_key(self.key)
        if self.collection is not None:
            validate_name(self.collection, "collection")
        for label in self.labels:
            validate_name(label, "label")
        if not isinstance(self.embedding, bytes) or not self.embedding:
            raise QueryError(f"Photo {self.key!r} has no embedding: give its float16 bytes.")
        if (self.root_id is None) != (self.relpath is None):
            raise QueryError(f"Photo {self.key!r}: give both root_id and relpath, or neither.")
        meta = self.meta
        return {
            "key": self.key, "collection": self.collection, "root_id": self.root_id, "relpath": self.relpath,
            "size": self.size or 0, "mtime_ns": self.mtime_ns or 0, "content_hash": self.content_hash,
            "embedding": self.embedding, "error": None, "indexed_at": time.time(),
            **{c: getattr(meta, c) if meta is not None else None for c in META_COLUMNS},
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One indexed image as readers see it; `path` is absolute (str, surrogateescape for non-UTF-8 bytes).

    A photo put by key with no file has `path`, `root` and `relpath` "" (there is no file to open).
    """

    id: int
    path: str
    root: str
    relpath: str
    size: int
    mtime_ns: int
    width: int | None
    height: int | None
    format: str | None
    taken_at: str | None
    camera_make: str | None
    camera_model: str | None
    indexed_at: float | None
    error: str | None
    key: str | None = None
    collection: str | None = None
    labels: tuple[str, ...] = ()
    media: str | None = None  # None: a photo; "video"; "frame" (a video's sampled frame, never listed)
    parent_id: int | None = None  # a frame's video
    t: float | None = None  # a frame's time in its video (a video's: that of its own embedding's frame)
    duration: float | None = None  # a video's length in seconds
    raw_path: str | None = None  # absolute path of the RAW file of a RAW+JPEG pair
    live_path: str | None = None  # absolute path of the video of a Live Photo


class _Statements(NamedTuple):
    roots: Any
    records_by_id: Any
    record_by_key: Any
    embeddings_by_id: Any
    ids_by_key: Any
    meta_value: Any  # one meta value (`b_key`)
    bump_data_version: Any  # data_version + 1 in one statement (no row: 0 rows updated)
    insert_images: Any  # rows of images, their ids back in order
    insert_changes: Any  # rows of changes, their seqs back in order
    update_image: Any  # the row `b_id` of images, with the values given
    delete_images: Any  # the rows of images with these `ids` (their labels go with them: ON DELETE CASCADE)
    delete_labels: Any  # the labels of the images `ids`
    insert_labels: Any  # rows of labels


@functools.cache
def _statements() -> _Statements:
    """The statements of the hot read and write paths, built once: building a SQLAlchemy statement and its
    cache key cost more than SQLite took to run it (a third of a search's CPU at 1M photos)."""
    c = images_table.c
    ids, keys = sa.bindparam("ids", expanding=True), sa.bindparam("keys", expanding=True)
    return _Statements(
        roots=sa.select(roots_table.c.id, roots_table.c.path),
        records_by_id=sa.select(*_record_columns()).where(c.id.in_(ids)),
        record_by_key=sa.select(*_record_columns()).where(c.key == sa.bindparam("key")),
        embeddings_by_id=sa.select(c.id, c.embedding).where(c.id.in_(ids), c.embedding.is_not(None)),
        ids_by_key=sa.select(c.key, c.id).where(c.key.in_(keys)),
        meta_value=sa.select(meta_table.c.value).where(meta_table.c.key == sa.bindparam("b_key")),
        bump_data_version=sa.update(meta_table)
        .where(meta_table.c.key == "data_version")
        .values(value=sa.cast(sa.cast(meta_table.c.value, sa.BigInteger) + 1, sa.Text)),
        insert_images=sa.insert(images_table).returning(c.id, sort_by_parameter_order=True),
        insert_changes=sa.insert(changes_table).returning(changes_table.c.seq, sort_by_parameter_order=True),
        update_image=sa.update(images_table).where(c.id == sa.bindparam("b_id")),
        delete_images=sa.delete(images_table).where(c.id.in_(ids)),
        delete_labels=sa.delete(labels_table).where(labels_table.c.image_id.in_(ids)),
        insert_labels=sa.insert(labels_table),
    )


def _meta_upsert(dialect: str, key: str, value: str) -> Any:
    """Set meta `key` to `value` in one statement: an upsert (a delete + insert raced another process's on
    PostgreSQL: duplicate key). SQLite and PostgreSQL spell ON CONFLICT alike."""
    from sqlalchemy.dialects import postgresql, sqlite

    stmt = (postgresql if dialect == "postgresql" else sqlite).insert(meta_table).values(key=key, value=value)
    return stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value})


class _SqliteSql(NamedTuple):
    """A statement rendered for the sqlite3 module: its SQL (positional `?`) and the parameter of each `?`."""

    sql: str
    names: tuple[str, ...]  # the parameter of each `?`, in order
    fixed: dict[str, Any]  # the values the statement binds itself (its literals)
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # SQLAlchemy's bind processing, by position

    def args(self, values: dict[str, Any] | list[Any]) -> list[Any]:
        """The positional parameters from `values` (column or parameter name -> value; or an IN list's values),
        processed as SQLAlchemy would (e.g. REAL columns take floats)."""
        if isinstance(values, list):
            out = list(values)
        else:
            fixed = self.fixed
            out = [values[n] if n in values else fixed[n] for n in self.names]
        for at, process in self.processors:
            if out[at] is not None:
                out[at] = process(out[at])
        return out


def _render_sqlite(stmt: Any, columns: tuple[str, ...] = (), in_list: tuple[str, int] | None = None) -> _SqliteSql:
    """`stmt` compiled by SQLAlchemy's SQLite dialect, once, for the lean write path (`_write_photos_sqlite`).

    `columns`: those an INSERT or UPDATE sets; `in_list`: (the name of the statement's IN list, its number of
    values). The SQL, the order of its parameters and their bind processing are SQLAlchemy's own.
    """
    from sqlalchemy.dialects import sqlite

    dialect = sqlite.dialect()
    compiled = stmt.compile(dialect=dialect, column_keys=list(columns) if columns else None)
    if in_list is None:
        sql, names = compiled.string, tuple(compiled.positiontup or ())
        binds = [(n, compiled.binds[n]) for n in names]
        fixed = {n: b.value for n, b in binds if not b.required and b.value is not None}  # its literals
    else:  # IN (?, ?, ...): the expanded names are the list's, in order (keys_1, keys_2, ...)
        expanded = compiled.construct_expanded_state({in_list[0]: [0] * in_list[1]})
        sql, names, fixed = expanded.statement, tuple(expanded.positiontup or ()), {}
    kinds = {name: bind.type for name, bind in compiled.binds.items()}
    processors = []
    for at, name in enumerate(names):
        kind = kinds.get(in_list[0] if in_list is not None else name)
        process = kind.dialect_impl(dialect).bind_processor(dialect) if kind is not None else None
        if process is not None:
            processors.append((at, process))
    return _SqliteSql(sql, names, fixed, tuple(processors))


@functools.lru_cache(maxsize=2048)
def _sqlite_sql(name: str, columns: tuple[str, ...] = (), in_list: tuple[str, int] | None = None) -> _SqliteSql:
    """`_statements().<name>` rendered for SQLite (`_render_sqlite`), cached per shape: all SQL stays defined
    once, as SQLAlchemy statements, for both paths."""
    return _render_sqlite(getattr(_statements(), name), columns, in_list)


class PhotosWritten(NamedTuple):
    """What `Store.write_photos` did: the records put (in order), deleted key -> id, the first and last change
    seq it logged (0, 0: none) and the FAISS file version (`index_version`) current when it committed."""

    records: list[ImageRecord]
    deleted: dict[str, int]
    first_seq: int
    last_seq: int
    index_version: int


@functools.cache
def _record_columns() -> tuple[Any, ...]:
    """What readers select per record: IMAGE_COLUMNS and the image's labels joined by _LABEL_SEP (`labels`).
    Built once: constructing the correlated subquery cost more than running it."""
    joined = (
        sa.select(sa.func.aggregate_strings(labels_table.c.label, _LABEL_SEP))  # group_concat / string_agg
        .where(labels_table.c.image_id == images_table.c.id)
        .scalar_subquery()
        .label("labels")
    )
    return (*(images_table.c[c] for c in IMAGE_COLUMNS), joined)


def encode_embedding(vec: np.ndarray) -> bytes:
    """Store one vector as float16 bytes (half the size; cosine ranking barely changes)."""
    return np.asarray(vec, dtype=np.float16).tobytes()


def decode_embeddings(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """float16 blobs -> (N, dim) float32 array."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), dim).astype(np.float32)


class EmbeddingSnapshot:
    """Every embedded image as of one read transaction, read in pieces (a faiss_index.VectorSource): a FAISS
    build streams it instead of loading all vectors at once. `seq`: the last change it covers."""

    def __init__(self, conn: sa.Connection, dim: int, batch: int) -> None:
        self.conn, self.dim, self.batch = conn, dim, batch
        self.seq = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(changes_table.c.seq), 0))).scalar_one())
        embedded = images_table.c.embedding.is_not(None)
        row = conn.execute(sa.select(sa.func.count(), sa.func.min(images_table.c.id),
                                     sa.func.max(images_table.c.id)).where(embedded)).one()  # fmt: skip
        self.count, self._lo, self._hi = int(row[0]), row[1], row[2]

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, vectors float32) of every embedded image, `batch` at a time, in id order."""
        return Store._iter_embeddings(self.conn, self.dim, self.batch)

    def _by_ids(self, ids: Sequence[int]) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            query = sa.select(images_table.c.id, images_table.c.embedding).where(
                images_table.c.id.in_(chunk), images_table.c.embedding.is_not(None)
            )
            found.update((r[0], r[1]) for r in self.conn.execute(query))
        return found

    def sample(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """About `count` embedded images picked at random (ids drawn in the id range and read by key: no scan)."""
        if count >= self.count:
            parts = list(self.chunks())
            if not parts:
                return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        rng = np.random.default_rng(seed)
        span = self._hi - self._lo + 1
        found: dict[int, bytes] = {}
        for _ in range(20):  # ids missing from the range (deleted, failed files) only cost more draws
            need = count - len(found)
            if need <= 0:
                break
            draw = np.unique(rng.integers(self._lo, self._hi + 1, size=int(need * span / self.count * 1.1) + 16))
            found.update(self._by_ids([i for i in draw.tolist() if i not in found]))
        ids = np.array(sorted(found), dtype=np.int64)
        if len(ids) > count:
            ids = np.sort(rng.choice(ids, size=count, replace=False))
        return ids, decode_embeddings([found[int(i)] for i in ids], self.dim)

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), dim) vectors of `ids`, NaN rows for ids without an embedding."""
        return _rows_or_nan(self._by_ids(ids), ids, self.dim)


def _rows_or_nan(found: dict[int, bytes], ids: Sequence[int], dim: int) -> np.ndarray:
    out = np.full((len(ids), dim), np.nan, dtype=np.float32)
    have = [j for j, i in enumerate(ids) if int(i) in found]
    if have:
        out[have] = decode_embeddings([found[int(ids[j])] for j in have], dim)
    return out


# embeddings_or_nan: parts read at once (the vector engine's pool holds as many). The 240 re-ranked rows of a 10M
# query, p50 in 4 / 8 / 16 parts: 16.2 / 13.6 / 17.7 ms with the store out of the page cache, 5.3 / 6.9 / 9.8 ms
# with its rows in it (more threads than cores cost more than the disk waits they overlap)
VECTOR_READ_THREADS = 8
VECTOR_READ_PART = 8  # ... of at least this many ids (fewer rows: one statement is faster)
VECTOR_READ_CACHE_KB = 64 * 1024  # SQLite pages kept by all of the vector engine's connections together


def _chunks(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    """`items` in slices of `size` (an IN list stays under SQLite's bound-variable limit)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _on_connect(readonly: bool):
    def connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        if not readonly:
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed batch survives a killed process (the crash-safety goal) and the
            # database stays consistent after power loss (the last batches may then be redone). FULL would
            # fsync every batch, which on slow disks costs more than the encoding of small models.
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return connect


def _connector(db_path: Path, readonly: bool) -> Callable[[], sqlite3.Connection]:
    """How the engine opens the database: readers through a read-only URI, with the path percent-encoded.

    A creator, not an SQLAlchemy URL: a URL cut folder names at '#' or '?' (dropping mode=ro, so a reader
    created an empty database at the cut path).
    """
    path = os.path.abspath(db_path)
    if readonly:
        uri = f"file:{urllib.parse.quote(path)}?mode=ro"
        return lambda: sqlite3.connect(uri, uri=True, check_same_thread=False)
    return lambda: sqlite3.connect(path, check_same_thread=False)


def _damaged(db_path: Path, readonly: bool) -> Callable[[Any], None]:
    """An SQLAlchemy `handle_error` hook: a damaged database becomes a StorageError (the server's 503) anywhere.

    Readers get it for every database error (the file was replaced by garbage, truncated, deleted); writers
    only for damage, so their own handlers still word lock and disk-full errors.
    """

    def handle(context: Any) -> None:
        error = _damage(db_path, readonly, context.original_exception)
        if error is not None:
            raise error from context.original_exception

    return handle


def _damage(db_path: Path, readonly: bool, exc: BaseException) -> StorageError | None:
    """The StorageError `_damaged` raises for this DB-API error, or None (the caller words it)."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return None
    if not readonly and isinstance(exc, sqlite3.OperationalError):
        return None
    return StorageError(
        f"The index database {str(db_path)!r} cannot be read ({exc}): it is damaged or was replaced; "
        "build the index again (`ruclip-index build PHOTOS_DIR --rebuild`)."
    )


#: pg_advisory_xact_lock key of schema migrations (any constant: one database per index)
_MIGRATION_LOCK = 0x72_75_63_6C_69_70  # "ruclip"


def _pg_url(db: str) -> sa.URL:
    """A PostgreSQL URL for SQLAlchemy (`postgresql://` means psycopg 3); StorageError for anything else."""
    try:
        url = sa.make_url(db)
    except sa.exc.ArgumentError:
        url = None
    if url is None or url.get_backend_name() != "postgresql":
        raise StorageError(
            f"--db takes a PostgreSQL URL such as postgresql+psycopg://user@host/dbname, not {db!r} "
            "(an SQLite index needs no --db: its database is index.db in the index folder)."
        )
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


def _pg_engine(url: sa.URL, readonly: bool) -> sa.Engine:
    """A pooled engine (readers poll the change log often: no connect per query); readers' sessions are
    read-only, as SQLite readers open the file with mode=ro."""
    try:
        engine = sa.create_engine(url, pool_size=4, max_overflow=8, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise StorageError(
            f"PostgreSQL needs the psycopg driver ({e}): pip install 'ruclip-search[postgresql]'."
        ) from e
    if readonly:

        def connect(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_conn.commit()

        sa.event.listen(engine, "connect", connect)
    return engine


def _unreachable(where: str) -> Callable[[Any], None]:
    """A `handle_error` hook for PostgreSQL: a server that cannot be reached (or went away) is a StorageError
    (the server's 503) for readers and writers alike, with a hint; other errors keep their own handlers."""
    import psycopg

    def handle(context: Any) -> None:
        exc = context.original_exception
        if context.is_disconnect or (
            isinstance(exc, psycopg.OperationalError) and not isinstance(exc, psycopg.errors.TransactionRollback)
        ):
            raise StorageError(
                f"Cannot reach the index database {where} ({str(exc).strip()}): check the --db URL "
                "(RUCLIP_SEARCH_DB) and that the PostgreSQL server is running."
            ) from exc

    return handle


def _require_index(index_dir: str | os.PathLike[str], db: str | None = None) -> None:
    """Raise IndexNotFoundError unless `index_dir` holds an index database (creates nothing); with a
    PostgreSQL `db` the folder (of FAISS files) must exist."""
    if db is not None:
        if not Path(index_dir).is_dir():
            raise IndexNotFoundError(
                f"No index folder {os.fspath(index_dir)!r} (it holds the FAISS files of the index in the "
                "database): build one with `ruclip-index build PHOTOS_DIR --index DIR --db URL`."
            )
        return
    if not (Path(index_dir) / DB_NAME).is_file():
        raise IndexNotFoundError(
            f"No index at {os.fspath(index_dir)!r}: build one with `ruclip-index build PHOTOS_DIR` "
            "(pass --db URL if its metadata lives in PostgreSQL)."
        )


class Store:
    """Handle on an index's database. Use `Store.open` (readers) or `Store.create` (the indexer).

    `db`: None for SQLite in `index_dir`, or a PostgreSQL URL (one database per index; `index_dir` then holds
    only the FAISS files and the lock).
    """

    #: write_photos of photos without a file on SQLite takes `_write_photos_sqlite` (False: the SQLAlchemy path
    #: for all, as on PostgreSQL; tests compare the two)
    lean_writes = True

    def __init__(self, index_dir: str | os.PathLike[str], *, readonly: bool = True, db: str | None = None) -> None:
        self.dir = Path(index_dir)
        self.readonly = readonly
        self.url = db
        if db is None:
            self.db_path: Path | None = self.dir / DB_NAME
            self.where = repr(str(self.db_path))
            pool = sa.pool.NullPool if readonly else sa.pool.QueuePool
            self.engine = sa.create_engine("sqlite://", creator=_connector(self.db_path, readonly), poolclass=pool)
            sa.event.listen(self.engine, "connect", _on_connect(readonly))
            sa.event.listen(self.engine, "handle_error", _damaged(self.db_path, readonly))
        else:
            url = _pg_url(db)
            self.db_path = None
            self.where = url.render_as_string(hide_password=True)
            self.engine = _pg_engine(url, readonly)
            sa.event.listen(self.engine, "handle_error", _unreachable(self.where))
        self.dialect = self.engine.dialect.name  # "sqlite" or "postgresql"

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], *, readonly: bool = True, db: str | None = None) -> Store:
        """Open an existing index (raises IndexNotFoundError, or StorageError if its schema is newer).

        A reader that finds an older schema upgrades it in place when that is safe (the folder is writable
        and no build holds the lock), else raises a StorageError that says to run a build.
        """
        _require_index(index_dir, db)
        store = cls(index_dir, readonly=readonly, db=db)
        try:
            version = store.schema_version()
            if version == 0 and db is not None:
                raise IndexNotFoundError(
                    f"No index in database {store.where}: build one with `ruclip-index build PHOTOS_DIR "
                    f"--index {os.fspath(index_dir)} --db URL` (or `ruclip-index create`)."
                )
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"Index {os.fspath(index_dir)!r} has schema {version}, newer than this ruclip-search "
                    f"({SCHEMA_VERSION}): upgrade ruclip-search."
                )
            if version < SCHEMA_VERSION and readonly and db is not None:  # concurrent migrations: advisory lock
                store.close()
                with cls(index_dir, readonly=False, db=db) as writer:
                    writer.migrate()
                store = cls(index_dir, readonly=True, db=db)
            elif version < SCHEMA_VERSION and readonly:
                store.close()
                cls._upgrade_for_reader(index_dir, version)
                store = cls(index_dir, readonly=True)
            elif version < SCHEMA_VERSION:
                store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _upgrade_for_reader(cls, index_dir: str | os.PathLike[str], version: int) -> None:
        """Migrate an older index a reader opened, under the write lock; StorageError with a hint when not safe."""

        def cannot(why: str) -> StorageError:
            return StorageError(
                f"Index {os.fspath(index_dir)!r} has schema {version}, older than this ruclip-search "
                f"({SCHEMA_VERSION}), and cannot be upgraded now ({why}): run `ruclip-index build PHOTOS_DIR "
                f"--index {os.fspath(index_dir)}` once to upgrade it."
            )

        if not (os.access(index_dir, os.W_OK) and os.access(Path(index_dir) / DB_NAME, os.W_OK)):
            raise cannot("the index folder is read-only")
        try:
            lock = IndexLock(index_dir).acquire()
        except IndexLockedError:
            raise cannot("a build holds it") from None
        except OSError as e:
            raise cannot(e.strerror or str(e)) from e
        try:
            with cls(index_dir, readonly=False) as writer:
                writer.migrate()
        except StorageError as e:
            raise cannot(str(e)) from e
        finally:
            lock.release()

    @classmethod
    def create(cls, index_dir: str | os.PathLike[str], *, db: str | None = None) -> Store:
        """Open an index for writing, creating the directory and database (tables, in a PostgreSQL `db`), and
        applying pending migrations."""
        try:
            Path(index_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"Cannot create index folder {os.fspath(index_dir)!r}: {e.strerror}.") from e
        store = cls(index_dir, readonly=False, db=db)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()
        if getattr(self, "_vectors", None) is not None:
            self._vectors.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        """The schema the database is at (0: empty); StorageError when it is not an index database."""
        try:
            with self.engine.connect() as conn:
                return self._read_version(conn)
        except sa.exc.DBAPIError as e:
            raise StorageError(
                f"Cannot read {self.where} ({e.orig}): it is not an index database, or it is damaged; "
                "build the index again into a new folder."
            ) from e

    @staticmethod
    def _read_version(conn: sa.Connection) -> int:
        if not sa.inspect(conn).has_table("meta"):
            return 0
        row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
        return int(row[0]) if row else 0

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply migrations up to `target`, each in its own transaction; returns the new version.

        Several processes may open an older index at once: each migration holds the write lock (SQLite; its DDL
        is then atomic too, which sqlite3 would run in autocommit) or a transaction-scoped advisory lock
        (PostgreSQL) and re-reads the version inside it.
        """
        version = start = self.schema_version()
        try:
            while version < target:
                with self._begin_write(serialise=False) as conn:
                    if self.dialect == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                    version = self._read_version(conn)
                    if version >= target:
                        break
                    for stmt in migration_sql(version, self.dialect):
                        conn.exec_driver_sql(stmt)
                    name = MIGRATIONS[version][0]
                    self._set_meta(conn, schema_version=str(version + 1), **{f"migration_{version + 1:03d}": name})
                version += 1
            if start < ANALYZED_FROM <= version and start > 0:  # an existing index gains the filter indexes (m007)
                self.analyze()
        except sa.exc.DBAPIError as e:
            raise StorageError(f"Cannot upgrade the index database {self.where}: {e.orig}.") from e
        return version

    def analyze(self) -> None:
        """Refresh the query planner's statistics, so that a search filter starts from its most selective index
        (a collection's, not the formats' that match a fifth of the photos: 439 -> 5 ms at 1M photos on SQLite,
        which without statistics takes every equality index as equally selective). SQLite samples
        (analysis_limit: milliseconds at any size); PostgreSQL runs ANALYZE on the two tables filters read."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql("ANALYZE images, labels")
            else:
                conn.exec_driver_sql(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
                conn.exec_driver_sql("ANALYZE")

    # -- meta ----------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        """All meta keys: schema_version, model, dim, faiss_file, index_version, index_type, recall_at_10."""
        with self.engine.connect() as conn:
            return {k: v for k, v in conn.execute(sa.select(meta_table.c.key, meta_table.c.value))}

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == key)).first()
        return row[0] if row else default

    @staticmethod
    def _set_meta(conn: sa.Connection, **values: str | None) -> None:
        for key, value in values.items():
            if value is None:
                conn.execute(sa.delete(meta_table).where(meta_table.c.key == key))
            else:
                conn.execute(_meta_upsert(conn.dialect.name, key, value))

    def set_meta(self, **values: str | None) -> None:
        """Set (or with None, delete) meta keys in one transaction."""
        with self.engine.begin() as conn:
            self._set_meta(conn, **values)

    # -- read API (search, server, info) -------------------------------------------------------------
    @property
    def model_name(self) -> str | None:
        return self.get_meta("model")

    @property
    def dim(self) -> int | None:
        value = self.get_meta("dim")
        return int(value) if value else None

    def index_version(self) -> int:
        """Version stamp of the current FAISS file; cheap to poll for hot-swapping (one tiny query)."""
        return int(self.get_meta("index_version", "0") or 0)

    def faiss_path(self) -> Path | None:
        """The FAISS file named in meta (opened by readers), or None before the first build finished."""
        name = self.get_meta("faiss_file")
        return self.dir / name if name else None

    def roots(self) -> dict[int, str]:
        """Root folders by id, as the database holds them now."""
        with self.engine.connect() as conn:
            return self._read_roots(conn)

    @staticmethod
    def _read_roots(conn: sa.Connection) -> dict[int, str]:
        # Read once per query, in its connection, never cached across calls: a running server must see the
        # roots a later build adds (else `under=` a new root finds nothing), and a rebuild may replace the whole
        # database. The table has a handful of rows, so this costs next to nothing.
        rows = conn.execute(_statements().roots).all()
        return {rid: os.fsdecode(path) for rid, path in rows}

    def _record(self, row: sa.Row[Any], roots: dict[int, str]) -> ImageRecord:
        if row.root_id is None:  # a photo put by key, with no file
            root = rel = path = ""
            raw_path = live_path = None
        else:
            if row.root_id not in roots:  # a build added this root after `roots` was read (another snapshot)
                roots.update(self.roots())
            root = roots[row.root_id]
            rel = os.fsdecode(row.relpath)
            path = os.path.join(root, rel)
            folder = os.path.dirname(path)
            raw_path = os.path.join(folder, os.fsdecode(row.raw_name)) if row.raw_name else None
            live_path = os.path.join(folder, os.fsdecode(row.live_name)) if row.live_name else None
        return ImageRecord(
            row.id,
            path,
            root,
            rel,
            row.size,
            row.mtime_ns,
            row.width,
            row.height,
            row.format,
            row.taken_at,
            row.camera_make,
            row.camera_model,
            row.indexed_at,
            row.error,
            row.key,
            row.collection,
            tuple(sorted(row.labels.split(_LABEL_SEP))) if row.labels else (),
            media=row.media,
            parent_id=row.parent_id,
            t=row._mapping["t"],
            duration=row.duration,
            raw_path=raw_path,
            live_path=live_path,
        )

    def get_images(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Records for the given ids (those that exist), keyed by id."""
        with self.engine.connect() as conn:
            return self._records(conn, ids)

    def _records(self, conn: sa.Connection, ids: Iterable[int]) -> dict[int, ImageRecord]:
        out: dict[int, ImageRecord] = {}
        roots = self._read_roots(conn)
        for chunk in _chunks([int(i) for i in ids]):
            for row in conn.execute(_statements().records_by_id, {"ids": chunk}):
                out[row.id] = self._record(row, roots)
        return out

    def get_image(self, image_id: int) -> ImageRecord | None:
        return self.get_images([image_id]).get(int(image_id))

    def get_by_key(self, key: str) -> ImageRecord | None:
        """The record of the photo put with this key, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(_statements().record_by_key, {"key": key}).first()
            return self._record(row, self._read_roots(conn)) if row is not None else None

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sa.Connection]:
        """A connection in one read transaction: every query in it sees the same committed state (SQLite's WAL;
        PostgreSQL's REPEATABLE READ, since its default READ COMMITTED takes a new snapshot per statement)."""
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
                conn.begin()
            else:
                conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                conn.rollback()

    @staticmethod
    def _max_seq(conn: sa.Connection) -> int:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(changes_table.c.seq), 0))).scalar_one())

    def max_seq(self) -> int:
        """The last change seq (0: none yet); cheap to poll (one index lookup)."""
        with self.engine.connect() as conn:
            return self._max_seq(conn)

    def changes_since(self, seq: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids changed after `seq` that now have an embedding, ids changed after `seq` that no longer exist or
        have none, the new max seq): both sorted int64, from one snapshot."""
        with self._snapshot() as conn:
            top = self._max_seq(conn)
            changed = sa.select(changes_table.c.image_id).where(changes_table.c.seq > int(seq)).distinct().subquery()
            query = sa.select(changed.c.image_id, images_table.c.embedding.is_not(None)).select_from(
                changed.outerjoin(images_table, images_table.c.id == changed.c.image_id)
            )
            live, gone = [], []
            for image_id, has in conn.execute(query):
                (live if has else gone).append(image_id)
        return np.sort(np.array(live, dtype=np.int64)), np.sort(np.array(gone, dtype=np.int64)), top

    def snapshot_embeddings(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, vectors, max seq) of every embedded image from one snapshot: what a FAISS file built from them
        covers (see `faiss_seq`)."""
        dim = self.dim or 0
        with self._snapshot() as conn:
            seq = self._max_seq(conn)
            parts = list(self._iter_embeddings(conn, dim))
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32), seq
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), seq

    def find_path(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        """The record of an indexed file by its path (absolute or relative to cwd), or None."""
        path = os.path.abspath(os.fspath(path))
        cols = _record_columns()
        with self.engine.connect() as conn:
            roots = self._read_roots(conn)
            for rid, root in roots.items():
                if path.startswith(root.rstrip(os.sep) + os.sep):
                    rel = os.fsencode(os.path.relpath(path, root))
                    row = conn.execute(
                        sa.select(*cols).where(images_table.c.root_id == rid, images_table.c.relpath == rel)
                    ).first()
                    if row is not None:
                        return self._record(row, roots)
        return None

    def iter_images(self, *, errors: bool | None = None) -> Iterator[ImageRecord]:
        """All records in id order; errors=True only failed files, False only indexed ones."""
        cols = _record_columns()
        query = sa.select(*cols).where(images_table.c.parent_id.is_(None)).order_by(images_table.c.id)
        if errors is True:
            query = query.where(images_table.c.error.is_not(None))
        elif errors is False:
            query = query.where(images_table.c.error.is_(None))
        with self.engine.connect() as conn:
            roots = self._read_roots(conn)
            for row in conn.execution_options(yield_per=1000).execute(query):  # a server-side cursor on PG
                yield self._record(row, roots)

    def filter_ids(self, filters: SearchFilters) -> np.ndarray | None:
        """Sorted int64 ids of embedded images passing `filters`, or None when they restrict nothing.

        min_score is not applied here (it trims the ranked list, see `Index.search`). In one connection, so
        the roots and the ids come from the same snapshot.
        """
        if not filters.restricts_ids:
            return None
        with self.engine.connect() as conn:
            query = self._filter_query(conn, filters)
            ids = np.fromiter((r[0] for r in conn.execute(query)), dtype=np.int64)
            if filters.media != "photo" and self._has_frames(conn):
                videos = query.where(images_table.c.media == "video").scalar_subquery()
                frames = sa.select(images_table.c.id).where(images_table.c.parent_id.in_(videos))
                ids = np.concatenate([ids, np.fromiter((r[0] for r in conn.execute(frames)), dtype=np.int64)])
        return np.sort(ids)

    def _filter_query(self, conn: sa.Connection, filters: SearchFilters) -> Any:
        """The SELECT of the ids of embedded images passing `filters` (frames aside: see filter_ids); each
        condition has an index to read (m007, ix_images_collection, the labels' and (root_id, relpath)'s)."""
        conds: list[Any] = []
        if filters.taken_from is not None:  # taken_at holds naive ISO strings, which sort as times do
            conds.append(images_table.c.taken_at >= filters.taken_from.isoformat())
        if filters.taken_to is not None:
            conds.append(images_table.c.taken_at <= filters.taken_to.isoformat())
        if filters.formats is not None:
            conds.append(images_table.c.format.in_(sorted(filters.formats)))
        if filters.collections is not None:
            conds.append(images_table.c.collection.in_(sorted(filters.collections)))
        if filters.labels is not None:
            conds.append(
                images_table.c.id.in_(
                    sa.select(labels_table.c.image_id).where(labels_table.c.label.in_(sorted(filters.labels)))
                )
            )
        if filters.media is not None:  # frame rows carry no metadata: they pass with their video, below
            conds.append(
                images_table.c.media == "video" if filters.media == "video" else images_table.c.media.is_(None)
            )
        if filters.under is not None:
            conds.append(self._under_clause(filters.under, self._read_roots(conn)))
        return sa.select(images_table.c.id).where(images_table.c.embedding.is_not(None), *conds)

    @staticmethod
    def _has_frames(conn: sa.Connection) -> bool:
        query = sa.select(images_table.c.id).where(images_table.c.parent_id.is_not(None)).limit(1)
        return conn.execute(query).first() is not None

    def has_videos(self) -> bool:
        """Whether any video frame is stored (only then does a search collapse frame hits to their video)."""
        with self.engine.connect() as conn:
            return (
                self._has_frames(conn)
                or conn.execute(sa.select(images_table.c.id).where(images_table.c.media == "video").limit(1)).first()
                is not None
            )

    @staticmethod
    def _under_clause(path: str, roots: dict[int, str]) -> Any:
        """Images at or below absolute folder (or file) `path`: whole roots inside it, or a relpath prefix."""
        clauses = []
        for rid, root in roots.items():
            root_n = root.rstrip(os.sep) or os.sep
            if path == root_n or root_n.startswith(path.rstrip(os.sep) + os.sep):
                clauses.append(images_table.c.root_id == rid)  # the whole root lies under `path`
            elif path.startswith(root_n.rstrip(os.sep) + os.sep):
                rel = os.fsencode(os.path.relpath(path, root_n))
                prefix = rel + os.fsencode(os.sep)
                # The file itself, or relpaths in [prefix, prefix with its last byte + 1): a range of the UNIQUE
                # (root_id, relpath) index, where a substr() test read every row of the root (bytes compare as
                # bytes in both databases, and the separator is never the byte 0xff)
                upper = prefix[:-1] + bytes([prefix[-1] + 1])
                clauses.append(sa.and_(images_table.c.root_id == rid, images_table.c.relpath == rel))
                clauses.append(
                    sa.and_(
                        images_table.c.root_id == rid,
                        images_table.c.relpath >= prefix,
                        images_table.c.relpath < upper,
                    )
                )
        return sa.or_(*clauses) if clauses else sa.false()

    def get_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (len(ids), dim) embeddings in the given order; raises KeyError for an id without one."""
        found: dict[int, bytes] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in ids]):
                found.update((r[0], r[1]) for r in conn.execute(_statements().embeddings_by_id, {"ids": chunk}))
        missing = [i for i in ids if int(i) not in found]
        if missing:
            raise KeyError(missing[0])
        # the dimension from the rows themselves (float16) when there are any: `self.dim` is a query of its own
        dim = len(next(iter(found.values()))) // 2 if found else (self.dim or 0)
        return decode_embeddings([found[int(i)] for i in ids], dim)

    def iter_embeddings(self, batch: int = 50_000, *, frames: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All stored embeddings in id order, as (ids int64, vectors float32) chunks; `frames=False` leaves out
        the extra frames of videos (one vector per photo or video: duplicates, classify)."""
        dim = self.dim or 0
        with self.engine.connect() as conn:
            yield from self._iter_embeddings(conn, dim, batch, frames=frames)

    @staticmethod
    def _iter_embeddings(
        conn: sa.Connection, dim: int, batch: int = 50_000, *, frames: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        last = -1
        conds = [] if frames else [images_table.c.parent_id.is_(None)]
        while True:
            rows = conn.execute(
                sa.select(images_table.c.id, images_table.c.embedding)
                .where(images_table.c.embedding.is_not(None), images_table.c.id > last, *conds)
                .order_by(images_table.c.id)
                .limit(batch)
            ).all()
            if not rows:
                return
            last = rows[-1][0]
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, decode_embeddings([r[1] for r in rows], dim)

    @contextlib.contextmanager
    def embedding_snapshot(self, batch: int = 50_000) -> Iterator[EmbeddingSnapshot]:
        """Every embedded image as of one read transaction, to stream into a FAISS build (see EmbeddingSnapshot)."""
        dim = self.dim or 0
        with self._snapshot() as conn:
            yield EmbeddingSnapshot(conn, dim, batch)

    def changed_embeddings(self, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(ids changed after `seq` that have an embedding, their vectors, ids changed after `seq` that no longer
        have one, the new max seq), from one snapshot: what folding the changes into a FAISS file needs."""
        with self._snapshot() as conn:
            top = self._max_seq(conn)
            changed = sa.select(changes_table.c.image_id).where(changes_table.c.seq > int(seq)).distinct().subquery()
            query = sa.select(changed.c.image_id, images_table.c.embedding).select_from(
                changed.outerjoin(images_table, images_table.c.id == changed.c.image_id)
            )
            live: dict[int, bytes] = {}
            gone: list[int] = []
            for image_id, blob in conn.execute(query):
                if blob is None:
                    gone.append(image_id)
                else:
                    live[image_id] = blob
        ids = np.array(sorted(live), dtype=np.int64)
        vecs = decode_embeddings([live[int(i)] for i in ids], self.dim or 0)
        return ids, vecs, np.sort(np.array(gone, dtype=np.int64)), top

    def embeddings_or_nan(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (len(ids), dim) embeddings in the given order, NaN rows for ids without one (deleted
        meanwhile): the re-ranking of IVF-PQ candidates reads them per query, so this is one statement on a
        kept connection (a fresh SQLite connection per call and an expanded IN list cost ~100 ms per 1,000 ids;
        this ~1 ms per 100 from the page cache)."""
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        if self.dialect == "sqlite" and self.readonly and len(ids) >= 2 * VECTOR_READ_PART:
            # rows not in the page cache cost a disk read each (~0.3 ms at 10M): read parts of the sorted ids
            # on the pool's connections at once (SQLite lets go of the GIL while it waits), about 2x faster
            order = sorted(ids)
            size = max(VECTOR_READ_PART, -(-len(order) // VECTOR_READ_THREADS))
            parts = [order[s : s + size] for s in range(0, len(order), size)]
            self._vector_engine()  # made once, here, not by the threads at once
            rows = [
                r
                for part in shared_pool("ruclip-vectors", VECTOR_READ_THREADS).map(self._vector_rows, parts)
                for r in part
            ]
        else:
            rows = self._vector_rows(ids)
        # the dimension from the rows themselves (float16): `self.dim` is a query of its own
        dim = len(rows[0][1]) // 2 if rows else (self.dim or 0)
        return _rows_or_nan({int(i): bytes(b) for i, b in rows}, ids, dim)

    def _vector_rows(self, ids: list[int]) -> list[tuple[int, bytes]]:
        """(id, float16 blob) of those `ids` that have an embedding, on one pooled connection."""
        with self._vector_engine().connect() as conn:
            if self.dialect == "sqlite":  # the DB-API cursor: SQLAlchemy's rows cost ~15 us each here
                cur = conn.connection.cursor()
                try:
                    return cur.execute(
                        "SELECT i.id, i.embedding FROM json_each(?) AS j JOIN images AS i ON i.id = j.value "
                        "WHERE i.embedding IS NOT NULL",
                        (json.dumps(ids),),
                    ).fetchall()
                finally:
                    cur.close()
            query = sa.text("SELECT id, embedding FROM images WHERE id = ANY(:ids) AND embedding IS NOT NULL")
            return [tuple(r) for r in conn.execute(query, {"ids": ids})]

    def _vector_engine(self) -> sa.Engine:
        """The engine `embeddings_or_nan` reads through: SQLite readers keep a small pool of connections (the
        main engine opens one per use), with a page cache that holds the table's interior pages."""
        if self.dialect != "sqlite" or not self.readonly:
            return self.engine
        engine = getattr(self, "_vectors", None)
        if engine is None:
            assert self.db_path is not None
            # a queue of connections, each used by one thread at a time (the "sqlite://" URL's default pool keeps
            # one per thread and closes the oldest past pool_size, under a thread still reading it)
            engine = sa.create_engine("sqlite://", creator=_connector(self.db_path, True), poolclass=sa.pool.QueuePool,
                                      pool_size=VECTOR_READ_THREADS + 4, max_overflow=8)  # fmt: skip
            sa.event.listen(engine, "connect", _on_connect(True))
            # a share of VECTOR_READ_CACHE_KB each: the parallel parts' connections each keep their own cache (64 MB
            # each cost 0.2 GB of serving RSS at 10M); the rest comes from the OS cache
            kb = VECTOR_READ_CACHE_KB // VECTOR_READ_THREADS
            sa.event.listen(engine, "connect", lambda c, _r: c.execute(f"PRAGMA cache_size=-{kb}"))
            sa.event.listen(engine, "handle_error", _damaged(self.db_path, True))
            self._vectors = engine
        return engine

    def all_embeddings(self, *, frames: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every embedded image (`frames=False`: not the extra frames of videos)."""
        parts = list(self.iter_embeddings(frames=frames))
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def count_fileless(self) -> int:
        """Photos written through the API without a file under a root (a rebuild cannot re-encode them)."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(
                images_table.c.root_id.is_(None), images_table.c.parent_id.is_(None)
            )).scalar_one())  # fmt: skip

    def counts(self) -> dict[str, int]:
        """images (embedded photos and videos, not their frames), errors, and of the images: videos, RAW+JPEG
        pairs, Live Photos."""
        c = images_table.c
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(sa.case((c.media == "video", 1), else_=0)), 0),
                    sa.func.count(c.raw_name), sa.func.count(c.live_name),
                ).where(c.embedding.is_not(None), c.parent_id.is_(None))
            ).one()  # fmt: skip
            errors = conn.execute(sa.select(sa.func.count()).where(c.error.is_not(None))).scalar_one()
        return {"images": int(row[0]), "errors": int(errors), "videos": int(row[1]), "raw_pairs": int(row[2]),
                "live_photos": int(row[3])}  # fmt: skip

    def info(self) -> dict[str, Any]:
        """Summary for `ruclip-index info`: counts, model, index type, dim, recall, size on disk."""
        meta = self.meta()
        size = sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file()) if self.dir.is_dir() else 0
        recall = meta.get("recall_at_10")
        return {
            "index": str(self.dir),
            "db": self.where if self.url is not None else None,  # PostgreSQL (password hidden); None: index.db
            **self.counts(),
            "roots": sorted(self.roots().values()),
            "model": meta.get("model"),
            "dim": int(meta["dim"]) if meta.get("dim") else None,
            "index_type": meta.get("index_type"),
            "index_params": json.loads(meta.get("index_params") or "{}"),
            "recall_at_10": float(recall) if recall else None,
            "faiss_file": meta.get("faiss_file"),
            "index_version": int(meta.get("index_version", "0") or 0),
            "schema_version": int(meta.get("schema_version", "0") or 0),
            "size_bytes": size,
        }

    # -- write API (indexer only, under the lock) ----------------------------------------------------
    def root_id(self, root: str) -> int:
        """Id of a root folder, created if new."""
        key = os.fsencode(root)
        with self._begin_write() as conn:  # two builds adding one root: the second finds the first's row
            row = conn.execute(sa.select(roots_table.c.id).where(roots_table.c.path == key)).first()
            if row:
                return int(row[0])
            return int(conn.execute(sa.insert(roots_table).values(path=key)).inserted_primary_key[0])

    def scan_state(self, under: Sequence[tuple[int, bytes]] | None = None) -> dict[tuple[int, bytes], ScanRow]:
        """(root_id, relpath) -> ScanRow of every stored file: what the indexer diffs the walk against.

        `under`: only files at or below these (root_id, relpath) paths (b"": the whole root), for the watcher.
        """
        c = images_table.c
        query = sa.select(
            c.root_id, c.relpath, c.id, c.size, c.mtime_ns, c.content_hash,
            c.embedding.is_not(None), c.error.is_not(None), c.raw_name, c.live_name,
        ).where(c.root_id.is_not(None))  # fmt: skip
        if under is None:
            chunks: list[Any] = [query]
        else:  # relpaths are bytes: "below p" is the range [p + b"/", p + b"0") ("0" follows "/"), index-backed
            conds = [
                c.root_id == rid
                if not rel
                else sa.and_(c.root_id == rid, sa.or_(c.relpath == rel, sa.and_(c.relpath >= rel + b"/",
                                                                                  c.relpath < rel + b"0")))
                for rid, rel in under
            ]  # fmt: skip
            chunks = [query.where(sa.or_(*conds[i : i + 200])) for i in range(0, len(conds), 200)]
        with self.engine.connect() as conn:
            return {
                (r[0], r[1]): ScanRow(r[2], r[3], r[4], r[5], bool(r[6]), bool(r[7]), r[8], r[9])
                for q in chunks
                for r in conn.execute(q)
            }

    def has_embeddings(self) -> bool:
        """Whether any image has an embedding (only then is the index bound to its model)."""
        with self.engine.connect() as conn:
            return (
                conn.execute(sa.select(images_table.c.id).where(images_table.c.embedding.is_not(None)).limit(1)).first()
                is not None
            )

    @staticmethod
    def content_by_hash(conn: sa.Connection, content_hash: bytes) -> StoredContent | None:
        """A stored embedding of a file with this content and that file's metadata, if any (moves, duplicates)."""
        meta_cols = [images_table.c[name] for name in META_COLUMNS]
        row = conn.execute(
            sa.select(images_table.c.embedding, *meta_cols)
            .where(
                images_table.c.content_hash == content_hash,
                images_table.c.embedding.is_not(None),
                images_table.c.media.is_(None),  # a video's frames are not copied: its copies are decoded
            )
            .limit(1)
        ).first()
        return StoredContent(row[0], ImageMeta(*row[1:])) if row is not None else None

    @staticmethod
    def files_by_hash(conn: sa.Connection, content_hash: bytes) -> list[tuple[int, int, bytes]]:
        """(id, root_id, relpath) of the folder files with an embedding of this content (the watcher's moves)."""
        c = images_table.c
        query = sa.select(c.id, c.root_id, c.relpath).where(
            c.content_hash == content_hash, c.embedding.is_not(None), c.root_id.is_not(None)
        )
        return [(int(r[0]), int(r[1]), bytes(r[2])) for r in conn.execute(query)]

    def embedding_by_hash(self, content_hash: bytes) -> bytes | None:
        """A stored float16 embedding of a file with this content, if any."""
        with self.engine.connect() as conn:
            found = self.content_by_hash(conn, content_hash)
        return found.embedding if found is not None else None

    @contextlib.contextmanager
    def _begin_write(self, serialise: bool = True) -> Iterator[sa.Connection]:
        """`engine.begin()` for a write that reads first: its reads are part of it, and writers run one at a time.

        SQLite takes the write lock first (BEGIN IMMEDIATE; others wait busy_timeout): Python's sqlite3 (legacy
        transaction mode) would begin only at the first INSERT/UPDATE/DELETE, leaving the reads before it in
        autocommit, so two writers could both read data_version N, or both see a new key absent. PostgreSQL
        begins with the first statement and takes `_serialise_writers`' lock (unless not `serialise`: migrations,
        before that table exists). Commit and rollback are SQLAlchemy's: sqlite3 sees the open transaction."""
        with self.engine.begin() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif serialise:
                self._serialise_writers(conn)
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """One write transaction that also bumps `data_version`, so the FAISS file is known to be stale.

        Write transactions run one at a time, their reads included (see `_begin_write`)."""
        try:
            with self._begin_write() as conn:
                yield conn
                if not conn.execute(_statements().bump_data_version).rowcount:
                    self._set_meta(conn, data_version="1")
        except sa.exc.OperationalError as e:
            raise StorageError(f"Cannot write the index database {self.where}: {e.orig}.") from e

    @classmethod
    def set_model(cls, conn: sa.Connection, name: str, dim: int) -> None:
        """Bind the index to a model (with the first embeddings it holds)."""
        cls._set_meta(conn, model=name, dim=str(dim))

    @staticmethod
    def _serialise_writers(conn: sa.Connection) -> None:
        """Make change seqs commit-ordered on PostgreSQL: hold an EXCLUSIVE lock on `changes` to commit.

        A sequence is not commit-ordered: a writer that drew seq 5 may commit after one that drew 6, and a
        reader that followed `seq > 4` up to 6 would never see 5. With this lock taken before any seq is drawn
        and held to commit, seqs are drawn in commit order (readers are not blocked: they take ACCESS SHARE).
        Taken first in every write transaction, not just before the insert, so that writers never wait on
        each other's row locks while holding it (a deadlock). SQLite has one writer at a time anyway (and
        `_begin_write` takes its lock first).
        """
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("LOCK TABLE changes IN EXCLUSIVE MODE")

    @classmethod
    def log_changes(cls, conn: sa.Connection, ids: Iterable[int]) -> None:
        """Append a change row per id (its embedding was written, replaced or deleted) in this transaction."""
        rows = [{"image_id": int(i)} for i in ids]
        if rows:
            cls._serialise_writers(conn)  # held already in `transaction()`; a no-op then
            conn.execute(sa.insert(changes_table), rows)

    @staticmethod
    def _log(conn: sa.Connection, ids: list[int]) -> list[int]:
        """`log_changes`, returning the seqs given, in order."""
        if not ids:
            return []
        Store._serialise_writers(conn)  # held already in `transaction()`; a no-op then
        return [int(r[0]) for r in conn.execute(_statements().insert_changes, [{"image_id": int(i)} for i in ids])]

    @classmethod
    def upsert_image(cls, conn: sa.Connection, row: ImageWrite, image_id: int | None = None) -> int:
        """Insert a row, or replace row `image_id` (keeping its id, hence its FAISS id); returns the id."""
        values = row.values()
        if image_id is None:
            image_id = int(conn.execute(sa.insert(images_table).values(**values)).inserted_primary_key[0])
            if row.embedding is not None:
                cls.log_changes(conn, [image_id])
            return image_id
        conn.execute(sa.update(images_table).where(images_table.c.id == image_id).values(**values))
        cls.log_changes(conn, [image_id])
        cls.delete_images(conn, cls._frames_of(conn, [image_id]))  # a replaced video's frames go with it
        return image_id

    @staticmethod
    def _frames_of(conn: sa.Connection, ids: Sequence[int]) -> list[int]:
        """Ids of the frame rows of these videos."""
        out: list[int] = []
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            query = sa.select(images_table.c.id).where(images_table.c.parent_id.in_(chunk))
            out += [int(r[0]) for r in conn.execute(query)]
        return out

    @classmethod
    def put_frames(cls, conn: sa.Connection, video_id: int, frames: Sequence[tuple[float, bytes]]) -> list[int]:
        """Insert a frame row (time, float16 embedding) per sampled frame of video `video_id`; returns their ids.

        Frame rows have no file, key or metadata: they are found through `parent_id` and hidden from listings,
        counts and duplicates; a search maps a frame hit to its video."""
        ids = [
            int(conn.execute(sa.insert(images_table).values(
                media="frame", parent_id=int(video_id), t=float(t), embedding=emb, size=0, mtime_ns=0,
                indexed_at=time.time(),
            )).inserted_primary_key[0])
            for t, emb in frames
        ]  # fmt: skip
        cls.log_changes(conn, ids)
        return ids

    @staticmethod
    def set_companions(conn: sa.Connection, image_id: int, raw_name: bytes | None, live_name: bytes | None) -> None:
        """Record the RAW file of a RAW+JPEG pair and the video of a Live Photo (file names beside the photo)."""
        conn.execute(
            sa.update(images_table).where(images_table.c.id == image_id).values(raw_name=raw_name, live_name=live_name)
        )

    def put_photos(self, writes: Sequence[PhotoWrite]) -> list[int]:
        """In ONE transaction, insert each photo, or replace the row with its key (keeping its id) and its
        labels; logs the changes; returns the ids in order. QueryError (nothing written) for bad input."""
        return [r.id for r in self.write_photos(writes, ()).records]

    def delete_keys(self, keys: Sequence[str]) -> list[int]:
        """In one transaction, delete the photos with these keys (absent keys are ignored); returns their ids."""
        return list(self.write_photos((), keys).deleted.values())

    def write_photos(self, writes: Sequence[PhotoWrite], delete: Sequence[str] = ()) -> PhotosWritten:
        """In ONE transaction: put `writes` (as `put_photos`), then delete the photos keyed `delete`.

        How concurrent API writes are committed together (group commit): a handful of statements per batch,
        not per photo, and one fsync. A key written twice keeps its last write; a photo deleted by `delete`
        in the same call is returned as written (it was, then it went). The result also says which change
        seqs the call logged and the FAISS file version it wrote against, so the writer can make its own
        writes searchable without reading them back.
        """
        values = [w.values() for w in writes]  # validate all before writing any
        keys = list(dict.fromkeys(str(k) for k in delete))
        roots: dict[int, str] = {}
        if self.lean_writes and self.dialect == "sqlite" and all(w.root_id is None for w in writes):
            ids, deleted, seqs, version = self._write_photos_sqlite(writes, values, keys)
        else:
            try:
                with self.transaction() as conn:
                    ids = self._put(conn, writes, values)
                    deleted = {}
                    for chunk in _chunks(keys):
                        deleted.update((k, int(i)) for k, i in conn.execute(_statements().ids_by_key, {"keys": chunk}))
                    for chunk in _chunks(list(deleted.values())):
                        conn.execute(_statements().delete_images, {"ids": chunk})
                    seqs = self._log(conn, list(dict.fromkeys(ids)) + list(deleted.values()))
                    roots = self._read_roots(conn) if any(w.root_id is not None for w in writes) else {}
                    version = conn.execute(_statements().meta_value, {"b_key": "index_version"}).scalar()
            except sa.exc.IntegrityError as e:
                raise QueryError(f"Cannot store these photos ({e.orig}): two of them name the same file.") from e
        records = [self._written(i, w, v, roots) for i, w, v in zip(ids, writes, values, strict=True)]
        return PhotosWritten(records, deleted, seqs[0] if seqs else 0, seqs[-1] if seqs else 0, int(version or 0))

    def _write_photos_sqlite(
        self, writes: Sequence[PhotoWrite], values: list[dict[str, Any]], keys: list[str]
    ) -> tuple[list[int], dict[str, int], list[int], str | None]:
        """`write_photos` of photos without a file on SQLite: the same statements (`_statements()`, rendered once by
        `_sqlite_sql`), in the same order and transaction (`transaction()`: BEGIN IMMEDIATE first, data_version
        bumped, rolled back on any error), run on the sqlite3 connection itself. Returns the ids put (in order),
        deleted key -> id, the seqs logged and the `index_version` read.

        Why: the server's writer commits groups of one or two writes; at 200 writes/s py-spy found most of its
        ~1 ms CPU per write in SQLAlchemy's execution machinery (Engine.begin, Connection.execute of ~7
        statements, commit), not in SQLite. Rare shapes keep the SQLAlchemy path (`write_photos`): photos with a
        file (root_id/relpath: a folder build's row may be adopted) and PostgreSQL. The engine's
        `before_cursor_execute` listeners still see every statement (with no SQLAlchemy connection or context),
        so hooks on the engine (tests' injected races, statement logs) see this path as they see the other.
        """
        raw = self.engine.raw_connection()  # from the pool: its connect-time PRAGMAs (busy_timeout, ...) hold
        try:
            db = raw.driver_connection
            cur = db.cursor()
            hooks = self.engine.dispatch.before_cursor_execute

            def run(sql: str, args: Any = (), many: bool = False) -> sqlite3.Cursor:
                if hooks:
                    for hook in hooks:
                        sql, args = hook(None, cur, sql, args, None, many)
                return cur.executemany(sql, args) if many else cur.execute(sql, args)

            def ids_by_key(chunk: list[str]) -> list[tuple[str, int]]:
                stmt = _sqlite_sql("ids_by_key", in_list=("keys", len(chunk)))
                return [(k, int(i)) for k, i in run(stmt.sql, stmt.args(chunk))]

            try:
                # sqlite3's legacy transaction mode: an explicit BEGIN is honoured (and no implicit one added
                # before the INSERTs); commit() and rollback() end it. The pool's rollback on return is a no-op.
                run("BEGIN IMMEDIATE")
                ids = self._put_sqlite(run, ids_by_key, writes, values)
                deleted: dict[str, int] = {}
                for chunk in _chunks(keys):
                    deleted.update(ids_by_key(chunk))
                for chunk in _chunks(list(deleted.values())):
                    stmt = _sqlite_sql("delete_images", in_list=("ids", len(chunk)))
                    run(stmt.sql, stmt.args(chunk))
                log = _sqlite_sql("insert_changes", ("image_id",))
                seqs = [
                    int(run(log.sql, log.args({"image_id": i})).fetchall()[0][0])
                    for i in list(dict.fromkeys(ids)) + list(deleted.values())
                ]  # one row each: RETURNING gives no order for several; SQLite prepares the statement once
                meta = _sqlite_sql("meta_value")
                row = run(meta.sql, meta.args({"b_key": "index_version"})).fetchone()
                bump = _sqlite_sql("bump_data_version")
                if not run(bump.sql, bump.args({})).rowcount:
                    first = _render_sqlite(_meta_upsert("sqlite", "data_version", "1"))
                    run(first.sql, first.args({}))
                db.commit()
            except BaseException:
                try:
                    db.rollback()
                except sqlite3.Error:  # the connection is unusable: the pool opens another
                    raw.invalidate()
                raise
        except sqlite3.DatabaseError as e:  # worded as on the SQLAlchemy path: `_damaged`, then write_photos's
            assert self.db_path is not None
            damaged = _damage(self.db_path, self.readonly, e)
            if damaged is not None:
                raise damaged from e
            if isinstance(e, sqlite3.IntegrityError):
                raise QueryError(f"Cannot store these photos ({e}): two of them name the same file.") from e
            if isinstance(e, sqlite3.OperationalError):  # as `transaction()`: locked, disk full, read-only
                raise StorageError(f"Cannot write the index database {self.where}: {e}.") from e
            raise
        finally:
            raw.close()
        return ids, deleted, seqs, row[0] if row is not None else None

    @staticmethod
    def _put_sqlite(
        run: Callable[..., sqlite3.Cursor],
        ids_by_key: Callable[[list[str]], list[tuple[str, int]]],
        writes: Sequence[PhotoWrite],
        values: list[dict[str, Any]],
    ) -> list[int]:
        """`_put` through `_write_photos_sqlite`'s `run` (photos without a file: no folder build's row to adopt)."""
        found: dict[str, int] = {}
        for chunk in _chunks(list(dict.fromkeys(w.key for w in writes))):
            found.update(ids_by_key(chunk))
        last = {w.key: i for i, w in enumerate(writes)}  # a key written twice: its last write wins
        inserts = [i for i, w in enumerate(writes) if last[w.key] == i and w.key not in found]
        updates = [i for i, w in enumerate(writes) if last[w.key] == i and w.key in found]
        columns = tuple(values[0]) if values else ()  # every row sets the same columns (PhotoWrite.values)
        if inserts:
            insert = _sqlite_sql("insert_images", columns)
            for i in inserts:  # one row each: ids in order (RETURNING gives no order for several rows)
                found[writes[i].key] = int(run(insert.sql, insert.args(values[i])).fetchall()[0][0])
        if updates:
            update = _sqlite_sql("update_image", columns)
            rows = [update.args({**values[i], "b_id": found[writes[i].key]}) for i in updates]
            run(update.sql, rows, many=True)
            replaced = [found[writes[i].key] for i in updates]
            for chunk in _chunks(replaced):
                stmt = _sqlite_sql("delete_labels", in_list=("ids", len(chunk)))
                run(stmt.sql, stmt.args(chunk))
        labels = Store._label_rows(writes, found, inserts + updates)
        if labels:
            insert_labels = _sqlite_sql("insert_labels", ("image_id", "label"))
            run(insert_labels.sql, [insert_labels.args(row) for row in labels], many=True)
        return [found[w.key] for w in writes]

    @staticmethod
    def _written(image_id: int, write: PhotoWrite, values: dict[str, Any], roots: dict[int, str]) -> ImageRecord:
        """The record of a photo just written, from what was written (no read-back)."""
        root = rel = path = ""
        if write.root_id is not None and write.relpath is not None:
            root, rel = roots[write.root_id], os.fsdecode(write.relpath)
            path = os.path.join(root, rel)
        return ImageRecord(
            image_id, path, root, rel, values["size"], values["mtime_ns"], values["width"], values["height"],
            values["format"], values["taken_at"], values["camera_make"], values["camera_model"],
            values["indexed_at"], None, write.key, write.collection, tuple(sorted(set(write.labels))),
        )  # fmt: skip

    def _put(self, conn: sa.Connection, writes: Sequence[PhotoWrite], values: list[dict[str, Any]]) -> list[int]:
        """The rows of `writes` inserted or updated in `conn` with set-based statements; their ids in order."""
        c = images_table.c
        found: dict[str, int] = {}
        for chunk in _chunks(list(dict.fromkeys(w.key for w in writes))):
            found.update((k, int(i)) for k, i in conn.execute(_statements().ids_by_key, {"keys": chunk}))
        last = {w.key: i for i, w in enumerate(writes)}  # a key written twice: its last write wins
        inserts: list[int] = []
        updates: list[int] = []
        for i, w in enumerate(writes):
            if last[w.key] != i:
                continue
            if w.key not in found and w.root_id is not None:  # a file a folder build indexed: adopt its row
                row = conn.execute(sa.select(c.id, c.key).where(c.root_id == w.root_id, c.relpath == w.relpath)).first()
                if row is not None and row[1] is not None:
                    raise QueryError(
                        f"That file is already stored as photo {row[1]!r}: put it with that key, or "
                        f"delete {row[1]!r} first."
                    )
                if row is not None:
                    found[w.key] = int(row[0])
            (updates if w.key in found else inserts).append(i)
        if inserts:
            stmt = _statements().insert_images
            for i, (new_id,) in zip(inserts, conn.execute(stmt, [values[i] for i in inserts]), strict=True):
                found[writes[i].key] = int(new_id)
        if updates:
            conn.execute(_statements().update_image, [{**values[i], "b_id": found[writes[i].key]} for i in updates])
            replaced = [found[writes[i].key] for i in updates]
            for chunk in _chunks(replaced):
                conn.execute(_statements().delete_labels, {"ids": chunk})
        labels = self._label_rows(writes, found, inserts + updates)
        if labels:
            conn.execute(_statements().insert_labels, labels)
        return [found[w.key] for w in writes]

    @staticmethod
    def _label_rows(writes: Sequence[PhotoWrite], found: dict[str, int], rows: list[int]) -> list[dict[str, Any]]:
        """The labels rows of `writes[rows]` (their ids by key in `found`), for both write paths."""
        return [{"image_id": found[writes[i].key], "label": lb} for i in rows for lb in sorted(set(writes[i].labels))]

    @staticmethod
    def touch(conn: sa.Connection, image_id: int, size: int, mtime_ns: int) -> None:
        """A file whose size or mtime changed but whose content did not: record the new stat only."""
        conn.execute(sa.update(images_table).where(images_table.c.id == image_id).values(size=size, mtime_ns=mtime_ns))

    @staticmethod
    def move(conn: sa.Connection, image_id: int, root_id: int, relpath: bytes, size: int, mtime_ns: int) -> None:
        """A file moved or renamed (same content): repoint its row, keeping its id and embedding."""
        conn.execute(
            sa.update(images_table)
            .where(images_table.c.id == image_id)
            .values(root_id=root_id, relpath=relpath, size=size, mtime_ns=mtime_ns, indexed_at=time.time())
        )

    def keep_roots(self, paths: Iterable[str]) -> None:
        """Delete the roots not in `paths`, with their images (a rebuild's index holds only its own roots)."""
        keys = [os.fsencode(p) for p in paths]
        with self.transaction() as conn:
            gone = sa.select(roots_table.c.id).where(roots_table.c.path.not_in(keys))
            ids = [r[0] for r in conn.execute(sa.select(images_table.c.id).where(images_table.c.root_id.in_(gone)))]
            self.delete_images(conn, ids)
            conn.execute(sa.delete(roots_table).where(roots_table.c.path.not_in(keys)))

    def replace_with(self, other: Store, **meta: str | None) -> None:
        """In ONE transaction, make this index's roots, images and meta those of index `other`, then set `meta`.

        How a rebuild goes live: readers see the old index or the new one, never a mix or an empty one. Ids
        are copied, so `other`'s FAISS file (moved here first) fits; the id sequence never goes back (a
        deleted id is never reused). The schema keys stay this database's. The change log is this
        database's: no rows are logged, and `faiss_seq` becomes its max seq (readers reload everything when
        `index_version` changes). SQLite into SQLite attaches `other`; anything else streams it in chunks.
        """
        try:
            if self.dialect == other.dialect == "sqlite":
                self._replace_attached(other, **meta)
                return
            with self._begin_write() as conn, other._snapshot() as src:
                conn.execute(sa.delete(images_table))
                conn.execute(sa.delete(roots_table))
                for table in (roots_table, images_table, labels_table):
                    _copy_rows(src, conn, table)
                conn.execute(sa.delete(meta_table).where(~_structural(meta_table.c.key)))
                _copy_rows(src, conn, meta_table, sa.select(*meta_table.c).where(~_structural(meta_table.c.key)))
                _advance_sequences(conn, {})
                self._swapped(conn, meta)
        except sa.exc.OperationalError as e:
            raise StorageError(f"Cannot write the index database {self.where}: {e.orig}.") from e

    def _swapped(self, conn: sa.Connection, meta: dict[str, str | None]) -> None:
        """The end of a swap: bump `data_version` (readers drop caches keyed on it); the FAISS file matches it."""
        row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "data_version")).first()
        version = str(int(row[0]) + 1 if row else 1)
        self._set_meta(
            conn, **meta, data_version=version, faiss_data_version=version, faiss_seq=str(self._max_seq(conn)),
        )  # fmt: skip

    def _replace_attached(self, other: Store, **meta: str | None) -> None:
        """`replace_with` for two SQLite databases: INSERT ... SELECT from `other` attached (all in C)."""
        staged = sa.MetaData()
        s_roots, s_images, s_meta, s_labels = (
            t.to_metadata(staged, schema="staged") for t in (roots_table, images_table, meta_table, labels_table)
        )
        with self.engine.connect() as conn:
            conn.execute(sa.text("ATTACH DATABASE :path AS staged"), {"path": os.path.abspath(other.db_path or "")})
            conn.commit()  # ATTACH cannot run inside a transaction
            try:
                with conn.begin():
                    conn.execute(sa.delete(images_table))
                    conn.execute(sa.delete(roots_table))
                    conn.execute(sa.insert(roots_table).from_select(list(roots_table.c.keys()), sa.select(*s_roots.c)))
                    conn.execute(
                        sa.insert(images_table).from_select(list(images_table.c.keys()), sa.select(*s_images.c))
                    )
                    conn.execute(
                        sa.insert(labels_table).from_select(list(labels_table.c.keys()), sa.select(*s_labels.c))
                    )
                    conn.execute(sa.delete(meta_table).where(~_structural(meta_table.c.key)))
                    conn.execute(
                        sa.insert(meta_table).from_select(
                            ["key", "value"],
                            sa.select(s_meta.c.key, s_meta.c.value).where(~_structural(s_meta.c.key)),
                        )
                    )
                    self._swapped(conn, meta)
            finally:
                conn.execute(sa.text("DETACH DATABASE staged"))
                conn.commit()

    def copy_into(self, dest: Store, chunk: int | None = None, progress: Callable[[str, int], None] | None = None
                  ) -> dict[str, int]:  # fmt: skip
        """Copy this whole index (rows with their ids, labels, change log, meta) into `dest`, whose database
        must hold no index yet: `ruclip-index migrate` between SQLite and PostgreSQL.

        Read from one snapshot and written in ONE transaction (a failed copy leaves `dest` empty), streamed
        `chunk` rows at a time (never the whole index in memory). `dest`'s id sequences end past every id
        this index ever gave, deleted ones included. `progress(table, rows so far)`. Returns rows per table.
        """
        if dest.schema_version() != SCHEMA_VERSION or self.schema_version() != SCHEMA_VERSION:
            raise StorageError("Both indexes must be at the current schema: open each with this version first.")
        with dest.engine.connect() as conn:
            taken = conn.execute(sa.select(sa.func.count()).select_from(images_table)).scalar_one()
            model = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "model")).first()
        if taken or model:
            raise StorageError(
                f"The database {dest.where} already holds an index ({taken} images): migrate into an empty one."
            )
        counts: dict[str, int] = {}
        chunk = chunk or COPY_CHUNK
        try:
            with self._snapshot() as src, dest._begin_write() as dst:
                for table in (roots_table, images_table, labels_table, changes_table):
                    report = (lambda n, t=table.name: progress(t, n)) if progress is not None else None
                    counts[table.name] = _copy_rows(src, dst, table, chunk=chunk, progress=report)
                rows = src.execute(sa.select(*meta_table.c).where(~_structural(meta_table.c.key))).all()
                dest._set_meta(dst, **{k: v for k, v in rows})
                _advance_sequences(dst, {t: _high_water(src, t) for t in _SEQUENCES})
        except sa.exc.OperationalError as e:
            raise StorageError(f"Cannot copy the index into {dest.where}: {e.orig}.") from e
        return counts

    @classmethod
    def delete_images(cls, conn: sa.Connection, ids: Iterable[int]) -> None:
        """Delete rows (their labels, and a video's frame rows, go with them) and log the changes."""
        ids = [int(i) for i in ids]
        ids += cls._frames_of(conn, ids)
        for chunk in _chunks(ids):
            conn.execute(sa.delete(images_table).where(images_table.c.id.in_(chunk)))
        cls.log_changes(conn, ids)

    def data_version(self) -> int:
        return int(self.get_meta("data_version", "0") or 0)


_SEQUENCES = {"roots": "id", "images": "id", "changes": "seq"}  # tables whose ids a database hands out


def _structural(key: Any) -> Any:
    """Meta keys that describe the database's own schema (never copied between databases)."""
    return sa.or_(key == "schema_version", key.like("migration%"))


def _copy_rows(src: sa.Connection, dst: sa.Connection, table: sa.Table, query: Any = None, chunk: int = COPY_CHUNK,
               progress: Callable[[int], None] | None = None) -> int:  # fmt: skip
    """Stream `query` (default: all of `table`) from `src` into `table` in `dst`, `chunk` rows per insert."""
    query = query if query is not None else sa.select(*table.c)
    done = 0
    with contextlib.ExitStack() as stack:
        copy = None
        if dst.dialect.name == "postgresql":  # binary COPY: several times the rows/s of multi-row INSERTs
            cols = list(query.selected_columns)
            cursor = stack.enter_context(dst.connection.driver_connection.cursor())  # `dst`'s transaction
            names = ", ".join(c.name for c in cols)
            copy = stack.enter_context(cursor.copy(f"COPY {table.name} ({names}) FROM STDIN (FORMAT BINARY)"))
            copy.set_types([_PG_COPY_TYPES[c.type.compile(dialect=dst.dialect)] for c in cols])
        for part in src.execution_options(yield_per=chunk).execute(query).partitions():
            if copy is not None:
                for row in part:
                    copy.write_row(tuple(row))
            else:
                dst.execute(sa.insert(table), [dict(r._mapping) for r in part])
            done += len(part)
            if progress is not None:
                progress(done)
    return done


_PG_COPY_TYPES = {"BIGINT": "int8", "INTEGER": "int4", "TEXT": "text", "BYTEA": "bytea", "DOUBLE PRECISION": "float8"}


def _high_water(conn: sa.Connection, table: str) -> int:
    """The highest id a table's sequence ever handed out (deleted rows included), or its max id."""
    col = _SEQUENCES[table]
    top = int(conn.execute(sa.text(f"SELECT coalesce(max({col}), 0) FROM {table}")).scalar_one())
    if conn.dialect.name == "postgresql":
        seq = conn.execute(
            sa.text(f"SELECT pg_sequence_last_value(pg_get_serial_sequence('{table}', '{col}'))")
        ).scalar_one()
    else:  # AUTOINCREMENT tables only (roots reuses max(id) + 1, which a copy keeps)
        seq = conn.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}).scalar()
    return max(top, int(seq or 0))


def _advance_sequences(conn: sa.Connection, at_least: dict[str, int]) -> None:
    """After rows were inserted with their ids: each table's next id follows them, `at_least[table]` and
    what the sequence handed out before (it never goes back: FAISS ids of deleted rows are never reused)."""
    for table, col in _SEQUENCES.items():
        top = max(_high_water(conn, table), at_least.get(table, 0))
        if conn.dialect.name == "postgresql":
            conn.execute(
                sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'), :v, :called)"),
                {"v": max(top, 1), "called": top > 0},
            )
        elif table != "roots" and top:
            conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
            conn.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"), {"t": table, "v": top})


class IndexLock:
    """Exclusive write lock on an index directory (flock on `.lock`; the OS drops it if the process dies)."""

    def __init__(self, index_dir: str | os.PathLike[str], *, create: bool = False, db: str | None = None) -> None:
        """`create`: make the folder if needed (a build); else the index must exist (IndexNotFoundError; with
        a PostgreSQL `db`, its folder)."""
        self.path = Path(index_dir) / LOCK_NAME
        self.create = create
        self.db = db
        self._fd: int | None = None

    def acquire(self) -> IndexLock:
        if self.create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"Cannot create index folder {str(self.path.parent)!r}: {e.strerror}.") from e
        else:
            _require_index(self.path.parent, self.db)  # a mistyped --index must not leave a folder or a .lock behind
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(
                f"Index {str(self.path.parent)!r} is being built by another process; "
                "wait for it to finish (or stop it) and run again."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IndexLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
