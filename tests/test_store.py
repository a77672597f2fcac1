"""The store on its own, as scripts and internal tools use it: Store(path).

Tests taking `store` or `database` run on both stores (SQLite and
PostgreSQL); those taking `sqlite_store` or `db_path` are about SQLite itself
(its PRAGMAs, its write lock). PostgreSQL's own are in test_pgstore.py.
"""

import fcntl
import os
import sqlite3
from contextlib import closing
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import ROOT, new_user
from dm_channels.app import open_store
from dm_channels.store import SCHEMA_VERSION, Store, StoreError


@pytest.fixture
def store(database, store_settings):
    store = open_store(database, **store_settings)
    yield store
    store.close()


@pytest.fixture
def sqlite_store(db_path):
    store = Store(db_path)
    yield store
    store.close()


@pytest.mark.pgbouncer
def test_get_or_create_without_flask(store):
    a, b = new_user(), new_user()
    channel, created = store.get_or_create_dm(a, b)
    assert created is True
    again, created_again = store.get_or_create_dm(b, a)
    assert created_again is False
    assert again == channel
    assert (channel.user_low, channel.user_high) == tuple(sorted([a, b]))
    assert channel.name == f"DM-{min(a, b)}-{max(a, b)}"


def test_nothing_is_opened_before_first_use(tmp_path):
    path = tmp_path / "lazy.sqlite3"
    Store(path)
    assert not path.exists()


def test_schema_is_created_on_first_use_with_its_version(sqlite_store, db_path):
    sqlite_store.get_or_create_dm(new_user(), new_user())
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_connections_use_synchronous_full_by_default(sqlite_store):
    sqlite_store.get_or_create_dm(new_user(), new_user())
    # A connection's own PRAGMA shows nowhere else: asked on the store's connection.
    conn = sqlite_store._connection()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_synchronous_can_be_lowered_by_setting(db_path):
    store = Store(db_path, synchronous="normal")
    conn = store._connection()  # as above
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    store.close()


def test_a_newer_schema_is_refused(db_path):
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(db_path).init_schema()


@pytest.mark.pgbouncer
def test_many_threads_asking_at_once_get_one_channel(database, store_settings):
    stores = [open_store(database, **store_settings) for _ in range(4)]  # as if four processes
    pairs = [(new_user(), new_user()) for _ in range(20)]
    results = []
    barrier = threading.Barrier(16)

    def ask(store, flip):
        barrier.wait()
        for a, b in pairs:
            results.append(store.get_or_create_dm(*((b, a) if flip else (a, b))))

    threads = [threading.Thread(target=ask, args=(stores[i % 4], i % 2)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 * len(pairs)
    by_pair = {}
    for channel, created in results:
        by_pair.setdefault((channel.user_low, channel.user_high), []).append((channel, created))
    assert len(by_pair) == len(pairs)
    for answers in by_pair.values():
        assert len({channel for channel, _ in answers}) == 1
        assert sum(created for _, created in answers) == 1
    assert stores[0].count() == len(pairs)
    for store in stores:
        store.close()


def hold_write_lock(db_path):
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


@pytest.mark.xdist_group("timing")
def test_existing_channel_is_read_without_the_write_lock(db_path):
    store = Store(db_path, busy_timeout=0.2)
    a, b = new_user(), new_user()
    channel, _ = store.get_or_create_dm(a, b)
    holder = hold_write_lock(db_path)
    try:
        started = time.monotonic()
        assert store.get_or_create_dm(b, a) == (channel, False)
        assert time.monotonic() - started < 0.19  # under its own busy_timeout of 0.2 s
    finally:
        holder.rollback()
        holder.close()


@pytest.mark.xdist_group("timing")
def test_creates_fail_after_the_busy_timeout_then_recover(db_path):
    """6 creates at once, so in one batch or a few, while SQLite's lock is held outside: each fails in time."""
    store = Store(db_path, busy_timeout=0.3)
    store.init_schema()
    holder = hold_write_lock(db_path)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            errors = [f.exception() for f in [pool.submit(store.get_or_create_dm, new_user(), new_user())
                                              for _ in range(6)]]
        assert all(isinstance(e, StoreError) and "locked" in str(e) for e in errors), errors
        assert 0.25 < time.monotonic() - started < 0.3 + 0.5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _, created = store.get_or_create_dm(new_user(), new_user())
    assert created is True
    assert store.count() == 1
    store.close()


@pytest.mark.pgbouncer
def test_a_store_is_usable_from_a_new_thread(store):
    a, b = new_user(), new_user()
    channel, _ = store.get_or_create_dm(a, b)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(store.get_or_create_dm(a, b)))
    thread.start()
    thread.join()
    assert seen == [(channel, False)]


@pytest.mark.pgbouncer
def test_channels_can_be_copied_with_ids_and_times_kept(store, tmp_path):
    made = [store.get_or_create_dm(new_user(), new_user())[0] for _ in range(25)]
    copy = Store(tmp_path / "copy.sqlite3")
    assert copy.add_channels(store.channels(batch=7)) == 25
    assert list(copy.channels()) == made
    # Copying again adds nothing: each pair keeps the channel it has.
    assert copy.add_channels(store.channels()) == 0
    a, b = made[0].user_low, made[0].user_high
    assert copy.get_or_create_dm(b, a) == (made[0], False)
    copy.close()


@pytest.mark.pgbouncer
def test_all_channels_pages_every_channel_newest_first(store):
    """A library caller pages the whole store as a user's channels are paged:
    (channels, position), position None on the last page; a position that
    names no channel is UnknownPosition."""
    from dm_channels.store import UnknownPosition

    assert store.all_channels(10) == ([], None)
    made = [store.get_or_create_dm(new_user(), new_user())[0] for _ in range(7)]
    pages, position = [], None
    while True:
        channels, position = store.all_channels(3, position)
        pages.append(channels)
        if position is None:
            break
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [channel for page in pages for channel in page] == made[::-1]
    seq, _ = store.all_channels(1)[1]
    with pytest.raises(UnknownPosition):
        store.all_channels(3, (seq, new_user()))


NOT_UUIDS = [
    "abcd",
    "3c90c3cc-0d44-4b50-8888-8dd25736052a00",
    "3c90c3cc-0d44-4b50-8888",
    "not-a-uuid",
    "3c90c3cc0d444b5088888dd25736052a",  # uuid.UUID would take these three
    "{3c90c3cc-0d44-4b50-8888-8dd25736052a}",
    "urn:uuid:3c90c3cc-0d44-4b50-8888-8dd25736052a",
    " 3c90c3cc-0d44-4b50-8888-8dd25736052a",
    None,
]


@pytest.mark.parametrize("bad", NOT_UUIDS)
def test_an_id_that_is_not_a_uuid_is_refused_naming_it_and_nothing_is_stored(store, bad):
    """The same form as the API's, with a message a library caller can act on."""
    calls = [
        lambda: store.get_or_create_dm(bad, new_user()),
        lambda: store.get_or_create_dm(new_user(), bad),
        lambda: store.get_channel(bad),
        lambda: store.user_channels(bad, 10),
    ]
    for call in calls:
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == (
            f"{bad!r} is not a UUID: expected 36 characters in the hyphenated "
            "8-4-4-4-12 hex form, e.g. 3c90c3cc-0d44-4b50-8888-8dd25736052a"
        )
    assert store.count() == 0


@pytest.mark.pgbouncer
def test_ids_in_any_letter_case_name_one_channel_in_lower_case(store):
    a, b = new_user(), new_user()
    channel, _ = store.get_or_create_dm(a.upper(), b)
    assert store.get_or_create_dm(b.upper(), a.upper()) == (channel, False)
    assert (channel.user_low, channel.user_high) == tuple(sorted([a, b]))
    assert store.get_channel(channel.id.upper()) == channel


@pytest.mark.pgbouncer
def test_a_store_refuses_a_pair_of_one_user_unless_told_otherwise(store, database, store_settings):
    from dm_channels.store import SelfDMError

    a = new_user()
    with pytest.raises(SelfDMError, match=f"two different users, not {a} twice"):
        store.get_or_create_dm(a, a.upper())
    assert store.count() == 0
    notes = open_store(database, allow_self_dm=True, **store_settings)
    channel, created = notes.get_or_create_dm(a, a.upper())
    assert created and channel.user_low == channel.user_high == a
    notes.close()


@pytest.mark.pgbouncer
def test_channel_json_is_the_api_shape_without_flask(store, client):
    """What a library caller gets from schemas.channel_json is what the API answers."""
    from dm_channels.schemas import channel_json

    a, b = new_user(), new_user()
    served = client.get(f"/api/messaging/dm-channel?userId1={a}&userId2={b}").json
    channel = store.get_channel(served["data"]["channel"]["id"])
    assert channel_json(channel) == served["data"]["channel"]
    server = "3c90c3cc-0d44-4b50-8888-8dd25736052a"
    assert channel_json(channel, server_id=server)["serverId"] == server


@pytest.mark.xdist_group("timing")
def test_creates_waiting_in_a_process_are_written_by_one_statement(db_path, monkeypatch):
    """While another process holds <database>-writers, a create waits for it and 7 more come meanwhile; once
    the lock is free, that create's turn writes all 8 in one INSERT (one transaction, one fsync): one moment,
    consecutive seq. A pair asked twice in that batch has one channel, created once."""
    writes = []
    write = Store._write
    monkeypatch.setattr(Store, "_write", lambda self, deadline: writes.append(1) or write(self, deadline))
    store = Store(db_path)
    store.init_schema()
    other = os.open(db_path + "-writers", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    twice = (new_user(), new_user())
    pairs = [(new_user(), new_user()) for _ in range(6)] + [twice, twice[::-1]]
    with ThreadPoolExecutor(len(pairs)) as pool:
        first = pool.submit(store.get_or_create_dm, *pairs[0])
        time.sleep(0.2)  # its turn, waiting for the flock
        answers = [first] + [pool.submit(store.get_or_create_dm, *pair) for pair in pairs[1:]]
        time.sleep(0.3)  # all queued
        os.close(other)
        answers = [future.result() for future in answers]
    assert len(writes) == 1
    assert [created for _, created in answers[:6]] == [True] * 6
    assert answers[6][0] == answers[7][0] and {answers[6][1], answers[7][1]} == {True, False}
    assert len({channel.created_at for channel, _ in answers}) == 1
    with closing(sqlite3.connect(db_path)) as conn:
        seqs = [conn.execute("SELECT seq FROM dm_channel WHERE id = ?", (bytes.fromhex(c.id.replace("-", "")),))
                .fetchone()[0] for c, created in answers if created]
    assert sorted(seqs) == list(range(min(seqs), min(seqs) + 7))
    store.close()


@pytest.mark.xdist_group("timing")
def test_a_create_that_stops_waiting_while_its_batch_is_written_gets_its_outcome(db_path):
    """Two creates join one batch; its write waits 1.5 s for SQLite's lock, held outside. The second stops
    waiting for its turn at STALLED (1 s), but its row is being written: it answers once the write ends,
    created, rather than fail while its channel is committed."""
    store = Store(db_path)
    store.init_schema()
    holder = hold_write_lock(db_path)
    other = os.open(db_path + "-writers", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)  # so that both creates wait for it, then go in one batch
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(store.get_or_create_dm, new_user(), new_user()) for _ in range(2)]
        time.sleep(0.1)
        os.close(other)
        time.sleep(1.4)
        holder.commit()
        answers = [future.result() for future in answers]
    holder.close()
    assert [created for _, created in answers] == [True, True]
    assert [store.get_channel(channel.id) for channel, _ in answers] == [channel for channel, _ in answers]
    store.close()


def test_a_create_waiting_while_the_store_closes_fails_at_once(db_path, monkeypatch):
    """close() starts afresh while a create waits for its turn: that create fails, rather than wait
    (or spin) on a queue no writer reads any more."""
    store = Store(db_path)
    store.init_schema()
    write = Store._write
    monkeypatch.setattr(Store, "_write", lambda self, deadline: (write(self, deadline), time.sleep(0.3)))
    pool = ThreadPoolExecutor(3)  # not waited for at the end: a create that spins would hold the test
    first = pool.submit(store.get_or_create_dm, new_user(), new_user())
    time.sleep(0.05)  # its turn, in its write
    closing_ = pool.submit(store.close)
    time.sleep(0.05)  # close() waits for that turn
    second = pool.submit(store.get_or_create_dm, new_user(), new_user())
    assert first.result()[1] is True
    closing_.result()
    started = time.monotonic()
    with pytest.raises(StoreError, match="closed"):
        second.result(timeout=5)
    pool.shutdown()
    assert time.monotonic() - started < 1
    assert store.get_or_create_dm(new_user(), new_user())[1] is True
    store.close()


# One process creating one channel when told to go: prints its outcome and wait.
CREATE_ON_GO = """
import sys, time, uuid
from dm_channels.store import Store, StoreError
timeout = float(sys.argv[2])
store = Store(sys.argv[1], busy_timeout=timeout)
store.init_schema()
print("ready", flush=True)
sys.stdin.readline()
outcomes, longest, began = set(), 0.0, time.monotonic()
while time.monotonic() - began < 3 * timeout:  # create after create
    started = time.monotonic()
    try:
        store.get_or_create_dm(str(uuid.uuid4()), str(uuid.uuid4()))
        outcomes.add("created")
    except StoreError:
        outcomes.add("failed")
    longest = max(longest, time.monotonic() - started)
print(",".join(sorted(outcomes)), longest, flush=True)
"""


@pytest.mark.xdist_group("timing")
def test_creates_queued_in_many_processes_each_fail_within_the_busy_timeout(db_path):
    """Writers queue for the write lock behind one another (an flock beside the
    database); while a program outside the queue holds the lock, every create
    of 6 processes, each creating again and again, fails within BUSY_TIMEOUT
    plus a little: no writer is passed over in the queue until it has waited
    several timeouts."""
    Store(db_path).init_schema()
    holder = hold_write_lock(db_path)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_ON_GO, db_path, "1.0"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(6)
    ]
    try:
        for writer in writers:
            assert writer.stdout.readline() == "ready\n"
        for writer in writers:
            writer.stdin.write("go\n")
            writer.stdin.flush()
        outcomes = [writer.stdout.readline().split() for writer in writers]
    finally:
        holder.rollback()
        holder.close()
        for writer in writers:
            writer.kill()
            writer.communicate()  # closes its pipes
    assert [outcome for outcome, _ in outcomes] == ["failed"] * 6
    assert max(float(longest) for _, longest in outcomes) < 1.0 + 0.8


def test_a_zero_busy_timeout_creates_at_once_when_nobody_writes(tmp_path):
    store = Store(tmp_path / "zero.sqlite3", busy_timeout=0)
    assert store.get_or_create_dm(new_user(), new_user())[1] is True
    store.close()


FIRST_USE_RACE = """
import multiprocessing, os, sys, tempfile
from dm_channels.store import Store, StoreError

def first_use(path, barrier, answers):
    store = Store(path)
    barrier.wait()
    try:
        store.get_or_create_dm("3c90c3cc-0d44-4b50-8888-8dd25736052a", "0b1e2c4d-9f1a-4c2e-8d7b-1a2b3c4d5e6f")
        answers.put("ok")
    except StoreError as e:
        answers.put(str(e))

for trial in range(int(sys.argv[1])):
    path = os.path.join(tempfile.mkdtemp(dir=sys.argv[2]), "new.sqlite3")
    barrier, answers = multiprocessing.Barrier(8), multiprocessing.Queue()
    processes = [multiprocessing.Process(target=first_use, args=(path, barrier, answers)) for _ in range(8)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    for _ in processes:
        print(answers.get(), flush=True)
"""


def test_processes_opening_a_new_file_at_once_all_get_the_channel(tmp_path):
    """On a new file, 8 processes switch it to WAL and create the schema at the
    same moment (as gunicorn's workers do on their first requests); SQLite
    answers some of them 'locked' without waiting, and the store tries again."""
    result = subprocess.run(
        [sys.executable, "-c", FIRST_USE_RACE, "30", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split("\n")[:-1]
    assert len(answers) == 30 * 8
    assert [answer for answer in answers if answer != "ok"] == []


def test_a_thread_connecting_while_another_makes_the_file_keeps_the_processs_lock(db_path, monkeypatch):
    """The thread that makes a new database file closes its descriptor, slowly here, while a second thread
    would connect: the process must keep its lock on the file, else a worker booting meanwhile takes
    itself for SQLite's last user and deletes the -wal and -shm in use (creates then lost, pairs doubled)."""
    store = Store(db_path)
    connected, close = threading.Event(), os.close

    def slow_close(fd):
        if os.path.exists(db_path) and os.fstat(fd).st_ino == os.stat(db_path).st_ino:
            connected.wait(0.5)  # the second thread connects meanwhile, if it can
        close(fd)

    def connect_second():
        store._connection()
        connected.set()

    monkeypatch.setattr(os, "close", slow_close)
    with ThreadPoolExecutor(2) as threads:  # each keeps its connection
        first = threads.submit(store._connection)
        time.sleep(0.1)  # in slow_close
        threads.submit(connect_second).result()
        first.result()
        monkeypatch.undo()
        booting = f"from dm_channels.store import Store; Store({db_path!r}).check_writable()"
        subprocess.run([sys.executable, "-c", booting], cwd=ROOT, check=True, timeout=60)
        assert os.path.exists(db_path + "-wal") and os.path.exists(db_path + "-shm")
        pairs = [(new_user(), new_user()) for _ in range(20)]
        made = list(threads.map(lambda pair: store.get_or_create_dm(*pair)[0].id, pairs))
    counted = f"import sqlite3; print(sqlite3.connect({db_path!r}).execute('SELECT count(*) FROM dm_channel').fetchone()[0])"
    assert subprocess.run([sys.executable, "-c", counted], capture_output=True, text=True, check=True).stdout == f"{len(made)}\n"
    store.close()


def test_a_writers_lock_file_that_cannot_be_opened_is_a_store_error(sqlite_store, db_path):
    os.mkdir(db_path + "-writers")
    with pytest.raises(StoreError, match="-writers"):
        sqlite_store.get_or_create_dm(new_user(), new_user())


def test_both_stores_provide_the_store_contract(store):
    """ChannelStore holds the reads; each store gives the rest (channels.py)."""
    from dm_channels.store import ChannelStore

    assert isinstance(store, ChannelStore)
    own = ["_run", "_key", "_channel", "_create", "add_channels", "init_schema", "schema_version",
           "check_writable", "backup", "close", "path"]
    sql = ["FIND", "GET", "USER_CHANNELS", "AT_USER_POSITION", "ALL_CHANNELS", "AT_ANY_POSITION",
           "ALL_AFTER"]
    missing = [name for name in own + sql if not hasattr(store, name)]
    assert missing == []
    for name in sql:
        assert getattr(type(store), name) is not getattr(ChannelStore, name, None)


def query_count(db_path):
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT count(*) FROM dm_channel").fetchone()[0]


def test_a_process_forked_after_use_creates_with_its_own_connection_and_lock(db_path):
    """A store used before a fork (its connection and its writers' lock file
    open) serves the child with its own, and the parent goes on with its."""
    store = Store(db_path)
    store.get_or_create_dm(new_user(), new_user())  # a connection and the -writers file open
    child_pair = (new_user(), new_user())
    pid = os.fork()
    if pid == 0:  # the child: create, then exit with the outcome
        try:
            _, created = store.get_or_create_dm(*child_pair)
            os._exit(0 if created else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get_or_create_dm(*child_pair)[1] is False  # the child's channel, committed
    assert store.get_or_create_dm(new_user(), new_user())[1] is True
    store.close()
    assert query_count(db_path) == 3
