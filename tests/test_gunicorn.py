"""The service as operators run it: real gunicorn processes on a real SQLite file."""

import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

from helpers import (
    ROOT,
    assert_one_channel_per_pair,
    dm_url,
    fire_at_once,
    first_request_rounds,
    free_port,
    http_get,
    new_user,
)


def test_simultaneous_first_requests_make_one_channel_per_pair(gunicorn, db_path):
    server = gunicorn(db_path, workers=4)
    pairs = [(new_user(), new_user()) for _ in range(40)]

    answers = fire_at_once(first_request_rounds(pairs, [server]))

    assert_one_channel_per_pair(answers, pairs)
    with closing(sqlite3.connect(db_path)) as conn:
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


def test_init_db_runs_from_the_repository_root(tmp_path):
    """`flask --app app init-db` finds the app from the repository root (as the README says)."""
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
    with closing(sqlite3.connect(database)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_flask_run_serves_the_app_from_the_repository_root(tmp_path):
    """The development server: `flask --app app run`, a thread per request."""
    port = free_port()
    log = open(tmp_path / "flask-run.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "FLASK_DATABASE": str(tmp_path / "dev.sqlite3")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, _ = http_get(url + "/healthz", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "flask-run.log").read_text()
                time.sleep(0.1)
        assert status == 200
        a, b = new_user(), new_user()
        first = http_get(url + dm_url(a, b))[1]["data"]
        again = http_get(url + dm_url(b.upper(), a))[1]["data"]
        assert first["created"] is True and again["created"] is False
        assert again["channel"] == first["channel"]
    finally:
        server.terminate()
        server.wait(10)
        log.close()
