"""The channel store in a SQLite file, usable without Flask: `Store("dm.sqlite3").get_or_create_dm(a, b)`."""

import fcntl
import os
import pwd
import re
import sqlite3
import stat
import tempfile
import threading
import time
import uuid
import weakref
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

NIL_UUID = "00000000-0000-0000-0000-000000000000"

# The one spelling of an id: uuid.UUID would also take braces, urn:uuid: and 32 bare digits.
UUID_FORM = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# Why a store could not answer (StoreError.cause), as the metrics count them.
LOCK_TIMEOUT, IO, POSTGRES_UNAVAILABLE, OTHER = CAUSES = (
    "lock_timeout", "io", "postgres_unavailable", "other")


class StoreError(Exception):
    """The database could not answer; `cause` is one of CAUSES."""

    def __init__(self, message, cause=OTHER):
        super().__init__(message)
        self.cause = cause


class UnknownPosition(LookupError):
    """A listing position that is not one of the listed channels."""


class SelfDMError(ValueError):
    """Both ids of a pair are the same user, and the store does not allow it."""


@dataclass(frozen=True)
class Channel:
    """A DM channel: lower-case ids, user_low <= user_high, created_at in UTC."""

    id: str
    user_low: str
    user_high: str
    created_at: datetime

    @property
    def name(self):
        return f"DM-{self.user_low}-{self.user_high}"


def canonical_id(value):
    """The lower-case form of an id in UUID_FORM; ValueError naming anything else."""
    if not isinstance(value, str) or not UUID_FORM.fullmatch(value):
        raise ValueError(f"{value!r} is not a UUID: expected 36 characters in the hyphenated "
                         "8-4-4-4-12 hex form, e.g. 3c90c3cc-0d44-4b50-8888-8dd25736052a")
    return value.lower()


def sorted_pair(user_a, user_b, allow_self_dm):
    """(low, high) in canonical form, the same for (a, b) and (b, a)."""
    low, high = sorted((canonical_id(user_a), canonical_id(user_b)))
    if low == high and not allow_self_dm:
        raise SelfDMError(f"a DM channel needs two different users, not {low} twice")
    return low, high


# Above every seq either database assigns: the position before the first page.
AFTER_EVERY_SEQ = (1 << 63) - 1


class ChannelStore:
    """The reads both stores share, on each store's SQL (FIND, GET, ...), _run, _one, _key(s), _channel and _create."""

    path: str  # where the channels are, for messages (never a password)
    allow_self_dm = False
    observe_created = None  # called for each channel created (the metrics)

    def get_or_create_dm(self, user_a, user_b):
        """(channel, created) for the unordered pair: of any number of concurrent
        first requests, in any process or host, exactly one creates."""
        key = self._keys(*sorted_pair(user_a, user_b, self.allow_self_dm))
        row = self._one(self.FIND, key)
        if row is not None:
            return self._channel(row), False
        channel, created = self._create(key)
        if created and self.observe_created is not None:
            self.observe_created()
        return channel, created

    def get_channel(self, channel_id):
        """The channel with this id, or None."""
        row = self._one(self.GET, (self._key(canonical_id(channel_id)),))
        return None if row is None else self._channel(row)

    def find_dm(self, user_a, user_b):
        """The pair's channel, or None."""
        row = self._one(self.FIND, self._keys(*sorted_pair(user_a, user_b, True)))
        return None if row is None else self._channel(row)

    def user_channels(self, user_id, limit, after=None):
        """A page of the user's channels, newest first, and the position after it
        (None on the last page); UnknownPosition for a position not of this listing."""
        user = self._key(canonical_id(user_id))
        return self._page(self.USER_CHANNELS, self.AT_USER_POSITION, {"user": user}, limit, after)

    def all_channels(self, limit, after=None):
        """A page of every channel, newest first, paged as user_channels."""
        return self._page(self.ALL_CHANNELS, self.AT_ANY_POSITION, {}, limit, after)

    def _page(self, listing, at_position, where, limit, after):
        def work(conn):
            before = AFTER_EVERY_SEQ
            if after is not None:
                seq, channel_id = after
                position = {**where, "seq": seq, "id": self._key(channel_id)}
                if not conn.execute(at_position, position).fetchone():
                    raise UnknownPosition(after)
                before = seq
            rows = conn.execute(listing, {**where, "before": before, "n": limit + 1}).fetchall()
            page = [self._channel(row[1:]) for row in rows[:limit]]
            return page, (rows[limit - 1][0], page[-1].id) if len(rows) > limit else None

        return self._run(work, retry=True)

    def channels(self, batch=10_000):
        """Every channel, oldest first, read in batches (for exports and moves)."""
        after = 0
        while rows := self._run(lambda conn: conn.execute(self.ALL_AFTER, (after, batch)).fetchall(), retry=True):
            yield from (self._channel(row[1:]) for row in rows)
            after = rows[-1][0]

    def count(self):
        return self._run(lambda conn: conn.execute("SELECT count(*) FROM dm_channel").fetchone()[0], retry=True)

    def ping(self):
        """A trivial query on the channel table; StoreError if it fails."""
        self._run(lambda conn: conn.execute("SELECT 1 FROM dm_channel LIMIT 1").fetchall(), retry=True)


SCHEMA_VERSION = 1

# `seq` orders channels by creation; UNIQUE (user_low, user_high) makes
# get-or-create atomic. Ids are 16-byte blobs, so a million channels stay small.
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
-- A user's channels, newest first: an index of a rowid table ends with seq.
CREATE INDEX IF NOT EXISTS dm_channel_by_low ON dm_channel (user_low);
CREATE INDEX IF NOT EXISTS dm_channel_by_high ON dm_channel (user_high);
"""

COLUMNS = "user_low, user_high, id, created_at"
FIND = f"SELECT {COLUMNS} FROM dm_channel WHERE user_low = ? AND user_high = ?"


def create_many(n):
    """The INSERT of n creates' (user_low, user_high, id); a pair that has a channel is left out of what it returns.
    The moment is the INSERT's own, taken under the write lock: seq and createdAt agree."""
    row = "(?, ?, ?, CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER))"
    return f"INSERT INTO dm_channel ({COLUMNS}) VALUES {', '.join([row] * n)} ON CONFLICT DO NOTHING RETURNING {COLUMNS}"


GET = f"SELECT {COLUMNS} FROM dm_channel WHERE id = ?"
# Two index searches merged in seq order; the second skips a notes-to-self channel.
USER_CHANNELS = f"""
SELECT seq, {COLUMNS} FROM (
    SELECT * FROM dm_channel WHERE user_low = :user AND seq < :before
    UNION ALL
    SELECT * FROM dm_channel WHERE user_high = :user AND seq < :before AND user_low <> :user
) ORDER BY seq DESC LIMIT :n
"""
AT_USER_POSITION = "SELECT 1 FROM dm_channel WHERE seq = :seq AND id = :id AND :user IN (user_low, user_high)"
ALL_CHANNELS = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq < :before ORDER BY seq DESC LIMIT :n"
AT_ANY_POSITION = "SELECT 1 FROM dm_channel WHERE seq = :seq AND id = :id"
ADD = f"INSERT OR IGNORE INTO dm_channel ({COLUMNS}) VALUES (?, ?, ?, ?)"
ALL_AFTER = f"SELECT seq, {COLUMNS} FROM dm_channel WHERE seq > ? ORDER BY seq LIMIT ?"

SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")

MAX_BATCH = 100  # creates a transaction at most: 300 parameters, under SQLite's 999 before 3.32

# A turn at the write lock this long (a commit takes ~1 ms) means the lock is stuck: the
# creates behind it fail at once rather than hold the threads that reads need.
STALLED = 1.0

# Held from a new file's creation to its descriptor's close, so that no thread opens it in between: the close
# would drop that connection's lock, and another process's SQLite would then delete the -wal and -shm in use.
_CREATING = threading.Lock()

LOCK_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
IO_CODES = {sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT,
            sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB}


def store_error(message, error):
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    return StoreError(message, LOCK_TIMEOUT if code in LOCK_CODES else IO if code in IO_CODES else OTHER)


def locked():
    return StoreError("database is locked (queued behind other writers)", LOCK_TIMEOUT)


def _key(canonical):
    # Plain hex: about 4x faster than a uuid.UUID round trip.
    return bytes.fromhex(canonical.replace("-", ""))


def _text(blob):
    h = blob.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _channel(row):
    user_low, user_high, channel_id, created_ms = row
    created_at = datetime.fromtimestamp(created_ms / 1000, timezone.utc)
    return Channel(_text(channel_id), _text(user_low), _text(user_high), created_at)


class Store(ChannelStore):
    """A SQLite file of DM channels; each thread of each process opens its own connection
    on first use. A process's creates take turns (a lock); each turn writes every create
    waiting by then in one statement, under an flock of <path>-writers that passes SQLite's
    write lock between processes at once, not after its busy handler's sleeps."""

    FIND, GET, USER_CHANNELS, AT_USER_POSITION = FIND, GET, USER_CHANNELS, AT_USER_POSITION
    ALL_CHANNELS, AT_ANY_POSITION, ALL_AFTER = ALL_CHANNELS, AT_ANY_POSITION, ALL_AFTER
    _key, _channel = staticmethod(_key), staticmethod(_channel)

    @staticmethod
    def _keys(low, high):
        return bytes.fromhex(low.replace("-", "")), bytes.fromhex(high.replace("-", ""))

    def __init__(self, path, busy_timeout=5.0, synchronous="FULL", allow_self_dm=False):
        if str(synchronous).upper() not in SYNCHRONOUS_LEVELS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, not {synchronous!r}")
        self.path = os.fspath(path)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = str(synchronous).upper()
        self.allow_self_dm = allow_self_dm
        self.observe_wait = None  # given the seconds each create waited to be written
        self._reset()

    def _reset(self):
        self._pid = os.getpid()
        self._local = threading.local()
        self._open = weakref.WeakSet()  # every thread's _Held connection
        self._schema_ready = False
        self._writing = threading.Lock()
        self._waiting = []  # the process's creates not yet written: [row, None until its outcome, deadline]
        self._waiting_lock = threading.Lock()
        self._writing_since = None
        self._lock_fd = None

    def _connection(self):
        if self._pid != os.getpid():
            # Forked after use: the parent's connections and lock are its own to close.
            self._reset()
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _Held(self._connect())
            self._open.add(held)
        return held.conn

    def _connect(self):
        try:
            # 0600 (SQLite gives its -wal and -shm the database's mode). Closing a descriptor drops the
            # process's POSIX locks on the file, SQLite's own included: only a new file, under _CREATING.
            with _CREATING:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot open {self.path}: {e.strerror}", IO) from e
        self._refuse_foreign()  # SQLite opens -wal and -shm itself
        try:
            # Autocommit; any thread may use it only so that close() can close every thread's.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise store_error(f"cannot open {self.path}: {e}", e) from e
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if not self._schema_ready:
                self._init_schema(conn)
                self._refuse_foreign()  # again, now SQLite has them open: none was planted meanwhile
                self._schema_ready = True
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise store_error(f"cannot prepare {self.path}: {e}", e) from e
            raise
        return conn

    def _init_schema(self, conn):
        # Workers opening a new file at once race to switch it to WAL, and
        # SQLite answers the losers "locked" without waiting: try again.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version != SCHEMA_VERSION:
                    self._refuse_newer(version)
                    conn.executescript(
                        f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
                return
            except sqlite3.OperationalError as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _refuse_newer(self, version):
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this code's {SCHEMA_VERSION}")

    def check_writable(self):
        """StoreError naming the file and the cause unless the database can be opened for
        writing and has a schema this code knows; it writes nothing and leaves nothing open."""
        try:  # a file of no name, gone when closed: the folder takes SQLite's new files
            tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(self.path))).close()
        except OSError as e:
            raise StoreError(f"cannot open {self.path}: {e.strerror}", IO) from e
        self._refuse_foreign()
        if os.path.isdir(self.path):
            raise StoreError(f"cannot open {self.path}: it is a folder", IO)
        if os.path.exists(self.path):
            with closing(open_existing(self.path, needs_table=False)) as conn:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
            self._refuse_newer(version)

    def _refuse_foreign(self):
        for end in ("", "-wal", "-shm", "-writers"):
            refuse_foreign(self.path + end)

    def init_schema(self):
        """Create the file's schema now (the first request would do it too)."""
        self._connection()

    def schema_version(self):
        return self._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    def _run(self, work, retry=False):
        try:
            return work(self._connection())
        except sqlite3.Error as e:
            raise store_error(str(e), e) from e

    def _one(self, sql, params):  # every get's: as _run, without its two calls
        try:
            return self._connection().execute(sql, params).fetchone()
        except sqlite3.Error as e:
            raise store_error(str(e), e) from e

    def _create(self, key):
        # A create waits for its turn, unless a turn before writes it: one transaction and fsync for them all.
        arrived = time.monotonic()
        deadline = arrived + self.busy_timeout
        mine = [(*key, uuid.uuid4().bytes), None, deadline]
        waiting = self._waiting  # close() starts a new list
        with self._waiting_lock:
            waiting.append(mine)
        try:
            with self._turn(deadline):
                while mine[1] is None and mine in self._waiting:  # not written by an earlier turn
                    self._write(deadline)
        except BaseException:
            with self._waiting_lock:
                if mine in waiting:
                    waiting.remove(mine)
                    raise
            # In a batch another turn is writing, which ends by the earliest deadline of its creates.
            while mine[1] is None and time.monotonic() < deadline + STALLED:
                time.sleep(0.001)
            if mine[1] is None:
                raise
        finally:
            if self.observe_wait is not None:
                self.observe_wait(time.monotonic() - arrived)
        if mine[1] is None:  # its list was closed under it
            raise StoreError("the store was closed while this create waited")
        if isinstance(mine[1], StoreError):
            raise StoreError(str(mine[1]), mine[1].cause) from mine[1]
        row = mine[1] or self._one(FIND, key)  # False: the pair had a channel, or had it from this batch
        return _channel(row), row[2] == mine[0][2]

    def _write(self, deadline):
        """Once the flock is had, insert the creates waiting by then (MAX_BATCH at most) in one statement;
        give each its row, False, or the error. StoreError if the flock is not had by the deadline."""
        self._flock(deadline)
        try:
            with self._waiting_lock:  # those that came while this writer waited too
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
            try:
                conn = self._connection()
                # SQLite's own wait, for a writer outside the service, ends at the batch's first deadline.
                left = min(create[2] for create in batch) - time.monotonic()
                shorter = left < self.busy_timeout - 0.05
                if shorter:
                    conn.execute(f"PRAGMA busy_timeout={max(0, int(left * 1000))}")
                try:
                    rows = conn.execute(create_many(len(batch)), [v for c in batch for v in c[0]]).fetchall()
                finally:
                    if shorter:
                        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
                made = {row[:2]: row for row in rows}
                for create in batch:
                    create[1] = made.get(create[0][:2], False)
            except BaseException as e:
                error = e if isinstance(e, StoreError) else store_error(str(e), e)
                for create in batch:  # each raises its own copy
                    create[1] = error
                if not isinstance(e, Exception):
                    raise
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _turn(self, deadline):
        """This writer's turn among the process's writers; StoreError if not had by the deadline or while STALLED."""
        writing = self._writing  # close() starts a new lock
        while not writing.acquire(timeout=max(0, self._give_up_at(deadline) - time.monotonic())):
            if time.monotonic() >= self._give_up_at(deadline):
                raise locked()
        self._writing_since = time.monotonic()
        try:
            yield
        finally:
            self._writing_since = None
            writing.release()

    def _give_up_at(self, deadline):
        since = self._writing_since
        return min(deadline, (time.monotonic() if since is None else since) + STALLED)

    def _flock(self, deadline):
        # A blocking flock cannot time out: try every 0.2 ms (a commit takes ~1 ms).
        if self._lock_fd is None:
            self._lock_fd = open_lock(self.path + "-writers")
        while True:
            try:
                return fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise locked() from None
                time.sleep(0.0002)

    def add_channels(self, channels):
        """Insert channels as they are (ids and createdAt kept) in one transaction;
        a pair that has a channel keeps its own. How many were added."""
        rows = ((_key(canonical_id(c.user_low)), _key(canonical_id(c.user_high)),
                 _key(canonical_id(c.id)), round(c.created_at.timestamp() * 1000)) for c in channels)

        def work(conn):
            conn.execute("BEGIN IMMEDIATE")
            with conn:  # commits, or rolls back on any error
                return conn.executemany(ADD, rows).rowcount

        return self._run(work)

    def backup(self, dest_path):
        """Copy the database, as one read transaction sees it, to the new file
        dest_path while it keeps serving; an existing file is never overwritten."""
        dest_path = os.fspath(dest_path)
        folder = os.path.dirname(os.path.abspath(dest_path))
        if not os.path.isdir(folder):
            raise StoreError(f"cannot back up to {dest_path}: folder {folder} does not exist", IO)
        # A new file of a name nobody could guess, 0600: never one found there.
        fd, partial = tempfile.mkstemp(dir=folder, prefix=os.path.basename(dest_path) + ".partial-")
        os.close(fd)
        try:
            with closing(open_existing(self.path)) as source:
                source.execute("VACUUM INTO ?", (partial,))  # one self-contained file
            os.link(partial, dest_path)  # fails if dest_path exists
        except sqlite3.Error as e:
            raise store_error(f"backup failed: {e}", e) from e
        except FileExistsError as e:
            raise StoreError(f"{dest_path} already exists; back up to a new file", IO) from e
        finally:
            os.remove(partial)

    def close(self):
        """Close every thread's connection; the next use opens new ones."""
        if self._pid == os.getpid():
            with self._writing:
                for held in list(self._open):
                    held.conn.close()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
        self._reset()


class _Held:
    """A thread's connection, closed when the thread ends (flask run starts one a request)."""

    def __init__(self, conn):
        self.conn = conn

    def __del__(self):
        self.conn.close()


def open_lock(path):
    """The writers' lock file, 0600: whoever can open it can hold it and stop every create."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StoreError(f"cannot open {path}: {e}", IO) from e
    try:
        refuse_foreign(path, fd)
        os.fchmod(fd, 0o600)  # ours; readable is enough to hold the flock
    except StoreError:
        os.close(fd)
        raise
    return fd


def refuse_foreign(path, fd=None):
    """StoreError unless the file at path (or open as fd), if any, is the service's user's,
    no symbolic link and not writable by others, who could change the channels through it."""
    try:
        found = os.lstat(path) if fd is None else os.fstat(fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(found.st_mode):
        problem = "is a symbolic link"
    elif found.st_uid != os.geteuid():
        problem = f"belongs to {_user(found.st_uid)}, not to this service's user ({_user(os.geteuid())})"
    elif found.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(found.st_mode):04o})"
    else:
        return
    raise StoreError(f"{path} {problem}: with the service stopped, make it a plain file of the "
                     "service's user, mode 0600, or remove it if the service did not make it", IO)


def _user(uid):
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def open_existing(path, needs_table=True):
    """A connection to an existing database of channels: a misspelt path or
    another file is a StoreError, never a new empty database."""
    try:
        conn = sqlite3.connect(f"file:{quote(os.fspath(path))}?mode=rw", uri=True)
    except sqlite3.Error as e:
        raise store_error(f"cannot open {path}: {e}", e) from e
    try:
        found = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'dm_channel'").fetchone()
    except sqlite3.Error as e:
        conn.close()
        raise store_error(f"cannot use database {path}: {e}", e) from e
    if needs_table and not found:
        conn.close()
        raise StoreError(f"{path} holds no DM channels", IO)
    return conn
