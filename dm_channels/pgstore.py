"""The channel store on PostgreSQL, shared by any number of hosts (pip install "dm-channels[postgres]")."""

import os
import threading
import uuid
from contextlib import contextmanager
from datetime import timezone
from itertools import islice

import psycopg
from psycopg_pool import ConnectionPool

from dm_channels.settings import QUOTED, libpq_read, shown_database
from dm_channels.store import LOCK_TIMEOUT, OTHER, POSTGRES_UNAVAILABLE, Channel, ChannelStore, StoreError

SCHEMA_VERSION = 1

# UNIQUE (user_low, user_high) makes get-or-create atomic across hosts; timestamptz(3) keeps createdAt as served.
SCHEMA = """
CREATE TABLE IF NOT EXISTS dm_channel (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_low   uuid NOT NULL,
    user_high  uuid NOT NULL,
    id         uuid NOT NULL UNIQUE,
    created_at timestamptz(3) NOT NULL DEFAULT now(),
    UNIQUE (user_low, user_high),
    CHECK (user_low <= user_high)
);
CREATE INDEX IF NOT EXISTS dm_channel_by_low ON dm_channel (user_low, seq);
CREATE INDEX IF NOT EXISTS dm_channel_by_high ON dm_channel (user_high, seq);
CREATE TABLE IF NOT EXISTS dm_schema (  -- one row: the schema version
    version integer NOT NULL,
    one_row boolean PRIMARY KEY DEFAULT true CHECK (one_row)
);
"""

COLUMNS = "user_low, user_high, id, created_at"  # a Channel's row (_channel)
FIND = f"SELECT {COLUMNS} FROM dm_channel WHERE user_low = %s AND user_high = %s"
GET = f"SELECT {COLUMNS} FROM dm_channel WHERE id = %s"
# Its own transaction; no row when the pair was there already, and then FIND reads the winner's.
CREATE = (
    "INSERT INTO dm_channel (user_low, user_high, id) VALUES (%s, %s, %s)"
    f" ON CONFLICT (user_low, user_high) DO NOTHING RETURNING {COLUMNS}"
)

# Two index scans of at most n rows, newest first; the second skips a notes-to-self channel.
USER_CHANNELS = f"""
(SELECT seq, {COLUMNS} FROM dm_channel
  WHERE user_low = %(user)s AND seq < %(before)s ORDER BY seq DESC LIMIT %(n)s)
UNION ALL
(SELECT seq, {COLUMNS} FROM dm_channel
  WHERE user_high = %(user)s AND seq < %(before)s AND user_low <> %(user)s
  ORDER BY seq DESC LIMIT %(n)s)
ORDER BY seq DESC LIMIT %(n)s
"""
AT_USER_POSITION = (
    "SELECT 1 FROM dm_channel WHERE seq = %(seq)s AND id = %(id)s"
    " AND (user_low = %(user)s OR user_high = %(user)s)"
)

ALL_CHANNELS = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq < %(before)s ORDER BY seq DESC LIMIT %(n)s"
AT_ANY_POSITION = "SELECT 1 FROM dm_channel WHERE seq = %(seq)s AND id = %(id)s"

# One statement per batch, in the given order, so that `seq` keeps them oldest first.
ADD = (
    f"INSERT INTO dm_channel ({COLUMNS}) SELECT low, high, id, at FROM unnest("
    "%s::uuid[], %s::uuid[], %s::uuid[], %s::timestamptz[]"
    ") WITH ORDINALITY AS t (low, high, id, at, n) ORDER BY n ON CONFLICT DO NOTHING"
)

ALL_AFTER = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq > %s ORDER BY seq LIMIT %s"

TIMEOUT_STATES = {"57014", "55P03"}  # query_canceled (statement_timeout), lock_not_available
SCHEMA_LOCK = 0x646D5F6368616E  # "dm_chan": the advisory lock of whoever creates the schema

POOLER_HINT = (
    " (DATABASE looks like a pooler in transaction mode, such as PgBouncer's pool_mode = transaction:"
    " set PG_TRANSACTION_POOLING=true)"
)
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")  # libpq 14's


def _channel(row):
    user_low, user_high, channel_id, created_at = row
    return Channel(id=str(channel_id), user_low=str(user_low), user_high=str(user_high),
                   created_at=created_at.astimezone(timezone.utc))


class PostgresStore(ChannelStore):
    """DM channels in PostgreSQL, through a connection pool per process made on first use (after a fork).

    :param busy_timeout: seconds each statement may take, lock waits included.
    :param transaction_pooling: `url` is a pooler in transaction mode (PgBouncer's pool_mode = transaction).
    """

    FIND, GET, USER_CHANNELS, AT_USER_POSITION = FIND, GET, USER_CHANNELS, AT_USER_POSITION
    ALL_CHANNELS, AT_ANY_POSITION, ALL_AFTER = ALL_CHANNELS, AT_ANY_POSITION, ALL_AFTER
    _key = staticmethod(uuid.UUID)  # canonical text sorts as PostgreSQL's uuid does: byte by byte
    _channel = staticmethod(_channel)

    @staticmethod
    def _keys(low, high):
        return uuid.UUID(low), uuid.UUID(high)

    def _one(self, sql, params):
        return self._run(lambda conn: conn.execute(sql, params).fetchone(), retry=True)

    def __init__(self, url, busy_timeout=5.0, pool_min_size=1, pool_max_size=4, pool_timeout=5.0,
                 connect_timeout=5, allow_self_dm=False, transaction_pooling=False):
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ValueError(f"pool sizes must satisfy 0 <= min <= max and max >= 1, "
                             f"not min {pool_min_size!r}, max {pool_max_size!r}")
        if pool_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("pool_timeout and connect_timeout must be positive")
        self.url = url
        self.path = shown_database(url)  # for messages
        self._params, misread = libpq_read(url)
        self._problem = misread or _url_problem(self._params)  # refused by check_writable
        self.busy_timeout = float(busy_timeout)
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.pool_timeout = float(pool_timeout)
        self.connect_timeout = connect_timeout
        self.allow_self_dm = allow_self_dm
        self.transaction_pooling = transaction_pooling
        self._statement_timeout = max(1, round(self.busy_timeout * 1000))  # 0 would be no limit
        self._options = {
            "autocommit": True, "connect_timeout": connect_timeout, "application_name": "dm-channels",
            # statement_timeout runs on the server: if the network path dies, these bound our wait.
            "tcp_user_timeout": round((self.busy_timeout + connect_timeout) * 1000),
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
        }
        self._reset()

    def _reset(self):
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool = None
        self._schema_ready = False

    def _get_pool(self):
        if self._pid != os.getpid():
            # Forked after use: drop the parent's pool unclosed, as closing would end its sessions.
            self._reset()
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url, min_size=self.pool_min_size, max_size=self.pool_max_size, timeout=self.pool_timeout,
                    kwargs=self._options, configure=self._configure, name="dm-channels",
                    reconnect_timeout=10.0,  # seconds of retrying a lost connection; then a request tries afresh
                    open=True,  # connecting in the background; the first request waits
                )
            return self._pool

    def _error(self, prefix, error, hint=""):
        """A StoreError for psycopg's error: its message on one line, the URL's passwords masked, and its cause."""
        message = " ".join(str(error).split()) or type(error).__name__
        if self._params is None:
            message = QUOTED.sub('"…"', message)
        else:
            for key, value in self._params.items():
                if "password" in key and value:
                    message = message.replace(value, "***")
        if getattr(error, "sqlstate", None) in TIMEOUT_STATES:
            return StoreError(prefix + message + hint, LOCK_TIMEOUT)
        unavailable = isinstance(error, psycopg.OperationalError)  # psycopg_pool's PoolTimeout too
        return StoreError(prefix + message + hint, POSTGRES_UNAVAILABLE if unavailable else OTHER)

    def _configure(self, conn):
        # The session's time zone is left alone: _channel reads an instant and serves it in UTC.
        if not self.transaction_pooling:
            conn.execute(f"SET statement_timeout = {self._statement_timeout}")

    @contextmanager
    def _bounded(self, conn):
        """Run the block under busy_timeout; behind a transaction pooler, as one transaction preparing nothing."""
        if not self.transaction_pooling:
            yield  # the session keeps what _configure set, two round trips cheaper
            return
        conn.prepare_threshold = None
        # One round trip for both; a conn.transaction() inside is a savepoint.
        conn.execute(f"BEGIN; SET LOCAL statement_timeout = {self._statement_timeout}")
        try:
            yield
        except BaseException:
            if not conn.broken:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _run(self, work, retry=False):
        """work(conn) on a pooled connection, once more with `retry` if its session dropped;
        every failure a StoreError."""
        for attempt in (1, 2):
            conn = None
            try:
                pool = self._get_pool()
                with pool.connection() as conn:
                    if not self._schema_ready:
                        with self._bounded(conn):  # committed whatever becomes of the work
                            self._prepare(conn)
                        self._schema_ready = True
                    with self._bounded(conn):
                        return work(conn)
            except psycopg.Error as e:
                if conn is not None and conn.broken:
                    pool.check()  # its other idle sessions were likely dropped with it
                    if retry and attempt == 1:
                        continue
                hint = POOLER_HINT if _lost_prepared_statement(e) and not self.transaction_pooling else ""
                raise self._error(f"{type(e).__name__}: ", e, hint) from e

    def _prepare(self, conn):
        version = _schema_version(conn)
        if version is None:
            # Every worker of every host may get here at once: the others wait, then find it made.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute(SCHEMA)
                conn.execute("INSERT INTO dm_schema VALUES (%s) ON CONFLICT DO NOTHING", (SCHEMA_VERSION,))
            version = _schema_version(conn)
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}; this code's is {SCHEMA_VERSION}")

    def check_writable(self):
        """StoreError unless the URL is sound and this role can reach the database, make its schema and insert."""
        if self._problem:
            raise StoreError(f"cannot use {self.path}: {self._problem}")
        try:
            with psycopg.connect(self.url, **self._options) as conn:
                self._configure(conn)
                with self._bounded(conn):
                    self._prepare(conn)
                    (may_insert,) = conn.execute("SELECT has_table_privilege('dm_channel', 'INSERT')").fetchone()
        except psycopg.Error as e:
            raise self._error(f"cannot use {self.path}: ", e) from e
        if not may_insert:
            raise StoreError(f"cannot use {self.path}: this role may not insert into dm_channel")

    def backup(self, dest_path):
        raise StoreError("a PostgreSQL database is backed up with pg_dump or the server's own "
                         "backups, not by dm-channels")

    def init_schema(self):
        """Create the database's schema now (the first request would do it too)."""
        self._run(lambda conn: None)

    def schema_version(self):
        return self._run(_schema_version, retry=True)

    def _create(self, key):
        def create(conn):
            row = conn.execute(CREATE, (*key, uuid.uuid4())).fetchone()
            if row is not None:
                return _channel(row), True
            return _channel(conn.execute(FIND, key).fetchone()), False

        return self._run(create)

    def add_channels(self, channels, batch=1000):
        def work(conn):
            added, it = 0, iter(channels)
            with conn.transaction():
                while rows := list(islice(it, batch)):
                    columns = [[uuid.UUID(c.user_low) for c in rows], [uuid.UUID(c.user_high) for c in rows],
                               [uuid.UUID(c.id) for c in rows], [c.created_at for c in rows]]
                    added += conn.execute(ADD, columns).rowcount
            return added

        return self._run(work)

    def pool_stats(self):
        """psycopg_pool's get_stats() of this process's pool, or None before its first use."""
        pool = self._pool
        return None if pool is None or self._pid != os.getpid() else pool.get_stats()

    def close(self):
        """Close the pool and its connections (a later use opens a new pool)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._schema_ready = False
        if pool is not None and self._pid == os.getpid():
            pool.close()


def _url_problem(params):
    """What libpq would trip on in the URL's host list or target_session_attrs only when it connects."""
    hosts, ports = params.get("host", "").split(","), params.get("port", "").split(",")
    if len(hosts) > 1 and "" in hosts:
        return f"its host list {params['host']!r} has an empty host"
    if len(ports) not in (1, len(hosts)):
        return f"its {len(ports)} ports {params['port']!r} do not pair with its {len(hosts)} hosts"
    if not all(port == "" or port.isascii() and port.isdigit() and 0 < int(port) < 65536 for port in ports):
        return f"its ports {params['port']!r} are not all numbers from 1 to 65535"
    attrs = params.get("target_session_attrs", "any")
    if attrs not in TARGET_SESSION_ATTRS:
        return f"target_session_attrs must be one of {', '.join(TARGET_SESSION_ATTRS)}, not {attrs!r}"
    return None


def _lost_prepared_statement(error):
    errors = psycopg.errors
    lost = isinstance(error, (errors.InvalidSqlStatementName, errors.DuplicatePreparedStatement))
    # or e.g. 'bind message supplies 2 parameters, but prepared statement "_pg3_2" requires 3'
    return lost or isinstance(error, errors.ProtocolViolation) and "prepared statement" in str(error)


def _schema_version(conn):  # None before the schema exists
    if conn.execute("SELECT to_regclass('dm_schema')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT version FROM dm_schema").fetchone()
    return row[0] if row else None
