"""The reference server's database: SQLite in one file (the default: the demo,
most tests, a small site) or PostgreSQL (``postgresql://…``: several server
processes and nodes on one database), behind one small interface so that the
store's SQL is written once.

    db = open_database("server.db" | "postgresql://user@host/db")
    rows = db.read("SELECT … WHERE x = ?", (x,))     # rows by key or index
    with db.write() as conn:                         # one serialised transaction
        conn.execute("INSERT … ON CONFLICT DO NOTHING", (…))

The SQL is SQLite's with ``?`` placeholders, kept to what both engines take
(``ON CONFLICT … DO NOTHING / DO UPDATE``, ``CASE`` rather than boolean sums);
PostgreSQL gets ``%s`` placeholders, and its DDL goes through ``pg_ddl``
(identity columns, 64-bit integers, double precision). Writes are serial, as
SQLite's are: ``BEGIN IMMEDIATE`` under a process lock there, a transaction-
scoped advisory lock here, so the store's read-then-write steps (a new
client's id, the PXE lists and their tasks) stay serial across processes and
nodes. Migrations are numbered; the version lives in ``PRAGMA user_version``
or in the table ``dsagent_schema``.

Errors: a database that cannot be reached, or is locked for longer than the
busy timeout, raises DatabaseUnavailable (the HTTP API answers 503 with
``Retry-After``); ``db.IntegrityError`` is the engine's constraint error.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Iterable, Iterator, Mapping

from taskserver.checks import StoreError

ADVISORY_LOCK = 0x64736167          # "dsag": every write transaction of the store
POOL_MAX = 16


class DatabaseUnavailable(StoreError):
    """The database cannot be reached or stayed locked; try again later."""


def open_database(target: str, *, synchronous: str = "NORMAL") -> "Database":
    """A PostgreSQL database for a ``postgresql://`` URL, else an SQLite file."""
    if target.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(target)
    return SQLiteDatabase(target, synchronous)


class Database:
    """What the store needs of an engine (see the module docstring)."""
    dialect = ""
    IntegrityError: type[Exception] | tuple[type[Exception], ...] = ()

    def read(self, sql: str, args: tuple = ()) -> list[Any]:
        raise NotImplementedError

    def snapshot(self):
        """A connection for several reads that see one state of the database."""
        raise NotImplementedError

    def write(self, serial: bool = True):
        """A write transaction; ``serial``: one at a time with every other serial
        write of the store (PostgreSQL: else only row locks, see ``serialize``)."""
        raise NotImplementedError

    def serialize(self, conn) -> None:
        """Make a ``serial=False`` transaction serial from here on (a read-then-
        write step inside a status ingest, say)."""

    def migrate(self, migrations: Mapping[int, str | Mapping[str, str]]) -> list[int]:
        """Bring the schema up to the newest migration; the numbers applied."""
        applied = []
        with self.write() as conn:
            version = self._version(conn)
            latest = max(migrations)
            if version > latest:
                raise StoreError(f"database schema version {version} is newer than this "
                                 f"server's ({latest}): use a newer dsagent-server")
            for number in range(version + 1, latest + 1):
                sql = migrations[number]
                if isinstance(sql, Mapping):
                    sql = sql[self.dialect]
                elif self.dialect == "postgresql":
                    sql = pg_ddl(sql)
                for statement in split_statements(sql):
                    conn.execute(statement)
                self._set_version(conn, number)
                applied.append(number)
        return applied

    def _version(self, conn) -> int:
        raise NotImplementedError

    def _set_version(self, conn, number: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def split_statements(sql: str) -> list[str]:
    return [s for s in sql.split(";") if s.strip()]


# ---- SQLite ---------------------------------------------------------------------------

class SQLiteDatabase(Database):
    """One connection shared by all threads under a lock, WAL mode, so a CLI
    process can write while a server process serves the same file."""
    dialect = "sqlite"
    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path: str, synchronous: str = "NORMAL"):
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.path = str(path)
        self.lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                     timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        with self.lock:
            for pragma in ("busy_timeout = 10000", "journal_mode = WAL",
                           f"synchronous = {synchronous.upper()}", "foreign_keys = ON"):
                self._conn.execute(f"PRAGMA {pragma}")

    def __str__(self) -> str:
        return self.path

    def read(self, sql: str, args: tuple = ()) -> list[Any]:
        with self.lock, _unavailable_when_locked(self.path):
            return self._conn.execute(sql, args).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            yield self._conn

    @contextmanager
    def write(self, serial: bool = True) -> Iterator[sqlite3.Connection]:
        with self.lock:
            conn = self._conn
            if conn.in_transaction:           # nested in the store's own transaction
                yield conn
                return
            with _unavailable_when_locked(self.path):
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _version(self, conn) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    def _set_version(self, conn, number: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(number)}")

    def close(self) -> None:
        with self.lock:
            self._conn.close()


@contextmanager
def _unavailable_when_locked(where: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise DatabaseUnavailable(f"{where}: {exc}") from None


# ---- PostgreSQL -----------------------------------------------------------------------

@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """``?`` placeholders (outside quotes) as ``%s``, a literal ``%`` as ``%%``."""
    out, quote = [], None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
            out.append("%%" if ch == "%" else ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        else:
            out.append("%s" if ch == "?" else "%%" if ch == "%" else ch)
    return "".join(out)


def pg_ddl(sql: str) -> str:
    """SQLite DDL as PostgreSQL's: identity keys, 64-bit integers, doubles."""
    sql = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b",
                 "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


class Row:
    """A row read by column name or by index, like sqlite3.Row."""
    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Iterable[Any]):
        self._index, self._values = index, tuple(values)

    def __getitem__(self, key):
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor):
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(index, values)


class _PgConnection:
    """A psycopg connection that takes the store's SQL (``?`` placeholders)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, args: Iterable[Any] = ()):
        cursor = self._conn.cursor()
        cursor.execute(pg_sql(sql), tuple(args))
        return cursor

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]):
        cursor = self._conn.cursor()
        cursor.executemany(pg_sql(sql), [tuple(r) for r in rows])
        return cursor


class PostgresDatabase(Database):
    """A pool of autocommit connections (psycopg_pool); each write is one
    transaction holding the store's advisory lock."""
    dialect = "postgresql"

    def __init__(self, url: str, max_size: int = POOL_MAX):
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self._psycopg = psycopg
        self._local = threading.local()          # the write transaction of this thread
        self.IntegrityError = psycopg.IntegrityError

        def configure(conn) -> None:
            conn.row_factory = _row_factory

        self.pool = ConnectionPool(url, min_size=1, max_size=max_size, open=False,
                                   kwargs={"autocommit": True}, configure=configure,
                                   name="dsagent-store")
        try:
            self.pool.open(wait=True, timeout=15)
        except Exception as exc:
            self.pool.close()
            raise DatabaseUnavailable(f"cannot connect to {self}: {exc}") from None

    def __str__(self) -> str:
        return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.url)   # no password shown

    @contextmanager
    def _connection(self):
        try:
            with self.pool.connection(timeout=30) as conn:
                yield conn
        except self._psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"{self}: {exc}") from None
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise DatabaseUnavailable(f"{self}: no connection free within 30 s") from None
            raise

    def read(self, sql: str, args: tuple = ()) -> list[Any]:
        active = getattr(self._local, "conn", None)
        if active is not None:                  # inside this thread's write: see its rows
            return active.execute(sql, args).fetchall()
        with self._connection() as conn:
            return _PgConnection(conn).execute(sql, args).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[_PgConnection]:
        active = getattr(self._local, "conn", None)
        if active is not None:
            yield active
            return
        with self._connection() as conn:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield _PgConnection(conn)

    @contextmanager
    def write(self, serial: bool = True) -> Iterator[_PgConnection]:
        active = getattr(self._local, "conn", None)
        if active is not None:                  # nested in this thread's write
            if serial:
                self.serialize(active)
            yield active
            return
        with self._connection() as conn:
            with conn.transaction():
                self._local.conn = _PgConnection(conn)
                if serial:
                    self.serialize(self._local.conn)
                try:
                    yield self._local.conn
                finally:
                    self._local.conn = None

    def serialize(self, conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (ADVISORY_LOCK,))   # reentrant

    def _version(self, conn) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS dsagent_schema (version BIGINT NOT NULL)")
        row = conn.execute("SELECT MAX(version) FROM dsagent_schema").fetchone()
        return row[0] or 0

    def _set_version(self, conn, number: int) -> None:
        conn.execute("DELETE FROM dsagent_schema")
        conn.execute("INSERT INTO dsagent_schema (version) VALUES (?)", (number,))

    # -- events, partitioned by month of their `at` ------------------------------------
    def ensure_event_partitions(self, now: datetime | None = None, ahead: int = 2) -> list[str]:
        """The partitions of this month and ``ahead`` more (made before they are
        needed, so no event of a current month lands in the default one)."""
        made = []
        month = _month(now or datetime.now(timezone.utc))
        with self.write() as conn:
            for _ in range(ahead + 1):
                following = _next_month(month)
                name = f"events_{month:%Y_%m}"
                exists = conn.execute("SELECT to_regclass(?)", (name,)).fetchone()[0]
                if exists is None:
                    conn.execute(f"CREATE TABLE {name} PARTITION OF events FOR VALUES FROM "
                                 f"('{month:%Y-%m-%d}') TO ('{following:%Y-%m-%d}')")
                    made.append(name)
                month = following
        return made

    def drop_event_partitions(self, keep_days: int, now: datetime | None = None) -> list[str]:
        """Drop the monthly partitions wholly older than ``keep_days``: old
        statuses go a month at a time, never by a mass DELETE."""
        now = now or datetime.now(timezone.utc)
        cutoff = now.timestamp() - keep_days * 86400
        dropped = []
        with self.write() as conn:
            names = [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'events' "
                "AND c.relname ~ '^events_[0-9]{4}_[0-9]{2}$'").fetchall()]
            for name in sorted(names):
                start = datetime.strptime(name[7:], "%Y_%m").replace(tzinfo=timezone.utc)
                if _next_month(start).timestamp() <= cutoff:
                    conn.execute(f"DROP TABLE {name}")
                    dropped.append(name)
        return dropped

    def close(self) -> None:
        self.pool.close()


def _month(when: datetime) -> datetime:
    return when.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0,
                                                 microsecond=0)


def _next_month(month: datetime) -> datetime:
    return month.replace(year=month.year + 1, month=1) if month.month == 12 \
        else month.replace(month=month.month + 1)
