"""The service as operators run it: real gunicorn processes on a real SQLite file."""

import random
import signal
import sqlite3
import subprocess
import sys
import threading

from conftest import ROOT, dm_url, new_user


def fire_at_once(server, requests, connections):
    """Send every (user1, user2) in `requests` from `connections` threads that
    start together; return the (status, body) answers."""
    answers = []
    lock = threading.Lock()
    barrier = threading.Barrier(connections)
    chunks = [requests[i::connections] for i in range(connections)]

    def send(chunk):
        barrier.wait()
        for user1, user2 in chunk:
            status, body, _ = server.get(dm_url(user1, user2))
            with lock:
                answers.append((status, body))

    threads = [threading.Thread(target=send, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def spellings(a, b):
    """The same pair as clients may send it: either order, either case."""
    return [(a, b), (b, a), (a.upper(), b), (b, a.upper()), (a, b.upper()), (b.upper(), a.upper())]


def test_simultaneous_first_requests_make_one_channel_per_pair(gunicorn, db_path):
    server = gunicorn(db_path, workers=4)
    pairs = [(new_user(), new_user()) for _ in range(40)]
    requests = []
    for a, b in pairs:
        forms = spellings(a, b)
        requests += [forms[i % len(forms)] for i in range(16)]
    random.shuffle(requests)

    answers = fire_at_once(server, requests, connections=32)

    assert [status for status, _ in answers] == [200] * len(requests)
    by_pair = {}
    for _, body in answers:
        meta = body["data"]["channel"]["metadata"]
        by_pair.setdefault((meta["user1"], meta["user2"]), []).append(body["data"])
    assert set(by_pair) == {tuple(sorted(pair)) for pair in pairs}
    for answers_for_pair in by_pair.values():
        assert len(answers_for_pair) == 16
        assert len({data["channel"]["id"] for data in answers_for_pair}) == 1
        assert len({data["channel"]["createdAt"] for data in answers_for_pair}) == 1
        assert sum(data["created"] for data in answers_for_pair) == 1
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM dm_channel").fetchone()[0] == len(pairs)


def test_channels_survive_a_restart(gunicorn, db_path):
    server = gunicorn(db_path, workers=2)
    pairs = [(new_user(), new_user()) for _ in range(10)]
    before = {pair: server.get(dm_url(*pair))[1]["data"]["channel"] for pair in pairs}
    server.stop(signal.SIGTERM)

    restarted = gunicorn(db_path, workers=2)
    for (a, b), channel in before.items():
        status, body, _ = restarted.get(dm_url(b, a))
        assert status == 200
        assert body["data"]["created"] is False
        assert body["data"]["channel"] == channel


def test_flask_run_serves_the_app_from_the_repository_root(tmp_path):
    """`flask --app app` finds the app from the repository root (as the README says)."""
    database = tmp_path / "cli.sqlite3"
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "init-db"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "FLASK_DATABASE": str(database)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert str(database) in result.stdout
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
