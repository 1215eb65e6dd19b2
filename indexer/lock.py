"""One writer per library: `hold_writer_lock` keeps a second `clipsearch index` from racing the first.

Two writers on one catalog would plan the same files and collide on the catalog's unique constraints (and on the
vector index files in the home). So a writer holds a lock for its whole run, and a second writer is refused at
once with one line naming the running one; readers (search, status, the UI) never take it and never wait.

* The home is always locked with `flock` on HOME/index.lock (and, for a SQLite catalog outside the home, on a
  lock file beside that database too). The kernel drops an flock when its process dies, however it dies, so a
  crash never leaves a lock that blocks: a lock file still holding a writer's record when we acquire it is the
  trace of a killed run, and is taken over with a log line. The holder writes {pid, since, host, command} inside,
  which is what the refusal names. The descriptor is close-on-exec, so spawned workers never inherit the lock.
* A PostgreSQL catalog may be written from several machines with different homes, so the catalog itself is
  locked too: `pg_try_advisory_lock` on a dedicated connection, keyed by a hash of the catalog (database and
  schema as the server names them, so two URLs spelling one server differently still meet). The holder's pid and
  host travel in that connection's `application_name`, and the time in its `backend_start`: a second writer finds
  both through `pg_locks` ⨝ `pg_stat_activity`, and they vanish with the lock, so there is no record to go stale.
  The server ends the backend of a killed client when the socket closes; should it linger (a half-open
  connection), a holder recorded on this host whose pid is gone is terminated and the lock taken over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from clipsearch.indexer.errors import CatalogError, ClipsearchError, LibraryBusy

log = logging.getLogger(__name__)

LOCK_NAME = "index.lock"  # in the home
_APP_PREFIX = "clipsearch-writer "  # application_name of the lock connection: "clipsearch-writer PID@HOST"
_PG_NAME_MAX = 63  # PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes


@dataclass(frozen=True)
class WriterInfo:
    """Who holds a writer lock, as far as the lock records it (any field may be unknown)."""

    pid: int | None = None  # process id of the writer, on `host`
    since: datetime | None = None  # when it took the lock (timezone-aware)
    host: str | None = None  # machine it runs on (a home on a network share, or a shared PostgreSQL catalog)
    command: str | None = None  # its command line (lock file only)

    def message(self) -> str:
        """The one line a refused writer prints."""
        parts = [f"pid {self.pid}"] if self.pid else []
        if self.host and not _is_this_host(self.host):
            parts.append(f"on {self.host}")
        if self.since:
            parts.append(f"since {self.since.astimezone().strftime('%Y-%m-%d %H:%M:%S')}")
        who = f" ({' '.join(parts)})" if parts else ""
        return f"another clipsearch index is running on this library{who}; wait for it or stop it"


@contextmanager
def hold_writer_lock(home: Path, db_url: str | None) -> Iterator[None]:
    """Hold the library's writer lock for the duration of the block; raise LibraryBusy if another writer has it.

    `db_url` None (or a sqlite URL) means a SQLite catalog: file locks only. A PostgreSQL URL adds an advisory
    lock on the catalog. Not reentrant: a second acquire, even in this process, is refused like any other writer.
    """
    with ExitStack() as stack:
        for path in _lock_files(Path(home), db_url):
            stack.enter_context(_file_lock(path))
        if db_url and db_url.startswith("postgresql"):
            stack.enter_context(_pg_lock(db_url))
        yield


# --- lock files ---------------------------------------------------------------------------------------------------
def _lock_files(home: Path, db_url: str | None) -> list[Path]:
    """HOME/index.lock, plus one beside a SQLite catalog kept outside the home (two homes may share it)."""
    paths = [home / LOCK_NAME]
    if db_url and db_url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database = make_url(db_url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            db = Path(database).absolute()
            if db.parent.resolve() != home.absolute().resolve():
                paths.append(db.with_name(db.name + ".lock"))
    return paths


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """flock `path` exclusively without waiting, record ourselves in it, empty it again on a clean release."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec by default (PEP 446)
    except OSError as e:
        raise ClipsearchError(f"cannot create the writer lock {path}: {e.strerror}") from e
    try:
        if not _flock(fd, path):  # a file system without flock: index as before rather than not at all
            yield
            return
        previous = _parse_file_info(os.pread(fd, 4096, 0))
        if previous is not None:  # the lock was free, so its recorded writer ended without releasing it
            log.info("took over the writer lock %s left by pid %s (since %s), which is gone", path, previous.pid,
                     previous.since and previous.since.astimezone().strftime("%Y-%m-%d %H:%M:%S"))
        _write_file_info(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # empty means released cleanly; a record left behind marks a killed run
    finally:
        os.close(fd)  # releases the flock


def _flock(fd: int, path: Path) -> bool:
    """Lock without waiting: True when locked, False when this file system cannot lock; LibraryBusy when held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise LibraryBusy(_read_file_info(path).message()) from None
    except OSError as e:
        log.warning("cannot lock %s (%s): concurrent writers are not kept apart", path, e.strerror)
        return False


def _write_file_info(fd: int) -> None:
    info = {"pid": os.getpid(), "since": datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "command": " ".join(sys.argv)[:1000]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _read_file_info(path: Path, wait: float = 1.0) -> WriterInfo:
    """The holder's record; it may be a moment behind its flock, so an empty or partial file is read again."""
    deadline = time.monotonic() + wait
    while True:
        try:
            found = _parse_file_info(path.read_bytes())
        except OSError:
            found = None
        if found is not None or time.monotonic() > deadline:
            return found or WriterInfo()
        time.sleep(0.05)


def _parse_file_info(raw: bytes) -> WriterInfo | None:
    try:
        d = json.loads(raw)
        since = datetime.fromisoformat(d["since"]) if d.get("since") else None
        return WriterInfo(int(d["pid"]), since, d.get("host"), d.get("command"))
    except (ValueError, KeyError, TypeError):
        return None


# --- PostgreSQL advisory lock ------------------------------------------------------------------------------------
@contextmanager
def _pg_lock(db_url: str) -> Iterator[None]:
    """Hold a session advisory lock on the catalog on a connection of its own, for the block's duration."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    name = f"{_APP_PREFIX}{os.getpid()}@{socket.gethostname()}"[:_PG_NAME_MAX]
    engine = sa.create_engine(db_url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                              connect_args={"application_name": name})
    try:
        conn = engine.connect()
    except SQLAlchemyError as e:
        engine.dispose()
        raise CatalogError(f"cannot open the catalog to take the writer lock: {str(e).splitlines()[0]}") from e
    try:
        _pg_session_settings(conn)
        key = _pg_key(conn)
        if not _pg_try(conn, key):
            _pg_take_over_or_refuse(conn, key)
        try:
            yield
        finally:
            try:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            except SQLAlchemyError as e:  # connection lost: the server released the lock with the session
                log.warning("writer lock connection lost before release: %s", str(e).splitlines()[0])
    finally:
        conn.close()
        engine.dispose()


def _pg_session_settings(conn: Any) -> None:
    """Keep the idle lock connection from being timed out, and let the server notice a vanished client soon."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    for setting in ("idle_session_timeout = 0", "idle_in_transaction_session_timeout = 0",
                    "tcp_keepalives_idle = 30", "tcp_keepalives_interval = 10", "tcp_keepalives_count = 3"):
        try:
            conn.execute(sa.text(f"SET {setting}"))
        except SQLAlchemyError:  # an older server without the setting
            pass


def _pg_key(conn: Any) -> int:
    """A signed 64-bit key for this catalog: its database and schema as the server names them."""
    import sqlalchemy as sa

    db, schema = conn.execute(sa.text("SELECT current_database(), current_schema()")).one()
    digest = hashlib.blake2b(f"clipsearch writer lock:{db}:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _pg_try(conn: Any, key: int, wait: float = 0.0) -> bool:
    """Try the lock, retrying for up to `wait` seconds."""
    import sqlalchemy as sa

    deadline = time.monotonic() + wait
    while True:
        if conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _pg_take_over_or_refuse(conn: Any, key: int) -> None:
    """Take the lock over from a holder recorded on this host whose process is gone, else raise LibraryBusy."""
    import sqlalchemy as sa

    info, backend = _pg_holder(conn, key)
    if info.pid is None or not info.host or not _is_this_host(info.host) or _pid_alive(info.pid):
        raise LibraryBusy(info.message())
    if not _pg_try(conn, key, wait=3.0):  # the server usually ends a killed client's session within moments
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": backend})
        if not _pg_try(conn, key, wait=5.0):
            raise LibraryBusy(info.message())
    log.info("took over the catalog's writer lock from pid %s (since %s), which is gone", info.pid,
             info.since and info.since.astimezone().strftime("%Y-%m-%d %H:%M:%S"))


def _pg_holder(conn: Any, key: int) -> tuple[WriterInfo, int | None]:
    """Who holds the advisory lock `key` in this database: (writer info, server backend pid)."""
    import sqlalchemy as sa

    row = conn.execute(sa.text(
        "SELECT a.application_name, a.backend_start, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid)"),
        {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).first()
    if row is None:  # released between our try and this look-up
        return WriterInfo(), None
    m = re.fullmatch(rf"{_APP_PREFIX}(\d+)@(.*)", row[0] or "")
    pid, host = (int(m.group(1)), m.group(2)) if m else (None, None)
    return WriterInfo(pid, row[1], host), row[2]


# --- processes -----------------------------------------------------------------------------------------------------
def _is_this_host(host: str) -> bool:
    """True when `host` names this machine (PostgreSQL may have cut the recorded name short)."""
    me = socket.gethostname()
    return host == me or (len(host) >= 8 and me.startswith(host))


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True
