"""The channel store: one SQLite table of DM channels keyed by the sorted pair.

Usable without Flask:

    from store import Store
    channel, created = Store("dm.sqlite3").get_or_create_dm(user_a, user_b)

Ids are canonical (lower-case, hyphenated) UUID strings; the store keeps them
as 16-byte blobs so that a million channels stay small.
"""

import fcntl
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

SCHEMA_VERSION = 1

# A rowid table: `seq` orders channels by creation and keeps the secondary
# indexes small. UNIQUE (user_low, user_high) is what makes get-or-create
# atomic: of any number of concurrent INSERT OR IGNOREs for one pair, exactly
# one inserts.
SCHEMA = """
CREATE TABLE IF NOT EXISTS dm_channel (
    seq        INTEGER PRIMARY KEY,
    user_low   BLOB NOT NULL,
    user_high  BLOB NOT NULL,
    id         BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,  -- milliseconds since the Unix epoch, UTC
    UNIQUE (user_low, user_high),
    CHECK (user_low <= user_high)
);
"""

SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


class StoreError(Exception):
    """The store could not answer (locked past the busy timeout, disk, I/O)."""


@dataclass(frozen=True)
class Channel:
    id: str
    user_low: str
    user_high: str
    created_at: datetime

    @property
    def name(self):
        return f"DM-{self.user_low}-{self.user_high}"


# _blob and _text run several times per request (and per row of a bulk
# load): plain hex is about 4x faster than a uuid.UUID round trip.
def _blob(user_id):
    raw = bytes.fromhex(user_id.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a UUID: {user_id!r}")
    return raw


def _text(blob):
    h = blob.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _now_ms():
    return time.time_ns() // 1_000_000


def _ms(moment):
    return round(moment.timestamp() * 1000)


def _channel(row):
    user_low, user_high, channel_id, created_ms = row
    return Channel(
        id=_text(channel_id),
        user_low=_text(user_low),
        user_high=_text(user_high),
        created_at=datetime.fromtimestamp(created_ms / 1000, timezone.utc),
    )


class Store:
    """A SQLite file of DM channels, safe to share between threads and processes.

    No connection is opened until first use, so a Store can be built before a
    server forks its workers; each thread of each process then opens its own.
    """

    def __init__(self, path, busy_timeout=5.0, synchronous="FULL"):
        synchronous = str(synchronous).upper()
        if synchronous not in SYNCHRONOUS_LEVELS:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, "
                f"not {synchronous!r}"
            )
        self.path = os.fspath(path)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous
        self._local = threading.local()
        self._schema_ready = False
        self._pid = os.getpid()
        self._writer = threading.Lock()
        self._writers_fd = None  # see _writers_queue

    def _connection(self):
        if self._pid != os.getpid():
            # Forked after use: the parent's connections must not be touched.
            self._local = threading.local()
            self._schema_ready = False
            self._pid = os.getpid()
            self._writer = threading.Lock()
            if self._writers_fd is not None:
                os.close(self._writers_fd)  # our copy; the parent's flock is its own
                self._writers_fd = None
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self):
        try:
            # isolation_level=None: each statement is its own transaction
            # unless we BEGIN explicitly.
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if not self._schema_ready:
                self._init_schema(conn)
                self._schema_ready = True
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"cannot prepare {self.path}: {e}") from e
        return conn

    def _init_schema(self, conn):
        # journal_mode is stored in the file; setting it again is a cheap read.
        conn.execute("PRAGMA journal_mode=WAL")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this "
                f"code's {SCHEMA_VERSION}"
            )
        # Another process may be doing the same: CREATE ... IF NOT EXISTS
        # under the write lock makes the loser's run a no-op.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(SCHEMA.strip())
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def init_schema(self):
        """Create the file's schema now (the first request would do it too)."""
        self._connection()

    def schema_version(self):
        return self._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    def _run(self, work):
        try:
            return work(self._connection())
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e

    def get_or_create_dm(self, user_a, user_b):
        """Return (channel, created) for the unordered pair of canonical ids.

        An existing channel is found with a plain read and never takes the
        write lock. A new one is a single INSERT OR IGNORE (its own
        transaction) followed by a read, so concurrent callers in any number
        of threads and processes all get the one row that won.
        """
        low, high = sorted((user_a, user_b))
        key = (_blob(low), _blob(high))

        def work(conn):
            row = _find(conn, key)
            if row is not None:
                return _channel(row), False
            with self._writers_queue(conn):
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO dm_channel (user_low, user_high, id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (*key, uuid.uuid4().bytes, _now_ms()),
                )
            created = cursor.rowcount == 1
            return _channel(_find(conn, key)), created

        return self._run(work)

    @contextmanager
    def _writers_queue(self, conn):
        """Queue for SQLite's write lock behind this store's other writers, in
        every thread and process, waking as soon as it is free.

        SQLite's busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, so
        writers waiting on one another miss the moments the lock is free and
        a create can wait far longer than a commit takes. Here a writer first
        takes this process's lock, then an flock on a file beside the
        database (<database>-writers): both hand over to the next waiter the
        moment they are released. BUSY_TIMEOUT still bounds the wait: the
        holder waits for SQLite's lock (held by a writer outside the queue:
        another program, a bulk load) only for what is left of its own
        timeout, and a writer that reaches the head with no time left fails
        at once, so the whole queue fails in about one BUSY_TIMEOUT.
        """
        deadline = time.monotonic() + self.busy_timeout
        if not self._writer.acquire(timeout=self.busy_timeout):
            raise StoreError("database is locked (queued behind other writers)")
        try:
            if self._writers_fd is None:
                try:
                    self._writers_fd = os.open(
                        self.path + "-writers", os.O_RDWR | os.O_CREAT, 0o644
                    )
                except OSError as e:
                    raise StoreError(f"cannot open {self.path}-writers: {e}") from e
            fcntl.flock(self._writers_fd, fcntl.LOCK_EX)
            try:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError("database is locked (queued behind other writers)")
                conn.execute(f"PRAGMA busy_timeout={int(left * 1000)}")
                try:
                    yield
                finally:
                    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            finally:
                fcntl.flock(self._writers_fd, fcntl.LOCK_UN)
        finally:
            self._writer.release()

    def add_channels(self, channels):
        """Insert existing channels as they are (ids and createdAt kept), in one
        transaction; a pair that already has a channel keeps its own. For bulk
        loads and moves between stores, not for serving requests.
        Returns how many were inserted."""

        def work(conn):
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.executemany(
                    "INSERT OR IGNORE INTO dm_channel (user_low, user_high, id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (
                        (_blob(c.user_low), _blob(c.user_high), _blob(c.id), _ms(c.created_at))
                        for c in channels
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return cursor.rowcount

        return self._run(work)

    def channels(self, batch=10_000):
        """Every channel, oldest first, read in batches (for exports and moves)."""
        after = 0
        while True:
            rows = self._run(
                lambda c: c.execute(
                    "SELECT seq, user_low, user_high, id, created_at FROM dm_channel"
                    " WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, batch),
                ).fetchall()
            )
            if not rows:
                return
            for row in rows:
                yield _channel(row[1:])
            after = rows[-1][0]

    def count(self):
        return self._run(
            lambda c: c.execute("SELECT count(*) FROM dm_channel").fetchone()[0]
        )

    def close(self):
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._writer:
            if self._writers_fd is not None:
                os.close(self._writers_fd)
                self._writers_fd = None


def _find(conn, key):
    return conn.execute(
        "SELECT user_low, user_high, id, created_at FROM dm_channel"
        " WHERE user_low = ? AND user_high = ?",
        key,
    ).fetchone()
