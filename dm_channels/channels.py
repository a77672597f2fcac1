"""What both stores share (store.Store on SQLite, pgstore.PostgresStore): the
Channel they return, the one spelling of an id, their errors, and ChannelStore,
their contract and the part they do alike.

Ids are UUIDs in the 36-character hyphenated form, any letter case; a store
returns them in lower case. Both stores refuse anything else, and a pair of
one user twice, with a ValueError.
"""

import re
from dataclasses import dataclass
from datetime import datetime

NIL_UUID = "00000000-0000-0000-0000-000000000000"

# The one spelling of an id, in the API and in both stores: 36 characters,
# 8-4-4-4-12 hex, any case, any version nibble. (uuid.UUID would also take
# braces, urn:uuid: and 32 bare hex digits.)
UUID_FORM = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

# Why a store could not answer (StoreError.cause), as the metrics count them.
LOCK_TIMEOUT = "lock_timeout"  # SQLite's write lock not had within BUSY_TIMEOUT; PostgreSQL's statement timeout
IO = "io"  # the file: disk full, permissions, corruption, not a database
POSTGRES_UNAVAILABLE = "postgres_unavailable"  # no connection, or none free in the pool in time
OTHER = "other"
CAUSES = (LOCK_TIMEOUT, IO, POSTGRES_UNAVAILABLE, OTHER)


class StoreError(Exception):
    """The store could not answer. `cause` says why, as one of CAUSES; the
    driver's own error, if any, is the exception's __cause__."""

    def __init__(self, message, cause=OTHER):
        super().__init__(message)
        self.cause = cause


class UnknownPosition(LookupError):
    """A listing position that is not one of the listed channels."""


class SelfDMError(ValueError):
    """Both ids of a pair are the same user, and the store does not allow it."""


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


class ChannelStore:
    """What both stores are, and all that the app, its commands and library
    callers may use of them. The reads and the first step of get-or-create
    are the same on both, each in its own SQL (the subclass's FIND, GET,
    USER_CHANNELS, AT_USER_POSITION, ALL_CHANNELS, AT_ANY_POSITION and ALL_AFTER)
    and driver (its _run); a subclass gives the rest.
    """

    path: str  # where the channels are, for messages: a file, or a URL without password
    allow_self_dm = False
    observe_created = None  # None, or called for each channel created (the metrics)

    def get_or_create_dm(self, user_a, user_b):
        """Return (channel, created) for the unordered pair of user ids.

        ValueError for an id not in UUID_FORM; SelfDMError (a ValueError) for
        one user twice, unless the store was made with allow_self_dm=True.

        An existing channel is a plain read, which never waits for writers. A
        new one is an insert that ignores a pair already there (_create), then
        a read of the row that won: of any number of concurrent first
        requests, in any threads, processes or hosts, exactly one creates.
        """
        key = tuple(self._key(user) for user in sorted_pair(user_a, user_b, self.allow_self_dm))
        row = self._run(lambda conn: conn.execute(self.FIND, key).fetchone(), retry=True)
        if row is not None:
            return self._channel(row), False
        channel, created = self._create(key)
        if created and self.observe_created is not None:
            self.observe_created()
        return channel, created

    def get_channel(self, channel_id):
        """The channel with this id, or None."""
        key = self._key(canonical_id(channel_id))
        row = self._run(lambda conn: conn.execute(self.GET, (key,)).fetchone(), retry=True)
        return None if row is None else self._channel(row)

    def find_pairs(self, pairs):
        """{(user_low, user_high): channel} for those of `pairs` (of two user
        ids each, unordered) that have a channel; none is created."""
        keys = [tuple(self._key(user) for user in sorted_pair(a, b, True)) for a, b in pairs]
        rows = self._run(lambda conn: self._find_all(conn, keys), retry=True)
        return {(c.user_low, c.user_high): c for c in map(self._channel, rows)}

    def _find_all(self, conn, keys):
        # The rows of these pairs' channels: a statement for each (SQLite's
        # are in-process); PostgreSQL's store does it in one.
        return [row for key in keys if (row := conn.execute(self.FIND, key).fetchone())]

    def user_channels(self, user_id, limit, after=None):
        """A page of the user's channels, newest first: (channels, position).

        `after` is the position returned with the previous page, None for the
        first; the returned position is None on the last page. Keyset paging
        on seq: channels created between pages never shift or repeat a page.
        Raises UnknownPosition for a position that is not the user's.
        """
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
            return page_of(rows, limit, self._channel)

        return self._run(work, retry=True)

    def channels(self, batch=10_000):
        """Every channel, oldest first, read in batches (for exports and moves)."""
        after = 0
        while rows := self._run(
            lambda conn: conn.execute(self.ALL_AFTER, (after, batch)).fetchall(), retry=True
        ):
            yield from (self._channel(row[1:]) for row in rows)
            after = rows[-1][0]

    def count(self):
        return self._run(
            lambda conn: conn.execute("SELECT count(*) FROM dm_channel").fetchone()[0], retry=True
        )

    def ping(self):
        """A trivial query on the channel table; raises StoreError if it fails."""
        self._run(lambda conn: conn.execute("SELECT 1 FROM dm_channel LIMIT 1").fetchall(), retry=True)

    # What each store gives:
    #   _run(work, retry): work(conn) on its connection, any driver error a
    #       StoreError; retry: a read that may run again on a fresh connection.
    #   _key(id): a canonical id as the database keeps it; _channel(row): a Channel.
    #   _create(key): (channel, created) for a pair that had no channel.
    #   add_channels(channels) -> int: insert channels as they are (ids and
    #       createdAt kept) in one transaction, a pair with a channel keeping
    #       its own; how many were inserted. For bulk loads and moves.
    #   init_schema(), schema_version() -> int, close().
    #   check_writable(): StoreError, naming the cause, unless channels can be
    #       written (start-up checks: SQLite looks at the file system,
    #       PostgreSQL connects).
    #   backup(dest_path): SQLite's online copy to a new file; PostgreSQL
    #       refuses (StoreError): its backups are pg_dump's or the server's.


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


# Above every seq either database assigns: the position before the first page.
AFTER_EVERY_SEQ = (1 << 63) - 1


def page_of(rows, limit, to_channel):
    """A listing's page from up to limit + 1 rows (seq, *channel row), newest
    first: (channels, position of the last one), the position None on the
    last page."""
    page = [to_channel(row[1:]) for row in rows[:limit]]
    return page, (rows[limit - 1][0], page[-1].id) if len(rows) > limit else None
