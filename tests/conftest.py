import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from app import create_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "dm.sqlite3")


@pytest.fixture
def app(db_path):
    app = create_app({"TESTING": True, "DATABASE": db_path})
    yield app
    app.extensions["dm_channels"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def new_user():
    return str(uuid.uuid4())


def dm_url(user1, user2):
    return f"/api/messaging/dm-channel?userId1={user1}&userId2={user2}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=30, headers=None):
    """GET url; return (status, parsed JSON body or None, headers)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, status, got = response.read(), response.status, response.headers
    except urllib.error.HTTPError as e:
        body, status, got = e.read(), e.code, e.headers
    try:
        return status, json.loads(body), got
    except ValueError:
        return status, None, got


class Gunicorn:
    """A real gunicorn serving create_app() from the repository root, in its
    own process group so that a test can SIGTERM or SIGKILL all of it."""

    def __init__(self, env, workers, log_path, extra_args=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn",
                "--config", str(ROOT / "gunicorn.conf.py"),
                "--bind", f"127.0.0.1:{self.port}",
                "--workers", str(workers),
                *extra_args,
                "app:create_app()",
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log()}")
            try:
                # A worker answers, not just the master's listening socket.
                status, _, _ = http_get(self.url + "/readiness-probe", timeout=5)  # 404 from a worker
                if status == 404:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer in {timeout}s:\n{self.log()}")

    def get(self, path, **kwargs):
        return http_get(self.url + path, **kwargs)

    def log(self):
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def send_signal(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, signum=signal.SIGTERM, timeout=30):
        self.send_signal(signum)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.process.wait()
        if signum == signal.SIGKILL:
            # Workers are in the same group and died with the master; make sure.
            self.send_signal(signal.SIGKILL)
        self._log.close()


@pytest.fixture
def gunicorn(tmp_path):
    """Start gunicorn servers: gunicorn(db_path, workers=4, env={...}).

    Every server still running at the end of the test is killed.
    """
    servers = []

    def start(database, workers=4, env=None, extra_args=(), wait=True):
        server = Gunicorn(
            {"FLASK_DATABASE": str(database), **(env or {})},
            workers,
            tmp_path / f"gunicorn-{len(servers)}.log",
            extra_args,
        )
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
