"""The channel store on PostgreSQL: store.Store's table and guarantees, shared
by any number of hosts (needs pip install "dm-channels[postgres]").

    from dm_channels.pgstore import PostgresStore
    channel, created = PostgresStore("postgresql://dm@db/dm").get_or_create_dm(a, b)
"""

import os
import threading
import uuid
from contextlib import contextmanager
from datetime import timezone
from itertools import islice
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool

from dm_channels.store import LOCK_TIMEOUT, OTHER, POSTGRES_UNAVAILABLE, Channel, ChannelStore, StoreError

SCHEMA_VERSION = 1

# The same shape as the SQLite table: `seq` orders channels by creation, and
# UNIQUE (user_low, user_high) makes get-or-create atomic across every host.
# timestamptz(3) keeps milliseconds, so createdAt reads back exactly as served.
# dm_schema holds one row: the schema version.
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
-- A user's channels, newest first (see USER_CHANNELS).
CREATE INDEX IF NOT EXISTS dm_channel_by_low ON dm_channel (user_low, seq);
CREATE INDEX IF NOT EXISTS dm_channel_by_high ON dm_channel (user_high, seq);
CREATE TABLE IF NOT EXISTS dm_schema (
    version integer NOT NULL,
    one_row boolean PRIMARY KEY DEFAULT true CHECK (one_row)
);
"""

COLUMNS = "user_low, user_high, id, created_at"  # a Channel's row (_channel)

FIND = f"SELECT {COLUMNS} FROM dm_channel WHERE user_low = %s AND user_high = %s"

# One statement, its own transaction: RETURNING gives no row when the pair
# was there already, and then FIND reads the row that won.
CREATE = (
    "INSERT INTO dm_channel (user_low, user_high, id) VALUES (%s, %s, %s)"
    f" ON CONFLICT (user_low, user_high) DO NOTHING RETURNING {COLUMNS}"
)

GET = f"SELECT {COLUMNS} FROM dm_channel WHERE id = %s"

# Each arm is an index scan of at most n rows, newest first; the second
# skips a notes-to-self channel, which the first already has.
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

# Every channel, newest first: a backward scan of the primary key (seq).
ALL_CHANNELS = (
    f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq < %(before)s ORDER BY seq DESC LIMIT %(n)s"
)

AT_ANY_POSITION = "SELECT 1 FROM dm_channel WHERE seq = %(seq)s AND id = %(id)s"

# One statement per batch, rows kept in the given order so that `seq` keeps
# them oldest first.
ADD = (
    f"INSERT INTO dm_channel ({COLUMNS}) SELECT low, high, id, at FROM unnest("
    "%s::uuid[], %s::uuid[], %s::uuid[], %s::timestamptz[]"
    ") WITH ORDINALITY AS t (low, high, id, at, n) ORDER BY n ON CONFLICT DO NOTHING"
)

ALL_AFTER = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq > %s ORDER BY seq LIMIT %s"

# The channels of many pairs, in one statement (find_pairs).
FIND_ALL = (
    f"SELECT {COLUMNS} FROM dm_channel"
    " JOIN unnest(%s::uuid[], %s::uuid[]) AS t (low, high) ON user_low = low AND user_high = high"
)

# PostgreSQL's query_canceled (statement_timeout) and lock_not_available.
TIMEOUT_STATES = {"57014", "55P03"}

# Key of the advisory lock that lets one session at a time create the schema.
SCHEMA_LOCK = 0x646D5F6368616E  # "dm_chan"

# Added to the first error of a process that shows a transaction pooler (_run).
POOLER_HINT = (
    " (DATABASE looks like a pooler in transaction mode, such as PgBouncer's"
    " pool_mode = transaction: set PG_TRANSACTION_POOLING=true; until a"
    " restart, this process prepares no statements)"
)

# A connection the pool lost is retried with backoff for this long, then
# given up; the next request that needs one starts a fresh attempt. So the
# service is back within seconds of the database, whatever the outage's length.
RECONNECT_WINDOW = 10.0


def _channel(row):
    """The Channel of a row of COLUMNS."""
    user_low, user_high, channel_id, created_at = row
    return Channel(
        id=str(channel_id),
        user_low=str(user_low),
        user_high=str(user_high),
        created_at=created_at.astimezone(timezone.utc),
    )


class PostgresStore(ChannelStore):
    """DM channels in a PostgreSQL database, through one connection pool per
    process. The pool is made on first use, so a store can be built before a
    server forks its workers; each worker then makes its own.

    busy_timeout bounds each statement (statement_timeout), lock waits
    included; pool_timeout bounds the wait for a pooled connection;
    connect_timeout each attempt to connect (libpq counts at least 2 s).

    transaction_pooling says that `url` is a pooler that hands each
    transaction to any of its server sessions (PgBouncer's pool_mode =
    transaction): the store then keeps nothing in a session between
    transactions (no prepared statements, statement_timeout in each one).
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

    def __init__(
        self,
        url,
        busy_timeout=5.0,
        pool_min_size=1,
        pool_max_size=4,
        pool_timeout=5.0,
        connect_timeout=5,
        allow_self_dm=False,
        transaction_pooling=False,
    ):
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ValueError(
                f"pool sizes must satisfy 0 <= min <= max and max >= 1, "
                f"not min {pool_min_size!r}, max {pool_max_size!r}"
            )
        if pool_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("pool_timeout and connect_timeout must be positive")
        self.url = url
        self.busy_timeout = float(busy_timeout)
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.pool_timeout = float(pool_timeout)
        self.connect_timeout = connect_timeout
        self.allow_self_dm = allow_self_dm
        self.transaction_pooling = transaction_pooling
        self._lock = threading.Lock()
        self._pool = None
        self._schema_ready = False
        self._pid = os.getpid()

    @property
    def path(self):
        """Where the channels are, for messages: the URL without password or options."""
        parts = urlsplit(self.url)
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hostport}" if user else hostport
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def _get_pool(self):
        if self._pid != os.getpid():
            # Forked after use: the parent's pool and sessions are not ours.
            # Drop it without closing (closing would end the parent's sessions;
            # psycopg never ends them from another process when collected).
            self._lock = threading.Lock()
            self._pool = None
            self._schema_ready = False
            self._pid = os.getpid()
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url,
                    min_size=self.pool_min_size,
                    max_size=self.pool_max_size,
                    timeout=self.pool_timeout,
                    reconnect_timeout=RECONNECT_WINDOW,
                    kwargs=self._connect_options(),
                    configure=self._configure,
                    name="dm-channels",
                    open=False,
                )
                # Connects in the background; the first request waits for it.
                self._pool.open(wait=False)
            return self._pool

    def _connect_options(self):
        return {
            "autocommit": True,
            "connect_timeout": self.connect_timeout,
            "application_name": "dm-channels",
            # statement_timeout runs on the server: if the network path
            # dies, these bound the wait on this side.
            "tcp_user_timeout": round((self.busy_timeout + self.connect_timeout) * 1000),
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
        }

    def _describe(self, error):
        """psycopg's message on one line, with the URL's password (if any) masked."""
        message = " ".join(str(error).split()) or type(error).__name__
        password = urlsplit(self.url).password
        for secret in {password, unquote(password or "")} - {None, ""}:
            message = message.replace(secret, "***")
        return message

    def _error(self, message, error):
        """A StoreError for a psycopg error (its __cause__), with its cause."""
        if getattr(error, "sqlstate", None) in TIMEOUT_STATES:
            return StoreError(message, LOCK_TIMEOUT)
        # psycopg_pool's PoolTimeout is an OperationalError too.
        unavailable = isinstance(error, psycopg.OperationalError)
        return StoreError(message, POSTGRES_UNAVAILABLE if unavailable else OTHER)

    def _statement_timeout(self, scope=""):
        # statement_timeout 0 would mean "no limit": wait at least 1 ms.
        return f"SET {scope} statement_timeout = {max(1, round(self.busy_timeout * 1000))}"

    def _configure(self, conn):
        # The session's time zone is left alone: createdAt is read back as an
        # instant and served in UTC whatever it is (see _channel).
        if not self.transaction_pooling:
            conn.execute(self._statement_timeout())

    @contextmanager
    def _bounded(self, conn):
        """Run the block's statements under busy_timeout.

        A session of our own (directly, or through a pooler in session mode)
        keeps the statement_timeout that _configure set. A transaction pooler
        gives each transaction whichever server session is free, which knows
        neither that setting nor psycopg's prepared statements: then none are
        prepared, and the block is one transaction that sets its own timeout.
        That costs two round trips more per call, which is why a session of
        our own does not do it: on a direct connection it cost a warm get and
        a create about a quarter of their requests/s (bench/run.py).
        """
        if not self.transaction_pooling:
            yield
            return
        conn.prepare_threshold = None
        # One round trip for both (conn.transaction() would take two); a
        # conn.transaction() inside is a savepoint.
        conn.execute(f"BEGIN; {self._statement_timeout('LOCAL')}")
        try:
            yield
        except BaseException:
            if not conn.broken:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _run(self, work, retry=False):
        """work(conn) on a pooled connection; every database failure is a StoreError.

        A session the server dropped (restart, pg_terminate_backend) fails on
        its next statement. Then the pool's other idle connections are checked
        too (they were likely dropped with it) and, if `retry` (reads only:
        a write is never replayed), the work runs once more on a good one.
        """
        for attempt in (1, 2):
            conn = None
            try:
                pool = self._get_pool()
                with pool.connection() as conn:
                    if not self._schema_ready:
                        # Committed on its own, whatever becomes of the work.
                        with self._bounded(conn):
                            self._prepare(conn)
                        self._schema_ready = True
                    with self._bounded(conn):
                        return work(conn)
            except psycopg.Error as e:
                if conn is not None and conn.broken:
                    pool.check()
                    if retry and attempt == 1:
                        continue
                hint = ""
                if _lost_prepared_statement(e) and not self.transaction_pooling:
                    # Only a session shared with others does that, as behind a
                    # transaction pooler: this request fails (it may already
                    # have run another's statement of the same name), the log
                    # says what to set, once, and later ones do not meet it.
                    self.transaction_pooling = True
                    hint = POOLER_HINT
                raise self._error(f"{type(e).__name__}: {self._describe(e)}{hint}", e) from e

    def _prepare(self, conn):
        version = _schema_version(conn)
        if version is None:
            # Every worker of every host may get here at once: the lock makes
            # the others wait and then find the schema made.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute(SCHEMA)
                conn.execute(
                    "INSERT INTO dm_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                    (SCHEMA_VERSION,),
                )
            version = _schema_version(conn)
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this code's is "
                f"{SCHEMA_VERSION}"
            )

    def check_writable(self):
        """Raise StoreError, naming the cause as psycopg reports it (never the
        password), unless the database can be reached, holds the schema or
        lets this role create it, and lets it insert channels.

        For start-up checks: one direct connection (not the pool), bounded by
        connect_timeout and busy_timeout, closed before this returns, so a
        server may fork after it.
        """
        try:
            with psycopg.connect(self.url, **self._connect_options()) as conn:
                self._configure(conn)
                with self._bounded(conn):
                    self._prepare(conn)
                    (may_insert,) = conn.execute(
                        "SELECT has_table_privilege('dm_channel', 'INSERT')"
                    ).fetchone()
        except psycopg.Error as e:
            raise self._error(f"cannot use {self.path}: {self._describe(e)}", e) from e
        if not may_insert:
            raise StoreError(f"cannot use {self.path}: this role may not insert into dm_channel")

    def backup(self, dest_path):
        raise StoreError(
            "a PostgreSQL database is backed up with pg_dump or the server's own "
            "backups, not by dm-channels"
        )

    def init_schema(self):
        """Create the database's schema now (the first request would do it too)."""
        self._run(lambda conn: None)

    def schema_version(self):
        return self._run(_schema_version, retry=True)

    def _create(self, key):
        # One INSERT ... ON CONFLICT DO NOTHING, its own transaction, then,
        # if another request won the race, a read of the winner's row.
        def create(conn):
            row = conn.execute(CREATE, (*key, uuid.uuid4())).fetchone()
            if row is not None:
                return _channel(row), True
            return _channel(conn.execute(FIND, key).fetchone()), False

        return self._run(create)

    def _find_all(self, conn, keys):
        return conn.execute(FIND_ALL, [[low for low, _ in keys], [high for _, high in keys]]).fetchall()

    def add_channels(self, channels, batch=1000):

        def work(conn):
            added = 0
            it = iter(channels)
            with conn.transaction():
                while rows := list(islice(it, batch)):
                    added += conn.execute(
                        ADD,
                        [
                            [uuid.UUID(c.user_low) for c in rows],
                            [uuid.UUID(c.user_high) for c in rows],
                            [uuid.UUID(c.id) for c in rows],
                            [c.created_at for c in rows],
                        ],
                    ).rowcount
            return added

        return self._run(work)

    def pool_stats(self):
        """psycopg_pool's get_stats() of this process's pool (pool_size,
        pool_available, requests_waiting ...), or None before its first use
        (for the app's metrics)."""
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            return None
        return pool.get_stats()

    def close(self):
        """Close the pool and its connections (a later use opens a new pool)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._schema_ready = False
        if pool is not None and self._pid == os.getpid():
            pool.close()


def _lost_prepared_statement(error):
    """psycopg's prepared statement is not (or not the same) on the server
    session: e.g. 'prepared statement "_pg3_0" does not exist', '... already
    exists', 'bind message supplies 2 parameters, but prepared statement
    "_pg3_2" requires 3'."""
    errors = psycopg.errors
    if isinstance(error, (errors.InvalidSqlStatementName, errors.DuplicatePreparedStatement)):
        return True
    return isinstance(error, errors.ProtocolViolation) and "prepared statement" in str(error)


def _schema_version(conn):
    """The recorded schema version, or None before the schema exists."""
    if conn.execute("SELECT to_regclass('dm_schema')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT version FROM dm_schema").fetchone()
    return row[0] if row else None
