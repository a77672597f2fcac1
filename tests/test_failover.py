"""A PostgreSQL primary's failover under load: two real clusters in synchronous
replication, the service on libpq's multi-host URL, the primary killed and the
standby promoted (docs/postgresql.md, "A primary and a standby")."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from helpers import dm_url, free_port, new_user, report, unavailable

# The newest PostgreSQL whose server binaries the machine has (Debian's layout).
BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
CLIENTS = 8
LIMIT = 15.0  # seconds: the longest any answer may take, and recovery after the promotion


class Cluster:
    """A PostgreSQL cluster of the test's own in folder/name, on a free loopback
    port, run as the postgres OS user when the tests run as root (PostgreSQL
    refuses root)."""

    def __init__(self, folder, name):
        self.folder, self.data, self.port = folder, os.path.join(folder, name), free_port()

    def run(self, program, *args):
        command = [os.path.join(BINARIES[-1], program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, cwd=self.folder, check=True, capture_output=True, timeout=60)

    def configure(self, **settings):
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())

    def start(self):
        self.run("pg_ctl", "-D", self.data, "-l", self.data + ".log", "-w", "start")

    def url(self, dbname="db"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"


def require_postgres_binaries():
    """Skip (or fail, with DM_CHANNELS_REQUIRE_POSTGRES=1) where the clusters cannot be made."""
    if not BINARIES or not all(os.access(os.path.join(BINARIES[-1], p), os.X_OK)
                               for p in ("initdb", "pg_ctl", "pg_basebackup")):
        unavailable("PostgreSQL's server binaries are not in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("no postgres OS user to run PostgreSQL's binaries as (they refuse root)")
        if shutil.which("runuser") is None:
            unavailable("runuser is not installed (util-linux)")


@pytest.fixture
def primary_and_standby():
    """A primary whose commits wait for the standby's flush, and that standby."""
    require_postgres_binaries()
    import psycopg

    folder = tempfile.mkdtemp(prefix="dm-failover-")  # not tmp_path: the postgres user must reach it
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        os.chown(folder, postgres.pw_uid, postgres.pw_gid)
    primary, standby = Cluster(folder, "primary"), Cluster(folder, "standby")
    try:
        primary.run("initdb", "-D", primary.data, "-U", "postgres", "--auth=trust", "--no-sync")
        primary.configure(port=primary.port, listen_addresses="127.0.0.1", unix_socket_directories=folder,
                          synchronous_commit="on")
        primary.start()
        with psycopg.connect(primary.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE db")
        standby.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                    "-D", standby.data, "-R", "-X", "stream", "-c", "fast", "--no-sync")
        standby.configure(port=standby.port)
        standby.start()
        # Only now, with a standby to answer: until then every commit would wait.
        # (The promoted standby has none to wait for: it keeps the setting's default, '')
        with psycopg.connect(primary.url("postgres"), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while conn.execute("SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone() is None:
                assert time.monotonic() < deadline, "the standby never became synchronous"
                time.sleep(0.1)
        yield primary, standby
    finally:
        for cluster in (primary, standby):
            if os.path.exists(os.path.join(cluster.data, "postmaster.pid")):
                cluster.run("pg_ctl", "-D", cluster.data, "stop", "-m", "immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.xdist_group("timing")
def test_a_promoted_standby_serves_every_acknowledged_channel(primary_and_standby, gunicorn, capsys):
    import psycopg

    primary, standby = primary_and_standby
    # The standby first: which host is the primary must not depend on the order.
    url = (f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/db"
           "?target_session_attrs=read-write")
    server = gunicorn(url, workers=2)
    answers = []  # (started, finished, status, body, pair)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            pair = (new_user(), new_user())
            started = time.monotonic()
            try:
                status, body, _ = server.get(dm_url(*pair), timeout=LIMIT)
            except OSError as e:  # a timeout included: a hang
                status, body = f"{type(e).__name__}: {e}", None
            answers.append((started, time.monotonic(), status, body, pair))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        primary.run("pg_ctl", "-D", primary.data, "stop", "-m", "immediate")
        killed = time.monotonic()  # what starts from now on cannot reach the old primary
        time.sleep(1)
        promoted = time.monotonic()
        standby.run("pg_ctl", "-D", standby.data, "-w", "promote")
        deadline = promoted + LIMIT
        while time.monotonic() < deadline and not any(a[0] > killed and a[2] == 200 for a in answers):
            time.sleep(0.05)
        time.sleep(2)  # creates under load on the new primary
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert all(a[2] == 200 for a in answers if a[1] < killed - 1), "creates failed before the kill"
    for started, finished, status, body, _ in answers:
        assert finished - started < LIMIT, f"an answer took {finished - started:.1f} s"
        assert status == 200 or (
            isinstance(status, int) and status >= 500 and body and body["success"] is False
            and body["error"]["code"]
        ), f"not a 200 nor a JSON 5xx: {status} {body}"
    back = min((a[1] for a in answers if a[0] > killed and a[2] == 200), default=None)
    failed = sum(a[2] != 200 for a in answers)
    assert back is not None and back - promoted < LIMIT, f"no create answered within {LIMIT} s of the promotion"
    acknowledged = {tuple(sorted(a[4])): a[3]["data"]["channel"]["id"] for a in answers if a[2] == 200}
    with psycopg.connect(standby.url(), autocommit=True) as conn:
        rows = conn.execute("SELECT user_low::text, user_high::text, id::text FROM dm_channel").fetchall()
    stored = {}
    for low, high, channel_id in rows:
        stored.setdefault((low, high), []).append(channel_id)
    lost = [pair for pair, channel_id in acknowledged.items() if stored.get(pair) != [channel_id]]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged channels not on the new primary as answered"
    assert all(len(ids) == 1 for ids in stored.values())
    report(capsys, f"failover: creates answered again {back - promoted:.1f} s after the promotion"
                   f" ({back - killed:.1f} s after the kill); {failed} of {len(answers)} answers a 5xx;"
                   f" 0 of {len(acknowledged)} acknowledged channels lost")
