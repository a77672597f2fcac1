"""Crashes and faults, with real processes: what is acknowledged is never lost.

Each test prints its figures (run with -s to see them next to the dots).
"""

import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Callable

import pytest

from dm_channels.app import create_app
from dm_channels.settings import shown_database
from helpers import (
    OUTAGE_ROUTES,
    ROOT,
    dm_url,
    new_user,
    query,
    release,
    report,
    write_lock_held_by_another_process,
)
from dm_channels.store import Store, StoreError


# -- the database under test --------------------------------------------------------


@dataclass
class Database:
    """A database a crash test runs against: the DATABASE setting that names
    it, and how to check it is intact ("ok") once everything was killed."""

    setting: str
    integrity: Callable[[], str]


def sqlite_database(tmp_path):
    path = str(tmp_path / "dm.sqlite3")

    def integrity():
        with closing(sqlite3.connect(path)) as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]

    return Database(path, integrity)


def postgresql_database(request, route):
    url = request.getfixturevalue("new_postgres_database")(route)

    def integrity():
        # The server outlives the killed workers; check the pair key and the
        # b-tree indexes (amcheck) are whole, and no pair has two channels.
        query(url, "CREATE EXTENSION IF NOT EXISTS amcheck")
        query(
            url,
            "SELECT bt_index_check(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'dm_channel'::regclass",
        )
        pairs = query(
            url, "SELECT count(*), count(DISTINCT (user_low, user_high)) FROM dm_channel"
        )[0]
        return "ok" if pairs[0] == pairs[1] else f"duplicate pairs: {pairs}"

    return Database(url, integrity)


@pytest.fixture(params=["sqlite", *OUTAGE_ROUTES])
def database(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_database(tmp_path)
    return postgresql_database(request, request.param)


# -- helpers ---------------------------------------------------------------------------


def create_until_stopped(server, threads, acknowledged, stop):
    """Create new pairs from `threads` threads until `stop` is set or the
    server stops answering; record every pair answered with 200 in
    `acknowledged` as pair -> (id, createdAt)."""

    def client():
        while not stop.is_set():
            pair = (new_user(), new_user())
            try:
                status, body, _ = server.get(dm_url(*pair), timeout=10)
            except (OSError, http.client.HTTPException):
                return  # the server is gone
            if status == 200:
                channel = body["data"]["channel"]
                acknowledged[pair] = (channel["id"], channel["createdAt"])

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return workers


def lost_channels(server, acknowledged):
    """The acknowledged pairs that no longer answer with the same channel."""

    def lost(item):
        (a, b), (channel_id, created_at) = item
        status, body, _ = server.get(dm_url(b, a))
        if status != 200:
            return True
        channel = body["data"]["channel"]
        return body["data"]["created"] or (channel["id"], channel["createdAt"]) != (
            channel_id,
            created_at,
        )

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(lost, list(acknowledged.items())))


# -- kill -9 under load --------------------------------------------------------------

KILL_ROUNDS = 3


def test_acknowledged_channels_survive_kill_9_under_load(gunicorn, database, capsys):
    acknowledged = {}
    for round_number in range(1, KILL_ROUNDS + 1):
        server = gunicorn(database.setting, workers=4)
        assert lost_channels(server, acknowledged) == 0
        this_round, stop = {}, threading.Event()
        clients = create_until_stopped(server, 8, this_round, stop)
        deadline = time.monotonic() + 30
        while len(this_round) < 60 * round_number and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop(signal.SIGKILL)  # the whole process group, mid-load
        stop.set()
        for client in clients:
            client.join()
        assert this_round, "no channel was acknowledged before the kill"
        assert database.integrity() == "ok"
        acknowledged.update(this_round)

    server = gunicorn(database.setting, workers=4)
    lost = lost_channels(server, acknowledged)
    report(
        capsys,
        f"kill -9 under load: {KILL_ROUNDS} rounds, acknowledged {len(acknowledged)}, lost {lost}",
    )
    assert lost == 0


# -- lock contention ---------------------------------------------------------------------


@pytest.mark.xdist_group("timing")
def test_store_locked_past_busy_timeout_fails_creates_in_time_and_recovers(
    gunicorn, db_path, capsys
):
    server = gunicorn(db_path, workers=2, env={"FLASK_BUSY_TIMEOUT": "1"})
    existing = {}
    for _ in range(8):
        pair = (new_user(), new_user())
        existing[pair] = server.get(dm_url(*pair))[1]["data"]["channel"]

    with write_lock_held_by_another_process(db_path) as holder:
        started = time.monotonic()
        status, body, _ = server.get(dm_url(new_user(), new_user()))
        waited = time.monotonic() - started
        assert status == 500
        assert body["success"] is False and body["error"]["code"] == "STORE_ERROR"
        assert "Traceback" not in json.dumps(body) and db_path not in json.dumps(body)
        assert 0.9 <= waited < 1 + 3  # the busy timeout, plus a little: no hang

        for (a, b), channel in existing.items():
            status, body, _ = server.get(dm_url(b, a))
            assert status == 200
            assert body["data"]["channel"] == channel
        release(holder)

    # The lock is gone: creates work again, without a restart.
    status, body, _ = server.get(dm_url(new_user(), new_user()))
    assert status == 200 and body["data"]["created"] is True
    report(
        capsys,
        f"store locked: create answered 500 after {waited:.2f}s (BUSY_TIMEOUT 1s), "
        f"{len(existing)} existing channels 200, create after release 200",
    )


@pytest.mark.xdist_group("timing")
def test_a_burst_of_creates_on_a_locked_store_leaves_threads_for_reads(gunicorn, db_path, capsys):
    """More creates than the server has threads (2 workers x 4), all waiting on
    a lock held outside: each fails within BUSY_TIMEOUT plus a little, and reads
    of existing channels that arrive meanwhile are not stuck behind them."""
    server = gunicorn(db_path, workers=2, env={"FLASK_BUSY_TIMEOUT": "3"})
    existing = [(new_user(), new_user()) for _ in range(4)]
    for pair in existing:
        assert server.get(dm_url(*pair))[0] == 200

    with write_lock_held_by_another_process(db_path) as holder:
        creates = []

        def create():
            started = time.monotonic()
            status, _, _ = server.get(dm_url(new_user(), new_user()))
            creates.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=create) for _ in range(24)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # past STALLED, well before BUSY_TIMEOUT
        reads = []
        for a, b in existing:
            started = time.monotonic()
            status, _, _ = server.get(dm_url(b, a))
            reads.append((status, time.monotonic() - started))
        for t in threads:
            t.join()
        release(holder)

    assert [status for status, _ in reads] == [200] * len(existing)
    assert [status for status, _ in creates] == [500] * len(threads)
    slowest_read = max(waited for _, waited in reads)
    slowest_create = max(waited for _, waited in creates)
    report(
        capsys,
        f"{len(threads)} creates on a locked store: all 500 within {slowest_create:.2f}s "
        f"(BUSY_TIMEOUT 3s); reads meanwhile 200 within {slowest_read:.2f}s",
    )
    assert slowest_read < 1.0
    assert slowest_create < 3 + 1.5


# -- store missing or unwritable at start ----------------------------------------------


def unusable_databases(tmp_path):
    """(DATABASE value, what the start-up message must say of it and of the cause)."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "dm.sqlite3").touch(mode=0o600)
    (tmp_path / "dm.sqlite3-shm").symlink_to(tmp_path / "notes.txt")  # planted in a shared folder
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    cases = {
        "folder missing": (tmp_path / "nowhere" / "dm.sqlite3", "No such file or directory"),
        "folder is a file": (tmp_path / "a-file" / "dm.sqlite3", "Not a directory"),
        "database is a folder": (tmp_path / "a-folder", "is a folder"),
        "not a database": (tmp_path / "notes.txt", "file is not a database"),
        "a -shm symlink": (tmp_path / "dm.sqlite3", "dm.sqlite3-shm is a symbolic link"),
        "a SQLite URL": (f"sqlite:///{tmp_path}/dm.sqlite3", "or a postgresql:// URL"),
        "another URL": ("mysql://dm:secret@127.0.0.1/dm", "or a postgresql:// URL"),
    }
    if os.geteuid() != 0:  # root writes anyway
        cases["folder read-only"] = (read_only / "dm.sqlite3", "Permission denied")
    return cases


UNUSABLE = [
    "folder missing", "folder is a file", "database is a folder", "not a database", "a -shm symlink",
    "a SQLite URL", "another URL", "folder read-only",
]


@pytest.mark.parametrize("case", UNUSABLE)
def test_gunicorn_refuses_an_unusable_database_in_one_line(gunicorn, tmp_path, case):
    cases = unusable_databases(tmp_path)
    if case not in cases:
        pytest.skip("root can write to a read-only folder")
    value, cause = cases[case]
    server = gunicorn(value, workers=2, wait=False)
    returncode = server.process.wait(30)
    log = server.log()
    server.stop()  # closes its log
    assert returncode != 0
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, log
    assert "DATABASE" in errors[0] and shown_database(str(value)) in errors[0] and cause in errors[0]
    assert "secret" not in log
    assert "Traceback" not in log
    assert "Booting worker" not in log  # stopped before any worker started


def test_flask_refuses_an_unusable_database_at_start(tmp_path):
    path = tmp_path / "nowhere" / "dm.sqlite3"
    with pytest.raises(ValueError, match=f"{path}: No such file or directory"):
        create_app({"TESTING": True, "DATABASE": str(path)})


# -- graceful stop -------------------------------------------------------------------------


@pytest.mark.xdist_group("timing")
def test_sigterm_lets_in_flight_requests_finish(gunicorn, db_path, capsys):
    server = gunicorn(db_path, workers=2, env={"FLASK_BUSY_TIMEOUT": "20"})
    with closing(Store(db_path)) as store:
        store.init_schema()
    answers = []

    def create(pair):
        status, body, _ = server.get(dm_url(*pair))
        answers.append((pair, status, body))

    # Creates wait on the lock held by another process: they are in flight.
    with write_lock_held_by_another_process(db_path) as holder:
        pairs = [(new_user(), new_user()) for _ in range(6)]
        clients = [threading.Thread(target=create, args=(pair,)) for pair in pairs]
        for client in clients:
            client.start()
        time.sleep(0.3)  # let every request reach a worker
        assert answers == []
        # The lock goes only once the server is stopping (and well before the
        # creates queued in a worker would stop waiting: store.STALLED).
        threading.Timer(0.05, release, [holder]).start()
        server.stop(signal.SIGTERM)
        for client in clients:
            client.join()

    assert server.process.returncode == 0
    statuses = [status for _, status, _ in answers]
    report(capsys, f"SIGTERM: {len(pairs)} requests in flight, {statuses.count(200)} answered 200")
    assert statuses == [200] * len(pairs)
    with closing(Store(db_path)) as store:
        stored = {channel.id for channel in store.channels()}
    assert {body["data"]["channel"]["id"] for _, _, body in answers} <= stored


# -- backup while serving ------------------------------------------------------------------


def flask_command(*args, database):
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT,
        env={**os.environ, "FLASK_DATABASE": str(database)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_backup_while_serving_restores_every_channel_it_began_with(
    gunicorn, db_path, tmp_path, capsys
):
    server = gunicorn(db_path, workers=2)
    with closing(Store(db_path)) as store:
        store.init_schema()
    # A long read keeps checkpoints from moving new channels into the main
    # file: they all stay in the -wal file, which a plain file copy misses.
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM dm_channel").fetchone()
    before, stop = {}, threading.Event()
    clients = create_until_stopped(server, 4, before, stop)
    deadline = time.monotonic() + 30
    while len(before) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    began_with = dict(before)  # acknowledged before the backup began

    backup = tmp_path / "backup.sqlite3"
    result = flask_command("backup", str(backup), database=db_path)
    stop.set()
    for client in clients:
        client.join()
    reader.close()
    assert result.returncode == 0, result.stderr
    assert str(backup) in result.stdout
    with closing(sqlite3.connect(backup)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        in_backup = conn.execute("SELECT count(*) FROM dm_channel").fetchone()[0]
    assert not os.path.exists(str(backup) + "-wal")  # one self-contained file

    # Restore as the README says: stop, replace the file, drop -wal/-shm, start.
    server.stop(signal.SIGTERM)
    shutil.copyfile(backup, db_path)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.remove(db_path + suffix)
    restored = gunicorn(db_path, workers=2)
    lost = lost_channels(restored, began_with)
    report(
        capsys,
        f"backup while serving: {len(began_with)} channels when it began, "
        f"{in_backup} in the backup, {len(before)} acknowledged by the end, lost {lost}",
    )
    assert lost == 0
    # The load went on while the backup ran, and the copy holds a moment of it.
    assert len(began_with) <= in_backup <= len(before)


def test_backup_refuses_to_overwrite_a_file(tmp_path, db_path):
    with closing(Store(db_path)) as store:
        store.get_or_create_dm(new_user(), new_user())
    existing = tmp_path / "exists.sqlite3"
    existing.write_text("precious")
    result = flask_command("backup", str(existing), database=db_path)
    assert result.returncode != 0
    assert "already exists" in result.stderr
    assert existing.read_text() == "precious"
