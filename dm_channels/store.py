"""The channel store: one SQLite table of DM channels keyed by the sorted pair.

Usable without Flask:

    from dm_channels.store import Store
    channel, created = Store("dm.sqlite3").get_or_create_dm(user_a, user_b)

Ids are UUIDs in the 36-character hyphenated form, any letter case; a store
returns them in lower case, and keeps them as 16-byte blobs so that a million
channels stay small. Both stores (this one and pgstore.PostgresStore) refuse
anything else, and a pair of one user twice, with a ValueError.
"""

import fcntl
import os
import re
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from datetime import datetime, timezone
from urllib.parse import quote

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
-- A user's channels, newest first: each index is ordered (user, seq), since
-- a rowid table's index ends with the rowid.
CREATE INDEX IF NOT EXISTS dm_channel_by_low ON dm_channel (user_low);
CREATE INDEX IF NOT EXISTS dm_channel_by_high ON dm_channel (user_high);
"""

SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")

# Resets after a fork (Store._forget_parent) one thread at a time.
_FORK_LOCK = threading.Lock()

# Seconds a writer may wait at the head of this process's writers' queue
# before the writers behind it stop waiting (see Store._writers_queue).
STALLED = 1.0


class StoreError(Exception):
    """The store could not answer (locked past the busy timeout, disk, I/O)."""


class UnknownPosition(LookupError):
    """A listing position that is not one of this user's channels."""


class SelfDMError(ValueError):
    """Both ids of a pair are the same user, and the store does not allow it."""


@runtime_checkable
class ChannelStore(Protocol):
    """What both stores provide (Store here, pgstore.PostgresStore), and all
    that the app, its commands and library callers may use of them."""

    path: str  # where the channels are, for messages: a file, or a URL without password

    def get_or_create_dm(self, user_a: str, user_b: str) -> "tuple[Channel, bool]": ...
    def get_channel(self, channel_id: str) -> "Channel | None": ...
    def user_channels(self, user_id: str, limit: int, after=None) -> "tuple[list[Channel], Any]": ...
    def add_channels(self, channels: "Iterable[Channel]") -> int: ...
    def channels(self) -> "Iterator[Channel]": ...
    def count(self) -> int: ...
    def init_schema(self) -> None: ...
    def schema_version(self) -> int: ...
    def ping(self) -> None: ...

    def check_writable(self) -> None:
        """StoreError, naming the cause, unless channels can be written: for
        start-up checks. SQLite looks at the file system; PostgreSQL connects."""

    def backup(self, dest_path) -> None:
        """SQLite's online copy to a new file; PostgreSQL refuses (StoreError):
        its backups are pg_dump's or the server's."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Channel:
    """A DM channel, as both stores return it. Ids are lower-case UUID strings;
    user_low <= user_high; created_at is an aware datetime in UTC, to the
    millisecond. schemas.channel_json(channel) gives the API's JSON of it."""

    id: str
    user_low: str
    user_high: str
    created_at: datetime

    @property
    def name(self):
        return f"DM-{self.user_low}-{self.user_high}"


# The one spelling of an id, in the API and in both stores: 36 characters,
# 8-4-4-4-12 hex, any case, any version nibble. (uuid.UUID would also take
# braces, urn:uuid: and 32 bare hex digits.)
UUID_FORM = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def canonical_id(value):
    """The lower-case form of a UUID given as UUID_FORM spells it; a ValueError
    naming the value and the form for anything else."""
    if not isinstance(value, str) or not UUID_FORM.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a UUID: expected 36 characters in the hyphenated "
            "8-4-4-4-12 hex form, e.g. 3c90c3cc-0d44-4b50-8888-8dd25736052a"
        )
    return value.lower()


def sorted_pair(user_a, user_b, allow_self_dm):
    """The pair's key, (low, high) in canonical form: the same for (a, b) and
    (b, a) in any letter case. SelfDMError for one user twice, unless allowed."""
    low, high = sorted((canonical_id(user_a), canonical_id(user_b)))
    if low == high and not allow_self_dm:
        raise SelfDMError(f"a DM channel needs two different users, not {low} twice")
    return low, high


# _blob and _text run several times per request (and per row of a bulk
# load): plain hex is about 4x faster than a uuid.UUID round trip.
def _blob(user_id):
    """16 bytes of a UUID in UUID_FORM (ValueError for anything else)."""
    return _raw(canonical_id(user_id))


def _raw(canonical):
    # For an id canonical_id has already checked.
    return bytes.fromhex(canonical.replace("-", ""))


def _text(blob):
    h = blob.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# The moment of the INSERT itself, taken under the write lock, so that
# creation order (seq) and createdAt agree.
NOW_MS = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"


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

    def __init__(self, path, busy_timeout=5.0, synchronous="FULL", allow_self_dm=False):
        synchronous = str(synchronous).upper()
        if synchronous not in SYNCHRONOUS_LEVELS:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, "
                f"not {synchronous!r}"
            )
        self.path = os.fspath(path)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous
        self.allow_self_dm = allow_self_dm
        self._local = threading.local()
        self._open = weakref.WeakSet()  # every thread's _ThreadConnection
        self._schema_ready = False
        self._pid = os.getpid()
        self._new_batch()
        self._writers_fd = None  # see _writers_lock
        # None, or a function given the seconds each create waited for the
        # write lock (in this process's batch, then in the writers' queue),
        # whether it then got the lock or gave up (the app's metrics:
        # dm_channels_write_lock_wait_seconds).
        self.observe_lock_wait = None

    def _new_batch(self):
        # This process's creates waiting to be committed (see _create), and
        # when the commit under way began (None while none is).
        self._batch = threading.Condition()
        self._waiting = []
        self._committing_since = None

    def _forget_parent(self):
        """In a process forked after use: drop the parent's connections and
        lock without touching them (they are the parent's to close)."""
        with _FORK_LOCK:
            if self._pid == os.getpid():
                return  # another thread of this process did it
            self._local = threading.local()
            self._open = weakref.WeakSet()
            self._schema_ready = False
            self._new_batch()
            if self._writers_fd is not None:
                os.close(self._writers_fd)  # our copy; the parent's flock is its own
                self._writers_fd = None
            self._pid = os.getpid()

    def _connection(self):
        if self._pid != os.getpid():
            self._forget_parent()
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _ThreadConnection(self._connect())
            self._open.add(held)
        return held.conn

    def _connect(self):
        try:
            # isolation_level=None: each statement is its own transaction
            # unless we BEGIN explicitly.
            # check_same_thread=False only so that close() may close every
            # thread's connection; each connection is used by its own thread.
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if not self._schema_ready:
                self._init_schema_when_free(conn)
                self._schema_ready = True
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"cannot prepare {self.path}: {e}") from e
        except BaseException:  # e.g. a newer schema: StoreError
            conn.close()
            raise
        return conn

    def _init_schema_when_free(self, conn):
        # On a new file, workers starting at once race to switch it to WAL,
        # and SQLite answers the losers "locked" at once, without waiting
        # (its busy handler would risk a deadlock there): try again, within
        # BUSY_TIMEOUT.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return self._init_schema(conn)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

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
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def check_writable(self):
        """Raise StoreError, naming the path and the cause, if SQLite could not
        open the database for writing. Looks at the file system only and opens
        no connection, so a server can run it before it forks its workers."""
        cause = _why_not_writable(self.path)
        if cause is not None:
            raise StoreError(f"cannot open database {self.path} for writing: {cause}")

    def init_schema(self):
        """Create the file's schema now (the first request would do it too)."""
        self._connection()

    def schema_version(self):
        return self._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    def ping(self):
        """A trivial query on the channel table; raises StoreError if it fails."""
        self._run(lambda c: c.execute("SELECT 1 FROM dm_channel LIMIT 1").fetchall())

    def backup(self, dest_path):
        """Copy the database to a new file at dest_path while it keeps serving.

        SQLite's online backup API copies, in one step, the database as one
        read transaction sees it (WAL content included), so the copy is
        consistent as of the moment it began; writers carry on meanwhile. The
        copy is switched to a rollback journal so that it is one
        self-contained file. It is written beside dest_path and moved into
        place only when complete; an existing dest_path is never overwritten.
        """
        dest_path = os.fspath(dest_path)
        folder = os.path.dirname(os.path.abspath(dest_path))
        if not os.path.isdir(folder):
            raise StoreError(f"cannot back up to {dest_path}: folder {folder} does not exist")
        partial = f"{dest_path}.partial-{os.getpid()}"
        source = open_existing(self.path)
        try:
            dest = sqlite3.connect(partial, isolation_level=None)
            try:
                source.backup(dest)
                dest.execute("PRAGMA journal_mode=DELETE")
            finally:
                dest.close()
            os.link(partial, dest_path)  # fails if dest_path exists
        except sqlite3.Error as e:
            raise StoreError(f"backup failed: {e}") from e
        except FileExistsError as e:
            raise StoreError(f"{dest_path} already exists; back up to a new file") from e
        finally:
            source.close()
            if os.path.exists(partial):
                os.remove(partial)

    def _run(self, work):
        try:
            return work(self._connection())
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e

    def get_or_create_dm(self, user_a, user_b):
        """Return (channel, created) for the unordered pair of user ids.

        ValueError for an id not in UUID_FORM; SelfDMError (a ValueError) for
        one user twice, unless the store was made with allow_self_dm=True.

        An existing channel is found with a plain read and never takes the
        write lock. A new one is an INSERT OR IGNORE, committed with the other
        creates waiting in this process (_create), so concurrent callers in
        any number of threads and processes all get the one row that won.
        """
        key = tuple(_raw(user) for user in sorted_pair(user_a, user_b, self.allow_self_dm))
        row = self._run(lambda conn: _find(conn, key))
        if row is not None:
            return _channel(row), False
        return self._create(key)

    def _create(self, key):
        """Group commit: (channel, created) for a pair that had no channel.

        The creates waiting in this process share one transaction and one
        fsync: the first to find no commit under way leads, takes every create
        waiting (its own included), inserts them and commits; the others wait
        for it, and whichever arrived meanwhile make the next batch. Processes
        queue for the write lock behind one another (_writers_lock).

        BUSY_TIMEOUT bounds each create's wait; a batch commits within the
        earliest deadline among its creates. While a commit has taken longer
        than STALLED (the write lock is held outside the queue; a commit
        takes milliseconds), the creates waiting behind it fail at once
        instead of holding the server threads that reads of existing channels
        need.
        """
        arrived = time.monotonic()
        mine = _Create(key, arrived, arrived + self.busy_timeout)
        with self._batch:
            self._waiting.append(mine)
            while self._committing_since is not None and not mine.done:
                now = time.monotonic()
                if mine in self._waiting and (
                    now >= mine.deadline or self._committing_since < now - STALLED
                ):
                    self._waiting.remove(mine)
                    self._waited([mine])
                    raise StoreError("database is locked (queued behind other writers)")
                # Woken the moment the commit ends; the timeout only lets a
                # waiter notice a stall.
                self._batch.wait(timeout=0.05)
            if not mine.done:
                batch, self._waiting = self._waiting, []
                self._committing_since = time.monotonic()
        if not mine.done:
            try:
                self._run(lambda conn: self._commit(conn, batch))
            except BaseException as e:
                for create in batch:
                    create.error = e
            finally:
                with self._batch:
                    for create in batch:
                        create.done = True
                    self._committing_since = None
                    self._batch.notify_all()
        if mine.error is not None:
            if isinstance(mine.error, StoreError):
                # Each create of the batch raises its own, with the same cause.
                raise StoreError(str(mine.error)) from mine.error.__cause__
            raise mine.error
        return mine.channel, mine.created

    def _commit(self, conn, batch):
        with self._writers_lock(conn, batch):
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                self._waited(batch)  # SQLite's write lock is had, or waited for in vain
            try:
                for create in batch:
                    # A pair twice in one batch, or created meanwhile by
                    # another process: ignored, and the row that won is read.
                    row = conn.execute(CREATE, (*create.key, uuid.uuid4().bytes)).fetchone()
                    create.created = row is not None
                    create.channel = _channel(row or _find(conn, create.key))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def get_channel(self, channel_id):
        """The channel with this id, or None."""
        row = self._run(
            lambda c: c.execute(
                "SELECT user_low, user_high, id, created_at FROM dm_channel WHERE id = ?",
                (_blob(channel_id),),
            ).fetchone()
        )
        return None if row is None else _channel(row)

    def user_channels(self, user_id, limit, after=None):
        """A page of the user's channels, newest first: (channels, position).

        `after` is the position returned with the previous page, None for the
        first; the returned position is None on the last page. Keyset paging
        on seq: channels created between pages never shift or repeat a page.
        Raises UnknownPosition for a position that is not the user's.
        """
        user = _blob(user_id)

        def work(conn):
            before = AFTER_EVERY_SEQ
            if after is not None:
                seq, channel_id = after
                if not conn.execute(
                    "SELECT 1 FROM dm_channel WHERE seq = ? AND id = ?"
                    " AND (user_low = ?3 OR user_high = ?3)",
                    (seq, _blob(channel_id), user),
                ).fetchone():
                    raise UnknownPosition(after)
                before = seq
            rows = conn.execute(USER_CHANNELS, (user, before, limit + 1)).fetchall()
            return page_of(rows, limit, _channel)

        return self._run(work)

    @contextmanager
    def _writers_lock(self, conn, batch):
        """Queue for SQLite's write lock behind this store's writers in other
        processes, waking as soon as it is free (one thread per process asks:
        the leader of its batch).

        SQLite's busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, so
        writers waiting on one another miss the moments the lock is free and
        a create can wait far longer than a commit takes. Here a writer first
        takes an flock on a file beside the database (<database>-writers),
        which it finds free within 0.2 ms of its release. What is left of the
        deadline then bounds SQLite's own wait (for a writer outside the
        queue: another program, a bulk load).
        """
        deadline = min(create.deadline for create in batch)
        if self._writers_fd is None:
            try:
                self._writers_fd = os.open(
                    self.path + "-writers", os.O_RDWR | os.O_CREAT, 0o644
                )
            except OSError as e:
                raise StoreError(f"cannot open {self.path}-writers: {e}") from e
        # Linux hands a released flock to no waiter in particular, so a
        # blocking wait could outlast the deadline: try, then look again
        # every 0.2 ms (a commit takes about a millisecond) until it.
        while True:
            try:
                fcntl.flock(self._writers_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._waited(batch)
                    raise StoreError(
                        "database is locked (queued behind other writers)"
                    ) from None
                time.sleep(0.0002)
        try:
            # The connection's busy timeout is BUSY_TIMEOUT: shorten it to
            # what is left of the deadline (0 makes SQLite try once) only
            # when the wait so far makes a difference, so that a create
            # that did not wait runs no PRAGMA.
            left = deadline - time.monotonic()
            shorter = left < self.busy_timeout - 0.05
            if shorter:
                conn.execute(f"PRAGMA busy_timeout={max(0, int(left * 1000))}")
            try:
                yield
            finally:
                if shorter:
                    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        finally:
            fcntl.flock(self._writers_fd, fcntl.LOCK_UN)

    def _waited(self, creates):
        if self.observe_lock_wait is not None:
            now = time.monotonic()
            for create in creates:
                self.observe_lock_wait(now - create.arrived)

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

        def fetch(after):
            return self._run(
                lambda c: c.execute(
                    "SELECT seq, user_low, user_high, id, created_at FROM dm_channel"
                    " WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, batch),
                ).fetchall()
            )

        return in_batches(fetch, _channel)

    def count(self):
        return self._run(
            lambda c: c.execute("SELECT count(*) FROM dm_channel").fetchone()[0]
        )

    def close(self):
        """Close every thread's connection; the next use opens new ones.
        (A thread's connection also closes by itself when the thread ends.)"""
        if self._pid != os.getpid():
            self._forget_parent()
            return
        for held in list(self._open):
            held.conn.close()
        self._open = weakref.WeakSet()
        self._local = threading.local()
        with self._batch:
            # The writers' file is the leader's while it commits.
            self._batch.wait_for(lambda: self._committing_since is None, self.busy_timeout + 1)
            if self._writers_fd is not None:
                os.close(self._writers_fd)
                self._writers_fd = None


def open_existing(path):
    """A connection to an existing database of channels at path: a misspelt
    path or another file is a StoreError, never a new empty database."""
    try:
        conn = sqlite3.connect(f"file:{quote(os.fspath(path))}?mode=rw", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {path}: {e}") from e
    try:
        found = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'dm_channel'").fetchone()
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(f"cannot read {path}: {e}") from e
    if not found:
        conn.close()
        raise StoreError(f"{path} holds no DM channels")
    return conn


class _ThreadConnection:
    """A thread's connection, closed when the thread ends and its
    threading.local goes (flask run starts a thread per request)."""

    def __init__(self, conn):
        self.conn = conn

    def __del__(self):
        self.conn.close()


# Two index searches merged in seq order (no sort, no scan): see
# tests/test_directory.py for the plan. The second arm skips a notes-to-self
# channel (user_low = user_high), which the first already has.
USER_CHANNELS = """
SELECT seq, user_low, user_high, id, created_at FROM (
    SELECT * FROM dm_channel WHERE user_low = ?1 AND seq < ?2
    UNION ALL
    SELECT * FROM dm_channel WHERE user_high = ?1 AND seq < ?2 AND user_low <> ?1
) ORDER BY seq DESC LIMIT ?3
"""


def _why_not_writable(path):
    # SQLite creates the file and its -wal and -shm files beside it, so the
    # folder must be writable too.
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        return f"folder {folder} does not exist"
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    for name in (path, path + "-wal", path + "-shm", path + "-writers"):
        if os.path.isdir(name):
            return f"{name} is a folder"
        if os.path.exists(name) and not os.access(name, os.R_OK | os.W_OK):
            return f"{name} is not writable"
    return None


# Above every seq either database assigns: the position before the first page.
AFTER_EVERY_SEQ = (1 << 63) - 1


def page_of(rows, limit, to_channel):
    """A listing's page from up to limit + 1 rows (seq, *channel row), newest
    first: (channels, position of the last one), the position None on the
    last page."""
    page = [to_channel(row[1:]) for row in rows[:limit]]
    return page, (rows[limit - 1][0], page[-1].id) if len(rows) > limit else None


def in_batches(fetch, to_channel):
    """Every channel, oldest first: fetch(seq) gives the next batch of rows
    (seq, *channel row) after seq, empty at the end."""
    after = 0
    while rows := fetch(after):
        yield from (to_channel(row[1:]) for row in rows)
        after = rows[-1][0]


class _Create:
    """A create waiting in its process's batch (Store._create): its pair, its
    deadline, and then its answer."""

    __slots__ = ("key", "arrived", "deadline", "done", "channel", "created", "error")

    def __init__(self, key, arrived, deadline):
        self.key, self.arrived, self.deadline = key, arrived, deadline
        self.done, self.channel, self.created, self.error = False, None, False, None


CREATE = (
    "INSERT OR IGNORE INTO dm_channel (user_low, user_high, id, created_at)"
    f" VALUES (?, ?, ?, {NOW_MS}) RETURNING user_low, user_high, id, created_at"
)


def _find(conn, key):
    return conn.execute(
        "SELECT user_low, user_high, id, created_at FROM dm_channel"
        " WHERE user_low = ? AND user_high = ?",
        key,
    ).fetchone()
