import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import settings

# Tests leave nothing in the repository: no example database in .hypothesis/.
settings.register_profile("dm-channels", database=None)
settings.load_profile("dm-channels")

from dm_channels.app import create_app, is_postgres_url

ROOT = Path(__file__).resolve().parent.parent

# The PostgreSQL server the tests make their databases on (as a superuser).
POSTGRES_SERVER = os.environ.get(
    "DM_CHANNELS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)

# The ways the PostgreSQL tests reach the server: directly, or through PgBouncer
# pooling in transaction mode or in session mode.
POSTGRES_ROUTES = ["postgresql", "pgbouncer-transaction", "pgbouncer-session"]


@pytest.fixture
def db_path(tmp_path):
    """A SQLite file: for tests of SQLite itself (PRAGMAs, its write lock)."""
    return str(tmp_path / "dm.sqlite3")


@pytest.fixture(params=["sqlite", *POSTGRES_ROUTES])
def database(request, tmp_path):
    """DATABASE for a test that must hold on both stores: a new SQLite file,
    or a PostgreSQL database with no tables yet (directly or through PgBouncer)."""
    if request.param == "sqlite":
        return str(tmp_path / "dm.sqlite3")
    url = request.getfixturevalue("shared_postgres_database")
    query(url, "DROP TABLE IF EXISTS dm_channel, dm_schema")
    return route_to(request, request.param, url)


@pytest.fixture
def store_settings():
    """Keyword arguments for the stores a test makes itself (open_store,
    PostgresStore) that its DATABASE needs: the database fixtures fill it."""
    return {}


@pytest.fixture
def make_app(database):
    """make_app(**settings): create_app on the test's DATABASE; every store
    it made is closed at the end."""
    apps = []

    def make(**settings):
        apps.append(create_app({"TESTING": True, "DATABASE": database, **settings}))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["dm_channels"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def query(database, sql, params=()):
    """Run one SQL statement on DATABASE directly (not through the store, nor
    PgBouncer), in its own transaction; return its rows."""
    if is_postgres_url(database):
        with postgres(database) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    with closing(sqlite3.connect(database)) as conn, conn:
        return conn.execute(sql, params).fetchall()


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


def report(capsys, line):
    """Print a test's figures, also without -s."""
    with capsys.disabled():
        print(f"\n  [{line}]", end="")


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

    def log_line(self, marker, timeout=5):
        """The first line of the log that holds `marker`, such as a request's
        access line (written just after its answer is sent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.log().splitlines() if marker in line]
            if lines:
                return lines[0]
            time.sleep(0.05)
        raise AssertionError(f"no line with {marker} in the log:\n{self.log()}")

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


# -- PostgreSQL: the real server, and databases of the tests' own --------------------


def postgres(url=POSTGRES_SERVER):
    """A new autocommit connection to the server itself, even for a URL through
    PgBouncer (closed by `with`); lock waits are bounded so that a test can
    never hang on one."""
    import psycopg

    return psycopg.connect(
        direct(url), autocommit=True, connect_timeout=5, options="-c lock_timeout=10s"
    )


def direct(url):
    """The same database as `url`, on the tests' server rather than through PgBouncer."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    server = urlsplit(POSTGRES_SERVER).netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{userinfo}@{server}" if userinfo else server).geturl()


def postgres_url(name):
    return urlsplit(POSTGRES_SERVER)._replace(path="/" + name).geturl()


def unavailable(reason, required_by="DM_CHANNELS_REQUIRE_POSTGRES"):
    """Skip the test for want of something the machine lacks; fail it instead
    when the variable `required_by` is 1, as .ci/run sets it."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{reason} (and {required_by}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """The server's URL if it answers. If not, PostgreSQL tests are skipped,
    or fail when DM_CHANNELS_REQUIRE_POSTGRES=1 (as in CI)."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed: pip install -r requirements-postgres.txt")
    try:
        postgres().close()
    except psycopg.Error as e:
        where = urlsplit(POSTGRES_SERVER).netloc.rpartition("@")[2]
        unavailable(f"PostgreSQL not reachable at {where}: {e}".strip())
    return POSTGRES_SERVER


def create_postgres_database():
    # A name of its own: other test runs may share the server.
    name = f"dm_test_{uuid.uuid4().hex[:16]}"
    with postgres() as conn:
        conn.execute(f"CREATE DATABASE {name}")
        # Sessions start in a time zone other than UTC (+05:45), and the store
        # sets none: every test shows that createdAt does not depend on it.
        conn.execute(f"ALTER DATABASE {name} SET TimeZone = 'Asia/Kathmandu'")
    return postgres_url(name)


def drop_postgres_database(url):
    with postgres() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {urlsplit(url).path[1:]} WITH (FORCE)")


@pytest.fixture(scope="session")
def shared_postgres_database(postgres_server):
    """One database for the session; the `database` fixture empties it per test."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def new_postgres_database(request, postgres_server):
    """new_postgres_database(route="postgresql"): a new, empty PostgreSQL
    database for this test alone, dropped at its end: its URL by that route."""
    made = []

    def make(route="postgresql"):
        made.append(create_postgres_database())
        return route_to(request, route, made[-1])

    yield make
    for url in made:
        drop_postgres_database(url)


@pytest.fixture(params=POSTGRES_ROUTES)
def postgres_database(request, new_postgres_database):
    """A new, empty PostgreSQL database for this test alone: its URL, directly
    or through PgBouncer (a test runs once by each route)."""
    return new_postgres_database(request.param)


# -- PgBouncer: real ones, in front of the same server -------------------------------

# Debian's package puts it in /usr/sbin, often not on a user's PATH.
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

# What docs/postgresql.md recommends, with the tests' own pool sizes and with
# query_wait_timeout at the 1 s of PG_POOL_TIMEOUT that the outage tests use.
PGBOUNCER_INI = """\
[databases]
* = {server}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
admin_users = {user}
pool_mode = {mode}
default_pool_size = {pool_size}
max_client_conn = 500
query_wait_timeout = 1
server_login_retry = 1
"""

# Transaction mode: fewer server sessions than clients, the point of it. In
# session mode each client holds a server session while it is connected, and
# the store keeps its connections: there the pool must be as large as the
# largest test's clients (4 gunicorn workers x PG_POOL_MAX_SIZE 4).
PGBOUNCER_POOL_SIZES = {"transaction": 4, "session": 20}


class PgBouncer:
    """A real PgBouncer pooling in `mode`, in front of the tests' server (any
    database, as the tests' role), with its config and log in `folder`."""

    def __init__(self, folder, mode, pool_size):
        self.mode = mode
        self.port = free_port()
        self.log_path = folder / "pgbouncer.log"
        server = urlsplit(POSTGRES_SERVER)
        config = folder / "pgbouncer.ini"
        (folder / "users.txt").write_text(f'"{server.username}" ""\n')
        password = f" password={server.password}" if server.password else ""
        config.write_text(PGBOUNCER_INI.format(
            server=f"host={server.hostname} port={server.port or 5432}{password}",
            port=self.port, users=folder / "users.txt", user=server.username,
            mode=mode, pool_size=pool_size,
        ))
        # It refuses to run as root: it reads its config, then becomes nobody.
        self.command = [PGBOUNCER, str(config)] + (["-u", "nobody"] if os.geteuid() == 0 else [])
        self.start()

    def start(self, timeout=10):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log()}")
                time.sleep(0.02)

    def stop(self, signum=signal.SIGTERM):
        """SIGTERM: its immediate shutdown; SIGKILL: a crash."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.wait(10)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def url(self, url):
        """The database of `url` (on the tests' server), through this PgBouncer."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        return parts._replace(netloc=f"{userinfo}@127.0.0.1:{self.port}").geturl()


def through_pgbouncer(url):
    return urlsplit(url).port != urlsplit(direct(url)).port


def pgbouncer_console(url, command):
    """Rows of a PgBouncer console command (SHOW CLIENTS ...) on the PgBouncer of `url`."""
    import psycopg

    with psycopg.connect(
        urlsplit(url)._replace(path="/pgbouncer").geturl(), autocommit=True, connect_timeout=5
    ) as conn:
        cursor = conn.execute(command)
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def require_pgbouncer():
    """Where there is no pgbouncer, skip the test, or fail it when
    DM_CHANNELS_REQUIRE_POSTGRES=1 (as in CI)."""
    if not os.access(PGBOUNCER, os.X_OK):
        unavailable("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")


@pytest.fixture(scope="session")
def pgbouncers(postgres_server, tmp_path_factory):
    """pgbouncers(mode): this run's PgBouncer pooling in `mode` ("transaction"
    or "session"), started on first use."""
    require_pgbouncer()
    started = {}

    def get(mode):
        if mode not in started:
            folder = tmp_path_factory.mktemp(f"pgbouncer-{mode}")
            started[mode] = PgBouncer(folder, mode, PGBOUNCER_POOL_SIZES[mode])
        return started[mode]

    yield get
    for pgbouncer in started.values():
        pgbouncer.stop()


@pytest.fixture
def new_pgbouncer(postgres_server, tmp_path):
    """new_pgbouncer(mode): a PgBouncer of this test's own (one it may stop
    and start), stopped at the end."""
    require_pgbouncer()
    started = []

    def start(mode):
        folder = tmp_path / f"pgbouncer-{len(started)}"
        folder.mkdir()
        started.append(PgBouncer(folder, mode, PGBOUNCER_POOL_SIZES[mode]))
        return started[-1]

    yield start
    for pgbouncer in started:
        pgbouncer.stop(signal.SIGKILL)


def route_to(request, route, url):
    """`url`, a database on the tests' server, as reached by `route`. Through a
    pooler in transaction mode the store must be told (PG_TRANSACTION_POOLING):
    for the stores the test makes (store_settings), the apps and gunicorn servers
    (FLASK_PG_TRANSACTION_POOLING in the environment)."""
    if route == "postgresql":
        return url
    mode = route.removeprefix("pgbouncer-")
    if mode == "transaction":
        request.getfixturevalue("store_settings")["transaction_pooling"] = True
        request.getfixturevalue("monkeypatch").setenv("FLASK_PG_TRANSACTION_POOLING", "true")
    return request.getfixturevalue("pgbouncers")(mode).url(url)
