"""The service as operators run it: real gunicorn processes on a real SQLite file."""

import http.client
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest

from helpers import (
    ROOT,
    assert_one_channel_per_pair,
    dm_url,
    fire_at_once,
    first_request_rounds,
    free_port,
    http_get,
    new_user,
    report,
)

GOOD_PAIR = ("3c90c3cc-0d44-4b50-8888-8dd25736052a", "0b1e2c4d-9f1a-4c2e-8d7b-1a2b3c4d5e6f")


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


def test_the_text_access_line_is_the_one_gunicorn_would_write_from_the_format():
    """gunicorn.conf.py's Logger writes ACCESS_LOG_FORMAT's line itself, more
    cheaply than gunicorn; the line must be the very one gunicorn makes."""
    import logging
    import runpy
    from datetime import timedelta
    from types import SimpleNamespace

    from gunicorn import glogging
    from gunicorn.config import Config

    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", conf["access_log_format"])
    environ = {
        "REMOTE_ADDR": "10.0.0.7", "REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1",
        "RAW_URI": '/api/messaging/dm-channel?userId1="a"&userId2=b', "PATH_INFO": "/x",
        "HTTP_USER_AGENT": "curl", "dm_channels.request_id": 'id-"1"',
    }
    lines = []
    for logger_class, sent in ((conf["logger_class"], 409), (glogging.Logger, 409),
                               (conf["logger_class"], None), (glogging.Logger, None)):
        logger = logger_class(cfg)
        logger.now = lambda: "[28/Nov/2026:03:30:00 +0000]"
        logger.access_log.handlers = [handler := logging.Handler()]
        handler.emit = lambda record: lines.append(record.getMessage())
        resp = SimpleNamespace(status="200 OK", status_code=200, sent=sent, headers=[])
        req = SimpleNamespace(headers=[("USER-AGENT", "curl")])
        logger.access(resp, req, environ, timedelta(microseconds=1500))
    assert lines[0] == lines[1] and lines[2] == lines[3], lines
    assert lines[0].endswith(' 200 409 id-\\"1\\"') and lines[2].endswith(" 200 - id-\\\"1\\\"")


def test_the_access_log_is_on_unless_turned_off(gunicorn, db_path):
    for setting, lines in ((None, 1), ("false", 0)):
        env = {} if setting is None else {"FLASK_ACCESS_LOG": setting}
        server = gunicorn(db_path, workers=1, env=env)
        status, _, headers = http_get(server.url + dm_url(new_user(), new_user()))
        assert status == 200
        server.stop()
        logged = [l for l in server.log().splitlines() if "GET /api/messaging/dm-channel" in l]
        assert len(logged) == lines, server.log()



def slow_closers(port, path, clients, requests_each, hold=3.0):
    """Clients that each send requests with "Connection: close", read the
    status and headers of each answer and close their end `hold` seconds
    later, as urllib's urlopen(url) leaves a connection whose body nobody
    reads. Each request's time, from sending it to having the headers."""
    times, lock = [], threading.Lock()

    def client():
        for _ in range(requests_each):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            began = time.monotonic()
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()  # it now holds the socket
            with lock:
                times.append(time.monotonic() - began)
            threading.Timer(hold, response.close).start()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


@pytest.mark.parametrize("clients", [8, 32])
@pytest.mark.xdist_group("timing")
def test_clients_that_close_late_stall_no_request(gunicorn, db_path, clients, capsys):
    """gunicorn 26+ linger on every connection they close until the client
    closes too, up to 2 s; dm_channels.worker does it without stalling the
    worker's main loop, so no request waits for another client's close."""
    server = gunicorn(db_path, workers=2)
    server.get(dm_url(GOOD_PAIR[0], GOOD_PAIR[1]))
    times = slow_closers(server.port, dm_url(*GOOD_PAIR), clients, requests_each=120 // clients + 1)
    report(capsys, f"{clients} slow-closing clients: {len(times)} requests, slowest "
                   f"{max(times) * 1000:.0f} ms")
    assert max(times) < 0.5


def wrk_max_latency(url, connections, seconds=3):
    """wrk's slowest request, in seconds, for `connections` kept-alive clients."""
    done = subprocess.run(
        ["wrk", "--threads", "2", "--connections", str(connections), "--duration", f"{seconds}s",
         "--timeout", "10s", url],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", done.stdout, re.M)
    assert latency and "Socket errors" not in done.stdout, done.stdout
    return float(latency.group(1)) / {"us": 1e6, "ms": 1e3, "s": 1}[latency.group(2)]


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; .ci/run installs it)"
)
@pytest.mark.xdist_group("timing")
def test_kept_alive_clients_are_not_stalled_by_clients_that_close_late(gunicorn, db_path, capsys):
    """wrk's connections, 4 for each server thread, meanwhile 8 clients that
    close late: no request of either waits 0.5 s."""
    server = gunicorn(db_path, workers=2)
    server.get(dm_url(*GOOD_PAIR))
    closers = []
    thread = threading.Thread(
        target=lambda: closers.extend(slow_closers(server.port, dm_url(*GOOD_PAIR), 8, 40))
    )
    thread.start()
    slowest = wrk_max_latency(server.url + dm_url(*GOOD_PAIR), connections=4 * 2 * 4)
    thread.join()
    report(capsys, f"wrk, 32 connections: slowest {slowest * 1000:.0f} ms; beside it, 8 slow-closing"
                   f" clients: {len(closers)} requests, slowest {max(closers) * 1000:.0f} ms")
    assert slowest < 0.5 and max(closers) < 0.5


def test_a_misspelt_setting_is_warned_of_once_and_the_service_starts(gunicorn, db_path):
    server = gunicorn(db_path, workers=2, env={"FLASK_BUSYTIMEOUT": "2", "DATABASE": "/srv/dm.sqlite3"})
    assert server.get(dm_url(*GOOD_PAIR))[0] == 200
    log = server.log()
    warned = [line.split("[WARNING] ", 1)[1] for line in log.splitlines() if "[WARNING]" in line]
    assert warned.count("dm-channels: FLASK_BUSYTIMEOUT: not a setting; did you mean FLASK_BUSY_TIMEOUT?") == 1, log
    assert warned.count("dm-channels: DATABASE: not read; did you mean FLASK_DATABASE?") == 1, log
    assert not [line for line in warned if "FLASK_DATABASE:" in line or "FLASK_TMPDIR" in line]


# Paths above and under the API's prefix, with doubled slashes, dots, odd
# letter cases and endings; and methods gunicorn passes on to the app.
ODD_PATHS = [
    "/", "//", "///", "/healthz", "//healthz", "///healthz", "/healthz/", "/./healthz",
    "/%2e%2e/healthz", "/openapi.json", "//openapi.json?x=1", "/metrics", "//metrics",
    "/api", "/api/", "//api", "/api/messaging", "/api/messaging/", "/API/messaging/dm-channel",
    "/api/messaging/dm-channel", "/api/messaging/dm-channel/", "/api/messaging//dm-channel",
    f"//api/messaging/dm-channel?userId1={GOOD_PAIR[0]}&userId2={GOOD_PAIR[1]}",
    f"/api//messaging/dm-channel?userId1={GOOD_PAIR[0]}&userId2={GOOD_PAIR[1]}",
    f"/api/messaging/channels/{GOOD_PAIR[0]}/", "/api/messaging/channels//participants",
    "/api/messaging/channels/%00", "/static/app.js", "/favicon.ico", "/a%20b//c",
]
ODD_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"]


@pytest.mark.parametrize("env", [{}, {"FLASK_API_KEY": '"k"', "FLASK_METRICS": "true"}], ids=["defaults", "key and metrics"])
def test_every_answer_on_any_path_is_json(gunicorn, db_path, env):
    """The envelope for errors (with Location on redirects); a path with
    doubled slashes is never served as it is, only redirected to its own
    form. HEAD answers have no body, as ever, and /metrics is Prometheus's."""
    server = gunicorn(db_path, workers=2, env=env)
    port = int(server.url.rsplit(":", 1)[1])
    odd = []
    for path in ODD_PATHS:
        for method in ODD_METHODS:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            seen = (method, path, response.status, response.getheader("Content-Type"), body[:80])
            metrics = path == "/metrics" and response.status == 200  # Prometheus's text format
            if method == "OPTIONS" and response.status == 200 and body == b"":
                continue  # Flask's own answer: Allow, and no body
            if not response.getheader("Content-Type", "").startswith("application/json") and not metrics:
                odd.append(seen)
                continue
            if method == "HEAD" or metrics:
                continue
            answer = json.loads(body) if path != "/openapi.json" or response.status != 200 else {}
            if response.status >= 300:
                assert answer["success"] is False and set(answer["error"]) == {"code", "message", "details"}, seen
            location = response.getheader("Location")
            if 300 <= response.status < 400:
                assert location and location.startswith("/") and "//" not in location, seen
                assert answer["error"]["code"] == "PERMANENT_REDIRECT", seen
            if "//" in path.split("?")[0] and response.status < 300:
                odd.append(seen)  # served on a path that is not its own
    assert odd == []
