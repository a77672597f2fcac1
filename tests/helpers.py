"""What the tests share: paths, clients of the real servers they start
(gunicorn, PgBouncer, nginx), databases of their own, and assertions. Fixtures are
in conftest.py, which pytest loads; tests import these from here."""

import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.run import free_port  # noqa: F401 (the tests' servers bind ports as the benchmark's do)
from dm_channels.app import is_postgres_url

ROOT = Path(__file__).resolve().parent.parent

# The PostgreSQL server the tests make their databases on (as a superuser).
POSTGRES_SERVER = os.environ.get(
    "DM_CHANNELS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)

# The ways the PostgreSQL tests reach the server: directly, or through PgBouncer
# pooling in transaction mode or in session mode.
POSTGRES_ROUTES = ["postgresql", "pgbouncer-transaction", "pgbouncer-session"]
# Where processes crash or the database goes away: PgBouncer's session pooling gives
# each client a server session of its own, as a direct connection does.
OUTAGE_ROUTES = ["postgresql", "pgbouncer-transaction"]


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


def outputs_at_once(processes, timeout):
    """The output of each of these Popen processes (text, stdout=PIPE), once all have ended;
    all of them killed if one runs over or a test stops early."""
    try:
        return [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()


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


# What a clone holds besides the tracked files, when there is no git to ask.
UNTRACKED = (".git", ".venv", "build", "*.egg-info", "instance", "__pycache__", ".pytest_cache",
             ".hypothesis", "*.sqlite3*", ".schemathesis", "node_modules")


def copy_checkout(dest):
    """Copy the working tree to dest as a clone of it would hold it: the files
    git tracks or would track (uncommitted changes included), nothing it
    ignores (no .venv, instance/, egg-info, caches)."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")
        for name in filter(None, listed):
            if (ROOT / name).is_file():  # not a file deleted but not yet committed
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*UNTRACKED), dirs_exist_ok=True)
    return dest


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_blocks(path):
    return re.findall(r"^```sh\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def venv_commands(path):
    """Every command of a document that uses the venv's programs (.venv/bin/):
    the lines of its sh blocks (comments cut), then its inline `code`."""
    found = []
    for block in shell_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if ".venv/bin/" in line and not line.startswith("#"):
                found.append(line)
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return found + [c.strip() for c in re.findall(r"`([^`\n]*\.venv/bin/[^`\n]*)`", prose)]


def documented(name, command):
    """`command`, once checked to be one that README.md or docs/<name> shows."""
    path = ROOT / name
    assert command in venv_commands(path), f"{name} no longer shows: {command}"
    return command


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
                # A worker forked an instant before a stop may miss the master's SIGTERM (its
                # handlers are not set yet) and run until graceful_timeout: keep that short
                # of stop()'s wait, so the master always ends by itself.
                "--graceful-timeout", "10",
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
        if not self._log.closed:  # closed once stopped
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

    def worker_pids(self):
        """The pids of the master's children: its workers."""
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(self.process.pid):
                pids.append(int(entry))
        return pids

    def send_signal(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, signum=signal.SIGTERM, timeout=30):
        if signum == signal.SIGKILL:
            self.send_signal(signum)
        else:
            # To the master alone, as an operator's kill does: sent to the whole group, it also
            # reaches workers the master forks meanwhile, before their own handlers are set,
            # and those then run until gunicorn's graceful_timeout.
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.process.wait()
        if signum == signal.SIGKILL:
            # Workers are in the same group and died with the master; make sure.
            self.send_signal(signal.SIGKILL)
        self._log.close()


# -- SQLite's write lock, held by another process ------------------------------------

HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextmanager
def write_lock_held_by_another_process(db_path):
    """SQLite's write lock on db_path, held by another process (BEGIN
    IMMEDIATE) until release(holder) or the end of the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, db_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        release(holder)
        holder.stdout.close()
        holder.stdin.close()


def release(holder):
    if holder.poll() is None:
        try:
            holder.stdin.write("\n")
            holder.stdin.flush()
        except BrokenPipeError:
            pass  # released already, and exiting
    holder.wait(10)


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


def assert_envelope(response, status, code):
    assert response.status_code == status
    assert response.content_type == "application/json"
    body = response.json
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"].get("details", ""), str)
    return body["error"]


GOOD = "3c90c3cc-0d44-4b50-8888-8dd25736052a"


BAD_IDS = {
    "braces": "{" + GOOD + "}",
    "urn": "urn:uuid:" + GOOD,
    "no hyphens": GOOD.replace("-", ""),
    "leading space": " " + GOOD,
    "trailing space": GOOD + " ",
    "trailing newline": GOOD + "\n",
    "empty": "",
    "too short": GOOD[:-1],
    "too long": GOOD + "a",
    "not hex": GOOD[:-1] + "g",
    "hyphens moved": "3c90c3cc0-d44-4b50-8888-8dd25736052a",
    "sql": "1' OR '1'='1",
    "non-ascii digit": GOOD[:-1] + "\u0663",
}


def fire_at_once(rounds):
    """Send each round's requests, (server, user1, user2), all at once: one
    thread and one already-open connection each, released together by a
    barrier. Rounds go one after another. Returns every (status, body)."""
    answers = []

    def send(barrier, server, user1, user2):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.connect()
        barrier.wait()
        conn.request("GET", dm_url(user1, user2))
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read())))
        conn.close()

    for requests in rounds:
        barrier = threading.Barrier(len(requests))
        threads = [threading.Thread(target=send, args=(barrier, *request)) for request in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return answers


def first_request_rounds(pairs, servers, per_pair=16):
    """One round a pair: per_pair first requests in mixed order and case,
    spread over the servers."""
    return [
        [(servers[i % len(servers)], *spellings(a, b)[i % 6]) for i in range(per_pair)]
        for a, b in pairs
    ]


def assert_one_channel_per_pair(answers, pairs, per_pair=16):
    assert [status for status, _ in answers] == [200] * len(pairs) * per_pair
    by_pair = {}
    for _, body in answers:
        meta = body["data"]["channel"]["metadata"]
        by_pair.setdefault((meta["user1"], meta["user2"]), []).append(body["data"])
    assert set(by_pair) == {tuple(sorted(pair)) for pair in pairs}
    for answers_for_pair in by_pair.values():
        assert len(answers_for_pair) == per_pair
        assert len({data["channel"]["id"] for data in answers_for_pair}) == 1
        assert len({data["channel"]["createdAt"] for data in answers_for_pair}) == 1
        assert sum(data["created"] for data in answers_for_pair) == 1


def spellings(a, b):
    """The same pair as clients may send it: either order, either case."""
    return [(a, b), (b, a), (a.upper(), b), (b, a.upper()), (a, b.upper()), (b.upper(), a.upper())]


# -- nginx in front, as deploy/nginx.conf.template configures it -----------------

TEMPLATE = ROOT / "deploy" / "nginx.conf.template"

# Stands in for the distribution's nginx.conf, whose http block includes the
# rendered template; every path is relative to the server's own prefix.
MAIN_CONFIG = """\
worker_processes 1;
daemon off;
pid nginx.pid;
error_log error.log info;
events { worker_connections 1024; }
http {
    access_log access.log;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    include dm-channels.conf;
}
"""


def program(name):
    """The path of an installed program; without it, skip (or fail, in CI)."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if path is None:
        unavailable(
            f"{name} is not installed (apt-get install nginx gettext-base openssl;"
            " .ci/run installs them)",
            required_by="DM_CHANNELS_REQUIRE_NGINX",
        )
    return path


def render(listen, upstream, changes=()):
    """The template rendered as docs/deployment.md says, with envsubst. A
    test's variant first replaces each `old` of `changes` with its `new`, in
    the template's own text, where each must appear exactly once."""
    template = TEMPLATE.read_text()
    for old, new in changes:
        assert template.count(old) == 1, f"the template has no single {old!r}"
        template = template.replace(old, new)
    return subprocess.run(
        [program("envsubst"), "${DM_LISTEN} ${DM_UPSTREAM}"],
        input=template,
        env={"DM_LISTEN": listen, "DM_UPSTREAM": upstream},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


class Nginx:
    """nginx with the rendered template in front of 127.0.0.1:upstream_port,
    listening on 127.0.0.1. Run as nobody when the tests run as root: it
    writes only in its prefix, a temporary folder of its own."""

    def __init__(self, upstream_port, log_dir, changes=(), files=None):
        executable = program("nginx")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        config = render(f"127.0.0.1:{self.port}", f"127.0.0.1:{upstream_port}", changes)
        self.prefix = Path(tempfile.mkdtemp(prefix="dm-nginx-"))
        (self.prefix / "nginx.conf").write_text(MAIN_CONFIG)
        (self.prefix / "dm-channels.conf").write_text(config)
        for name, content in (files or {}).items():  # e.g. a certificate
            (self.prefix / name).write_bytes(content)
        user = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.prefix, nobody.pw_uid, nobody.pw_gid)
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        log_dir.mkdir()
        self._output = open(log_dir / "nginx.out", "wb")
        self.process = subprocess.Popen(
            [executable, "-p", f"{self.prefix}/", "-c", "nginx.conf", "-e", "error.log"],
            stdout=self._output,
            stderr=subprocess.STDOUT,
            **user,
        )

    def wait_ready(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited early:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen in {timeout}s:\n{self.log()}")

    def log(self):
        self._output.flush()
        logs = [self.log_dir / "nginx.out", self.prefix / "error.log"]
        return "".join(path.read_text(errors="replace") for path in logs if path.exists())

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self._output.close()
        for name in ("error.log", "access.log"):  # kept with the test's other files
            if (self.prefix / name).exists():
                shutil.copy(self.prefix / name, self.log_dir / name)
        shutil.rmtree(self.prefix)
