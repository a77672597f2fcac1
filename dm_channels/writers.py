"""The writers' queue: how the SQLite store's creates wait for its one write lock.

SQLite lets one writer in at a time, and its own busy handler sleeps 1, 2, 5,
10 ... 100 ms between tries: writers waiting on one another miss the moments
the lock is free, and are served in no order, so a create can wait far longer
than a commit takes. The queue instead:

- lines the leaders of all processes up on an flock of a file beside the
  database, <database>-writers, which a leader finds free within 0.2 ms of
  its release: a process's first create waiting is its leader;
- once its turn comes, groups the creates that arrived in its process
  meanwhile into one batch, inserted by one statement, one transaction with
  one fsync (group commit): the write lock is held for that statement alone;
- bounds each create's wait by its deadline, BUSY_TIMEOUT after it arrived:
  a batch commits within the earliest deadline among its creates, or fails;
- and once a commit has run for longer than STALLED (a commit takes
  milliseconds: the write lock is held outside the queue, by another program
  or a stuck disk), fails at once the creates waiting behind it, rather than
  let them hold the server threads that reads of existing channels need.

bench/breakdown.py measures it against plain INSERT OR IGNOREs under SQLite's
own busy timeout (docs/performance.md).
"""

import fcntl
import os
import threading
import time
from contextlib import contextmanager

from dm_channels.channels import IO, LOCK_TIMEOUT, StoreError

STALLED = 1.0  # seconds
# Creates per batch at most: one INSERT of 3 parameters a row, and SQLite
# before 3.32 allows 999 parameters a statement.
MAX_BATCH = 100


def open_lock(path):
    """The lock file, 0600: a user who could open it could hold its flock and
    stop every create. One made by an earlier version (0644) is made 0600;
    one of another user's (root's processes aside) is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StoreError(f"cannot open {path}: {e}", IO) from e
    found = os.fstat(fd)
    if found.st_uid != os.geteuid() and os.geteuid() != 0:
        os.close(fd)
        raise StoreError(
            f"{path} belongs to another user (uid {found.st_uid}), who could hold it "
            "and stop every create: delete it while the service is stopped",
            IO,
        )
    if found.st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot make {path} private: {e}", IO) from e
    return fd


class WritersQueue:
    """The queue of one store (one database file) in this process."""

    def __init__(self, lock_path, busy_timeout):
        self.lock_path = lock_path
        self.busy_timeout = busy_timeout
        # None, or a function given the seconds each create waited to be
        # written (in this process, for the flock, for SQLite's write lock,
        # and the statement that writes its batch), whether it then was or
        # not (the app's metrics: dm_channels_write_lock_wait_seconds).
        self.observe_wait = None
        self._fd = None
        self._reset()

    def _reset(self):
        # This process's creates waiting to be committed, and when the commit
        # under way began (None while none is).
        self._batch = threading.Condition()
        self._waiting = []
        self._committing_since = None

    def create(self, row, commit):
        """Return once commit(batch, deadline) has inserted (or ignored) the
        row of every create of its batch, this one's `row` included, and
        committed them before the deadline; raise StoreError if not.

        The first create to find no commit under way leads: it waits for its
        turn among the processes, then takes the creates waiting by then (its
        own included, MAX_BATCH at most) and commits them; the others wait
        for it, and whichever arrive meanwhile make the next batch.
        """
        arrived = time.monotonic()
        mine = _Create(row, arrived, arrived + self.busy_timeout)
        with self._batch:
            self._waiting.append(mine)
            while self._committing_since is not None and not mine.done:
                now = time.monotonic()
                if mine in self._waiting and (
                    now >= mine.deadline or self._committing_since < now - STALLED
                ):
                    self._waiting.remove(mine)
                    self.waited([mine])
                    raise locked()
                # Woken the moment the commit ends; the timeout only lets a
                # waiter notice a stall.
                self._batch.wait(timeout=0.05)
            if not mine.done:  # this create leads
                self._waiting.remove(mine)
                self._committing_since = time.monotonic()
        if not mine.done:
            batch = None
            try:
                with self._turn(mine.deadline):
                    # Every create that arrived while the leader waited for
                    # its turn: the batch is as large as it can be.
                    batch = self._take(mine)
                    commit(batch, min(create.deadline for create in batch))
            except BaseException as e:
                if batch is None:  # no turn before the leader's deadline
                    batch = self._take(mine)
                for create in batch:
                    create.error = e
            finally:
                self.waited(batch)
                with self._batch:
                    for create in batch:
                        create.done = True
                    self._committing_since = None
                    self._batch.notify_all()
        if mine.error is not None:
            if isinstance(mine.error, StoreError):
                # Each create of the batch raises its own, with the same cause.
                raise StoreError(str(mine.error), mine.error.cause) from mine.error.__cause__
            raise mine.error

    def _take(self, leader):
        """The leader's batch: itself and the first creates waiting."""
        with self._batch:
            batch = [leader, *self._waiting[: MAX_BATCH - 1]]
            del self._waiting[: MAX_BATCH - 1]
        return batch

    @contextmanager
    def _turn(self, deadline):
        """The flock on <database>-writers, had before the deadline.

        Linux hands a released flock to no waiter in particular, so a
        blocking wait could outlast the deadline: try, then look again every
        0.2 ms (a commit takes about a millisecond) until it.
        """
        if self._fd is None:
            self._fd = open_lock(self.lock_path)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise locked() from None
                time.sleep(0.0002)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def waited(self, creates):
        """The creates' wait is over: they are written, or gave up."""
        if self.observe_wait is not None:
            now = time.monotonic()
            for create in creates:
                self.observe_wait(now - create.arrived)

    def forget_parent(self):
        """In a process forked after use: start afresh, without touching the
        parent's lock (its flock is its own)."""
        if self._fd is not None:
            os.close(self._fd)  # our copy of the descriptor
            self._fd = None
        self._reset()

    def close(self):
        with self._batch:
            # The lock file is the leader's while it commits.
            self._batch.wait_for(lambda: self._committing_since is None, self.busy_timeout + 1)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def locked():
    return StoreError("database is locked (queued behind other writers)", LOCK_TIMEOUT)


class _Create:
    """A create waiting in its process's batch: its row, its deadline, and
    then whether it is done, and its error if it failed."""

    __slots__ = ("row", "arrived", "deadline", "done", "error")

    def __init__(self, row, arrived, deadline):
        self.row, self.arrived, self.deadline = row, arrived, deadline
        self.done, self.error = False, None
