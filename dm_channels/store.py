"""The channel store: one SQLite table of DM channels keyed by the sorted pair.

Usable without Flask:

    from dm_channels.store import Store
    channel, created = Store("dm.sqlite3").get_or_create_dm(user_a, user_b)

Ids are kept as 16-byte blobs so that a million channels stay small; what
both stores share (Channel, the id rules, StoreError) is in channels.py, and
how creates wait for SQLite's one write lock in writers.py.
"""

import os
import sqlite3
import tempfile
import threading
import time
import uuid
import weakref
from datetime import datetime, timezone
from urllib.parse import quote

from dm_channels.channels import (  # noqa: F401 (SelfDMError: importable from here too)
    IO,
    LOCK_TIMEOUT,
    OTHER,
    Channel,
    ChannelStore,
    SelfDMError,
    StoreError,
    canonical_id,
)
from dm_channels.writers import WritersQueue

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

COLUMNS = "user_low, user_high, id, created_at"  # a Channel's row (_channel)

FIND = f"SELECT {COLUMNS} FROM dm_channel WHERE user_low = ? AND user_high = ?"

def create_many(n):
    """The INSERT of a batch of n creates, (user_low, user_high, id) each.

    The moment is the INSERT's own, taken under the write lock, so that
    creation order (seq) and createdAt agree. A pair there already is
    ignored: FIND then reads the row that won."""
    row = "(?, ?, ?, CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER))"
    return f"INSERT OR IGNORE INTO dm_channel ({COLUMNS}) VALUES {', '.join([row] * n)}"

GET = f"SELECT {COLUMNS} FROM dm_channel WHERE id = ?"

# Two index searches merged in seq order (no sort, no scan): see
# tests/test_directory.py for the plan. The second arm skips a notes-to-self
# channel (user_low = user_high), which the first already has.
USER_CHANNELS = f"""
SELECT seq, {COLUMNS} FROM (
    SELECT * FROM dm_channel WHERE user_low = :user AND seq < :before
    UNION ALL
    SELECT * FROM dm_channel WHERE user_high = :user AND seq < :before AND user_low <> :user
) ORDER BY seq DESC LIMIT :n
"""

AT_USER_POSITION = (
    "SELECT 1 FROM dm_channel WHERE seq = :seq AND id = :id AND (user_low = :user OR user_high = :user)"
)

# Every channel, newest first: a walk down the rowid (seq).
ALL_CHANNELS = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq < :before ORDER BY seq DESC LIMIT :n"

AT_ANY_POSITION = "SELECT 1 FROM dm_channel WHERE seq = :seq AND id = :id"

ADD = f"INSERT OR IGNORE INTO dm_channel ({COLUMNS}) VALUES (?, ?, ?, ?)"

ALL_AFTER = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq > ? ORDER BY seq LIMIT ?"

SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")

# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xff), by
# StoreError's cause: BUSY and LOCKED; PERM, READONLY, IOERR, CORRUPT, FULL,
# CANTOPEN, PROTOCOL, NOTADB.
LOCK_CODES = {5, 6}
IO_CODES = {3, 8, 10, 11, 13, 14, 15, 26}
NOT_SQLITE_CODES = {11, 26}  # CORRUPT, NOTADB: another kind of file, or a damaged one

# Resets after a fork (Store._forget_parent) one thread at a time.
_FORK_LOCK = threading.Lock()


def store_error(message, error):
    """A StoreError for a sqlite3 error (its __cause__), with the cause its code says."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    cause = LOCK_TIMEOUT if code in LOCK_CODES else IO if code in IO_CODES else OTHER
    return StoreError(message, cause)


# _key and _text run several times per request (and per row of a bulk
# load): plain hex is about 4x faster than a uuid.UUID round trip.
def _key(canonical):
    """16 bytes of an id canonical_id has checked."""
    return bytes.fromhex(canonical.replace("-", ""))


def _blob(user_id):
    """16 bytes of a UUID in UUID_FORM (ValueError for anything else)."""
    return _key(canonical_id(user_id))


def _text(blob):
    h = blob.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _ms(moment):
    return round(moment.timestamp() * 1000)


def _channel(row):
    """The Channel of a row of COLUMNS."""
    user_low, user_high, channel_id, created_ms = row
    return Channel(
        id=_text(channel_id),
        user_low=_text(user_low),
        user_high=_text(user_high),
        created_at=datetime.fromtimestamp(created_ms / 1000, timezone.utc),
    )


class Store(ChannelStore):
    """A SQLite file of DM channels, safe to share between threads and processes.

    No connection is opened until first use, so a Store can be built before a
    server forks its workers; each thread of each process then opens its own.
    """

    FIND, GET, USER_CHANNELS, AT_USER_POSITION = FIND, GET, USER_CHANNELS, AT_USER_POSITION
    ALL_CHANNELS, AT_ANY_POSITION, ALL_AFTER = ALL_CHANNELS, AT_ANY_POSITION, ALL_AFTER
    _key, _channel = staticmethod(_key), staticmethod(_channel)

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
        self.writers = WritersQueue(self.path + "-writers", self.busy_timeout)
        self._local = threading.local()
        self._open = weakref.WeakSet()  # every thread's _ThreadConnection
        self._schema_ready = False
        self._pid = os.getpid()

    def _forget_parent(self):
        """In a process forked after use: drop the parent's connections and
        lock without touching them (they are the parent's to close)."""
        with _FORK_LOCK:
            if self._pid == os.getpid():
                return  # another thread of this process did it
            self._local = threading.local()
            self._open = weakref.WeakSet()
            self._schema_ready = False
            self.writers.forget_parent()
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
        create_private(self.path)
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
            raise store_error(f"cannot open {self.path}: {e}", e) from e
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if not self._schema_ready:
                self._init_schema_when_free(conn)
                self._schema_ready = True
        except sqlite3.Error as e:
            conn.close()
            raise store_error(f"cannot prepare {self.path}: {e}", e) from e
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

    def _refuse_newer(self, version):
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this "
                f"code's {SCHEMA_VERSION}"
            )

    def _init_schema(self, conn):
        # journal_mode is stored in the file; setting it again is a cheap read.
        conn.execute("PRAGMA journal_mode=WAL")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        self._refuse_newer(version)
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
        """Raise StoreError, naming the path and the cause, unless SQLite can
        open the database for writing, and an existing file is a database of
        a schema this code knows. Any connection it opens is closed before it
        returns, so a server may fork after it."""
        cause = _why_not_writable(self.path)
        if cause is not None:
            raise StoreError(f"cannot open database {self.path} for writing: {cause}", IO)
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:  # an empty file is a new database
            conn = _open(self.path, self.busy_timeout)
            try:
                # Each reads the file's header and schema: another kind of
                # file, or a damaged one, fails here.
                conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
                (version,) = conn.execute("PRAGMA user_version").fetchone()
            except sqlite3.Error as e:
                not_sqlite = e.sqlite_errorcode & 0xFF in NOT_SQLITE_CODES
                needed = " (a SQLite database is needed, or a new file, which is made one)"
                raise store_error(f"cannot use database {self.path}: {e}{needed if not_sqlite else ''}", e) from e
            finally:
                conn.close()
            self._refuse_newer(version)

    def init_schema(self):
        """Create the file's schema now (the first request would do it too)."""
        self._connection()

    def schema_version(self):
        return self._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

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
            raise StoreError(f"cannot back up to {dest_path}: folder {folder} does not exist", IO)
        source = open_existing(self.path)
        # A new file of a name nobody could guess, 0600 (mkstemp), never one
        # found there: another user's, or a link, would receive the copy.
        fd, partial = tempfile.mkstemp(dir=folder, prefix=os.path.basename(dest_path) + ".partial-")
        os.close(fd)
        try:
            dest = sqlite3.connect(partial, isolation_level=None)
            try:
                source.backup(dest)
                dest.execute("PRAGMA journal_mode=DELETE")
            finally:
                dest.close()
            os.link(partial, dest_path)  # fails if dest_path exists
        except sqlite3.Error as e:
            raise store_error(f"backup failed: {e}", e) from e
        except FileExistsError as e:
            raise StoreError(f"{dest_path} already exists; back up to a new file", IO) from e
        finally:
            source.close()
            if os.path.exists(partial):
                os.remove(partial)

    def _run(self, work, retry=False):
        # retry does not apply: a thread keeps its connection to the file.
        try:
            return work(self._connection())
        except sqlite3.Error as e:
            raise store_error(str(e), e) from e

    def _create(self, key):
        # An INSERT OR IGNORE of a new id, committed with the other creates
        # waiting in this process (writers.WritersQueue); then, outside the
        # write lock, a read of the pair's row: created if its id is ours.
        made = uuid.uuid4().bytes
        self.writers.create((*key, made), self._commit)
        row = self._run(lambda conn: conn.execute(FIND, key).fetchone())
        return _channel(row), row[2] == made

    def _commit(self, batch, deadline):
        """Insert every create of the batch in one statement, its own
        transaction, committed before the deadline (the writers' queue calls
        it in its turn): SQLite's write lock is held for that one statement,
        however many creates share it."""

        def work(conn):
            # The connection's busy timeout is BUSY_TIMEOUT: shorten SQLite's
            # own wait (for a writer outside the queue) to what is left of the
            # deadline (0 makes it try once) only when the wait so far makes a
            # difference, so that a create that did not wait runs no PRAGMA.
            left = deadline - time.monotonic()
            shorter = left < self.busy_timeout - 0.05
            if shorter:
                conn.execute(f"PRAGMA busy_timeout={max(0, int(left * 1000))}")
            try:
                # A pair twice in the batch, or there already, is ignored.
                conn.execute(create_many(len(batch)), [v for create in batch for v in create.row])
            finally:
                if shorter:
                    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

        self._run(work)

    def add_channels(self, channels):

        def work(conn):
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.executemany(ADD, (
                    (_blob(c.user_low), _blob(c.user_high), _blob(c.id), _ms(c.created_at))
                    for c in channels
                ))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return cursor.rowcount

        return self._run(work)

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
        self.writers.close()


def create_private(path):
    """Create the database file `path`, empty and 0600 (its owner's alone,
    whatever the umask), unless it exists: SQLite gives the -wal, -shm and
    -journal files it makes beside it the file's own mode. An existing file
    keeps its mode; one that cannot be made is left for SQLite to report."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass


def _open(path, timeout=5.0):
    """A connection to the existing file at path, never a new one."""
    try:
        return sqlite3.connect(f"file:{quote(os.fspath(path))}?mode=rw", uri=True, timeout=timeout)
    except sqlite3.Error as e:
        raise store_error(f"cannot open {path}: {e}", e) from e


def open_existing(path):
    """A connection to an existing database of channels at path: a misspelt
    path or another file is a StoreError, never a new empty database."""
    conn = _open(path)
    try:
        found = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'dm_channel'").fetchone()
    except sqlite3.Error as e:
        conn.close()
        raise store_error(f"cannot read {path}: {e}", e) from e
    if not found:
        conn.close()
        raise StoreError(f"{path} holds no DM channels", IO)
    return conn


class _ThreadConnection:
    """A thread's connection, closed when the thread ends and its
    threading.local goes (flask run starts a thread per request)."""

    def __init__(self, conn):
        self.conn = conn

    def __del__(self):
        self.conn.close()


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
