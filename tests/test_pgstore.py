"""PostgreSQL's own: pool, schema, locks, faults, several hosts, moving from SQLite.

(The store and HTTP contract tests run on PostgreSQL too, through the
`database` fixture's "postgresql" case.)
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import (
    OUTAGE_ROUTES,
    POSTGRES_SERVER,
    ROOT,
    dm_url,
    free_port,
    new_user,
    pgbouncer_console,
    postgres,
    postgres_url,
    query,
    report,
    through_pgbouncer,
)
from dm_channels.app import open_store
from dm_channels.store import Store, StoreError
from helpers import assert_one_channel_per_pair, fire_at_once, first_request_rounds

pgstore = pytest.importorskip("dm_channels.pgstore", reason="psycopg is not installed")
PostgresStore = pgstore.PostgresStore


@pytest.fixture
def stores(store_settings):
    """make(url, **settings): PostgresStores (with what the test's database
    needs, see store_settings), all closed at the end."""
    made = []

    def make(url, **settings):
        made.append(PostgresStore(url, **{**store_settings, **settings}))
        return made[-1]

    yield make
    for store in made:
        store.close()


def sessions(url):
    """How many sessions the service has open on the database of `url`:
    through PgBouncer, its connections to PgBouncer."""
    name = url.rsplit("/", 1)[1]
    if through_pgbouncer(url):
        clients = pgbouncer_console(url, "SHOW CLIENTS")
        return sum(c["database"] == name and c["application_name"] == "dm-channels" for c in clients)
    return query(
        url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = 'dm-channels'",
        (name,),
    )[0][0]


def wait_until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- choosing the store, settings ----------------------------------------------------


def test_a_postgresql_url_selects_the_postgres_store(tmp_path):
    for url in ["postgresql://dm@db.internal/dm", "postgres://dm:secret@db.internal:6432/dm"]:
        store = open_store(url, synchronous="NORMAL", pool_max_size=8)
        assert isinstance(store, PostgresStore) and store.pool_max_size == 8
        assert "secret" not in store.path
    assert isinstance(open_store(tmp_path / "dm.sqlite3", pool_max_size=8), Store)


def test_pool_settings_come_from_flask_environment_variables(monkeypatch):
    from dm_channels.app import create_app

    # No server at db.internal: skip the start-up check that would say so.
    monkeypatch.setattr(PostgresStore, "check_writable", lambda self: None)
    monkeypatch.setenv("FLASK_DATABASE", "postgresql://dm@db.internal/dm")
    monkeypatch.setenv("FLASK_PG_POOL_MIN_SIZE", "2")
    monkeypatch.setenv("FLASK_PG_POOL_MAX_SIZE", "6")
    monkeypatch.setenv("FLASK_PG_POOL_TIMEOUT", "1.5")
    monkeypatch.setenv("FLASK_PG_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("FLASK_BUSY_TIMEOUT", "2.5")
    monkeypatch.setenv("FLASK_PG_TRANSACTION_POOLING", "true")
    store = create_app().extensions["dm_channels"].store
    assert isinstance(store, PostgresStore)
    assert (store.pool_min_size, store.pool_max_size) == (2, 6)
    assert (store.pool_timeout, store.connect_timeout, store.busy_timeout) == (1.5, 3, 2.5)
    assert store.transaction_pooling is True


# A multi-host URL libpq would trip on only when it tries that host: the first
# host is the tests' server, which answers.
SERVER = urlsplit(POSTGRES_SERVER).netloc.rpartition("@")[2]
BAD_URLS = {
    "an empty host": (f"postgresql://postgres:Hunter2Secret@{SERVER},,127.0.0.1:1/postgres", "has an empty host"),
    "a port that is no number": (f"postgresql://postgres:Hunter2Secret@{SERVER},127.0.0.1:x/postgres", "not all numbers"),
    "a port of other digits": (f"postgresql://postgres:Hunter2Secret@{SERVER},127.0.0.1:5\u00b2/postgres",
                               "not all numbers"),
    "ports that do not pair": (
        "postgresql://postgres:Hunter2Secret@127.0.0.1,127.0.0.1/postgres?port=5432,5433,5434", "do not pair"),
    "an unknown target_session_attrs": (
        f"postgresql://postgres:Hunter2Secret@{SERVER}/postgres?target_session_attrs=primary-ish",
        "target_session_attrs must be one of any, read-write, read-only, primary, standby, prefer-standby",
    ),
}
# Every spelling of a password that once reached a message.
PASSWORDS = {
    "in the user info": "postgresql://postgres:Hunter2Secret@127.0.0.1:1/postgres",
    "as a parameter": "postgresql://postgres@127.0.0.1:1/postgres?password=Hunter2Secret",
    "badly percent-encoded": "postgresql://postgres@127.0.0.1:1/postgres?password=Hunter2%zzSecret",
    "a percent-encoded key": "postgresql://postgres@127.0.0.1:1/postgres?pass%77ord=Hunter2Secret",
    "holding an @": "postgresql://postgres:Hunter2@Secret@127.0.0.1:1/postgres",
    "holding a /": "postgresql://postgres:Hunter2/Secret@127.0.0.1:1/postgres",
    "holding a / after digits": "postgresql://postgres:5432/Hunter2Secret@127.0.0.1/postgres",
    "holding a ? and unreadable": "postgresql://postgres:Hunter2?Secret%zz@127.0.0.1:1/postgres",
}


@pytest.mark.parametrize("case", BAD_URLS)
def test_a_malformed_multi_host_url_is_refused_at_start_in_one_line(postgres_server, case):
    from dm_channels.app import create_app

    url, says = BAD_URLS[case]
    with pytest.raises(ValueError) as refused:  # one "Error:" line under a flask command
        create_app({"TESTING": True, "DATABASE": url})
    assert says in str(refused.value) and "\n" not in str(refused.value)
    assert "Hunter2" not in str(refused.value) and "Secret" not in str(refused.value)


@pytest.mark.parametrize("case", PASSWORDS)
def test_no_spelling_of_the_password_reaches_a_message(case):
    from dm_channels.app import create_app
    from dm_channels.settings import shown_database

    url = PASSWORDS[case]
    with pytest.raises(ValueError) as refused:  # nothing listens on port 1
        create_app({"TESTING": True, "DATABASE": url})
    assert "\n" not in str(refused.value)  # one line
    for message in (str(refused.value), shown_database(url), PostgresStore(url).path):
        assert "Hunter2" not in message and "Secret" not in message, message


@pytest.mark.parametrize(
    "setting, value",
    [
        ("PG_POOL_MIN_SIZE", -1),
        ("PG_POOL_MIN_SIZE", 5),  # more than the max, 4
        ("PG_POOL_MAX_SIZE", 0),
        ("PG_POOL_MAX_SIZE", "many"),
        ("PG_POOL_TIMEOUT", 0),
        ("PG_CONNECT_TIMEOUT", 2.5),
        ("PG_TRANSACTION_POOLING", "yes"),
    ],
)
def test_a_bad_pool_setting_is_refused_at_start(setting, value):
    from dm_channels.app import create_app

    with pytest.raises(ValueError, match=setting):
        create_app({"TESTING": True, "DATABASE": "postgresql://dm@db.internal/dm", setting: value})


# -- pool and schema -------------------------------------------------------------------


def test_nothing_stays_connected_before_first_use(postgres_database, stores):
    """create_app's start-up check closes its one connection; the pool opens
    none until the first request (so a server may fork after create_app)."""
    from dm_channels.app import create_app

    app = create_app({"TESTING": True, "DATABASE": postgres_database})
    store = stores(postgres_database)
    assert sessions(postgres_database) == 0
    store.get_or_create_dm(new_user(), new_user())
    assert sessions(postgres_database) > 0
    app.extensions["dm_channels"].store.close()


def test_schema_is_created_on_first_use_with_its_version(postgres_database, stores):
    stores(postgres_database).ping()
    assert query(postgres_database, "SELECT version FROM dm_schema") == [(pgstore.SCHEMA_VERSION,)]


def test_many_workers_starting_at_once_create_the_schema_once(postgres_database, stores):
    workers = [stores(postgres_database) for _ in range(8)]  # as if 8 processes
    barrier = threading.Barrier(len(workers))
    errors = []

    def first_request(store):
        barrier.wait()
        try:
            store.get_or_create_dm(new_user(), new_user())
        except StoreError as e:
            errors.append(e)

    threads = [threading.Thread(target=first_request, args=(s,)) for s in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert query(postgres_database, "SELECT version FROM dm_schema") == [(1,)]
    assert query(postgres_database, "SELECT count(*) FROM dm_channel") == [(8,)]


def test_a_different_schema_version_is_refused(postgres_database, stores):
    stores(postgres_database).init_schema()
    query(postgres_database, "UPDATE dm_schema SET version = 2")
    with pytest.raises(StoreError, match="schema version 2"):
        stores(postgres_database).get_or_create_dm(new_user(), new_user())


def test_init_db_command_creates_the_schema(postgres_database):
    from dm_channels.app import create_app

    url = postgres_database.replace("postgres@", "postgres:not-shown@")  # trust auth ignores it
    app = create_app({"TESTING": True, "DATABASE": url})
    result = app.test_cli_runner().invoke(args=["init-db"])
    app.extensions["dm_channels"].store.close()
    assert result.exit_code == 0, result.output
    assert f"Initialized {postgres_database} (schema version 1)." in result.output
    assert "not-shown" not in result.output
    assert query(postgres_database, "SELECT count(*) FROM dm_channel") == [(0,)]


# The pool's threads make Python 3.12+ warn that fork() may deadlock; we fork on purpose.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_its_own_pool_and_leaves_the_parents_alone(
    postgres_database, stores
):
    store = stores(postgres_database, pool_min_size=1, pool_max_size=1)
    a, b = new_user(), new_user()
    channel, _ = store.get_or_create_dm(a, b)
    backend = backend_pid(store)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer with its own session, then vanish
        try:
            ok = store.get_or_create_dm(b, a) == (channel, False)
            ok = ok and backend_pid(store) != backend
            os.write(write, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok"
    os.close(read)
    # The parent's one session is the very same, not a replacement.
    assert backend_pid(store) == backend
    assert store.get_or_create_dm(a, b) == (channel, False)


def backend_pid(store):
    """Which session the store's connection is, once a query went through it:
    its server process (through PgBouncer, the key PgBouncer gave the client,
    as a transaction may run on any server process)."""

    def ask(conn):
        conn.execute("SELECT 1")  # the session answers
        return conn.info.backend_pid

    # Which session a pooled connection is shows nowhere else: asked on one
    # the store's pool lends.
    return store._run(ask)


# -- locks: readers never queue behind writers ---------------------------------------------


def lock_out_writers(url):
    """A session that holds dm_channel in EXCLUSIVE mode: writers wait, readers don't."""
    holder = postgres(url)
    # If the store fails to time out, the test fails rather than waits for ever.
    holder.execute("SET idle_in_transaction_session_timeout = '5s'")
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE dm_channel IN EXCLUSIVE MODE")
    return holder


@pytest.mark.xdist_group("timing")
def test_existing_channel_is_read_while_writers_are_locked_out(postgres_database, stores):
    store = stores(postgres_database, busy_timeout=0.5)
    a, b = new_user(), new_user()
    channel, _ = store.get_or_create_dm(a, b)
    holder = lock_out_writers(postgres_database)
    try:
        started = time.monotonic()
        assert store.get_or_create_dm(b, a) == (channel, False)
        assert time.monotonic() - started < 0.4  # it did not wait for the lock
    finally:
        holder.close()


def end_server_sessions(url):
    """End every server session on the database of `url` (but this one), and
    wait until they are gone. Through PgBouncer its clients stay connected, in
    transaction mode, and their next transactions run on new server sessions."""
    others = " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    query(url, "SELECT pg_terminate_backend(pid)" + others)
    wait_until(lambda: query(url, "SELECT count(*)" + others) == [(0,)])


@pytest.mark.parametrize("server_sessions", ["kept", "ended"])
@pytest.mark.xdist_group("timing")
def test_create_fails_after_the_busy_timeout_then_recovers(
    postgres_database, stores, server_sessions
):
    """With its server sessions ended first, the create runs on one the store
    never set up, as it may behind a pooler in transaction mode (there the
    old sessions would serve it): the timeout must hold there too."""
    store = stores(postgres_database, busy_timeout=0.3)
    store.init_schema()
    if server_sessions == "ended":
        end_server_sessions(postgres_database)
    holder = lock_out_writers(postgres_database)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="statement timeout"):
            store.get_or_create_dm(new_user(), new_user())
        assert 0.25 < time.monotonic() - started < 2
    finally:
        holder.close()
    _, created = store.get_or_create_dm(new_user(), new_user())
    assert created is True


@pytest.mark.parametrize("postgres_database", ["pgbouncer-transaction"], indirect=True)
def test_a_prepared_statement_lost_behind_a_transaction_pooler_names_the_setting(postgres_database, caplog):
    """PG_TRANSACTION_POOLING forgotten: psycopg prepares a statement once it
    has run it 5 times on a connection, and later meets a server session that
    lacks it. A request that meets it fails, and the log names the setting."""
    from dm_channels.app import create_app

    app = create_app({
        "TESTING": True, "DATABASE": postgres_database, "PG_TRANSACTION_POOLING": False,
        "CHANNEL_CACHE_SIZE": 0,  # every get asks the store
    })
    client = app.test_client()
    a, b = new_user(), new_user()
    statuses = []
    with caplog.at_level(logging.ERROR):
        for _ in range(4):
            statuses += [client.get(dm_url(a, b)).status_code for _ in range(10)]
            # What a busy pooler does in effect: the statements psycopg
            # prepared are gone, and its next ones meet a new server session.
            end_server_sessions(postgres_database)
    app.extensions["dm_channels"].store.close()
    assert 500 in statuses
    # "... does not exist", or "... already exists" when two of the pool's
    # connections prepared the same name on one server session.
    assert caplog.records and all(
        'prepared statement "_pg3_' in r.getMessage() and "set PG_TRANSACTION_POOLING=true" in r.getMessage()
        for r in caplog.records
    )


def test_a_create_racing_an_uncommitted_insert_gets_the_winners_channel(
    postgres_database, stores
):
    store = stores(postgres_database)
    store.init_schema()
    a, b = sorted([new_user(), new_user()])
    other = postgres(postgres_database)
    other.execute("BEGIN")
    winner = other.execute(
        "INSERT INTO dm_channel (user_low, user_high, id) VALUES (%s, %s, gen_random_uuid())"
        " RETURNING id",
        (a, b),
    ).fetchone()[0]
    answers = []
    asking = threading.Thread(target=lambda: answers.append(store.get_or_create_dm(b, a)))
    asking.start()
    time.sleep(0.3)  # the store's INSERT now waits on the other transaction
    other.execute("COMMIT")
    other.close()
    asking.join()
    [(channel, created)] = answers
    assert (channel.id, created) == (str(winner), False)
    assert store.count() == 1


# -- faults: a 500 in bounded time, and recovery by itself ---------------------------------


# Behind a pooler in transaction mode, the server's sessions are PgBouncer's,
# not the store's (test_create_fails_after_the_busy_timeout_then_recovers[...-ended]).
@pytest.mark.parametrize("postgres_database", ["postgresql", "pgbouncer-session"], indirect=True)
def test_terminated_sessions_are_replaced_without_failing_requests(postgres_database, stores):
    store = stores(postgres_database, pool_min_size=3, pool_max_size=3)
    a, b = new_user(), new_user()
    channel, _ = store.get_or_create_dm(a, b)
    wait_until(lambda: sessions(postgres_database) == 3)
    query(
        postgres_database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'dm-channels'",
    )
    wait_until(lambda: sessions(postgres_database) == 0)
    assert store.get_or_create_dm(b, a) == (channel, False)
    assert store.get_or_create_dm(new_user(), new_user())[1] is True
    assert store.count() == 2


@pytest.fixture
def unusable_database(request, postgres_server):
    """unusable_database(cause): (DATABASE URL, what the refusal must say)."""
    import uuid

    made = []

    def make(cause):
        role = f"dm_test_{uuid.uuid4().hex[:12]}"
        if cause == "server down":
            return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", "Connection refused"
        if cause == "database missing":
            return postgres_url(f"{role}_missing"), f'database "{role}_missing" does not exist'
        if cause == "login refused":
            query(POSTGRES_SERVER, f"CREATE ROLE {role} NOLOGIN")
            made.append(role)
            url = postgres_url("postgres").replace("postgres@", f"{role}:pw-never-shown@", 1)
            return url, f'role "{role}" is not permitted to log in'
        # A role that may log in, on a database with no schema, where it may
        # not create tables (PostgreSQL 15+: nobody but the owner may in public).
        database = request.getfixturevalue("new_postgres_database")()
        query(POSTGRES_SERVER, f"CREATE ROLE {role} LOGIN")
        made.append(role)
        query(database, f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        return database.replace("postgres@", f"{role}@", 1), "permission denied for schema public"

    yield make
    for role in made:
        query(POSTGRES_SERVER, f"DROP ROLE IF EXISTS {role}")


PG_UNUSABLE = ["server down", "database missing", "login refused", "may not create the schema"]


@pytest.mark.parametrize("cause", PG_UNUSABLE)
def test_unusable_database_stops_gunicorn_at_start(gunicorn, unusable_database, cause):
    url, says = unusable_database(cause)
    started = time.monotonic()
    server = gunicorn(url, workers=2, env={"FLASK_PG_CONNECT_TIMEOUT": "2"}, wait=False)
    returncode = server.process.wait(30)
    took = time.monotonic() - started
    log = server.log()
    server.stop()
    assert returncode == 1, log
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, log
    assert "dm-channels cannot start: DATABASE: cannot use postgresql://" in errors[0]
    assert says in errors[0], log
    assert "pw-never-shown" not in log and "Traceback" not in log
    assert "Booting worker" not in log
    assert took < 2 + 3, f"{took:.1f}s"  # PG_CONNECT_TIMEOUT plus a little


@pytest.mark.parametrize("cause", PG_UNUSABLE)
def test_unusable_database_is_one_line_for_flask_commands(unusable_database, cause):
    url, says = unusable_database(cause)
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "init-db"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "FLASK_DATABASE": url, "FLASK_PG_CONNECT_TIMEOUT": "2"},
    )
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: DATABASE: cannot use postgresql://") and says in line
    assert "pw-never-shown" not in line


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers (a hung host)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("where", ["closed port", "silent server"])
@pytest.mark.xdist_group("timing")
def test_unreachable_database_is_a_500_envelope_within_the_pool_timeout(
    request, where, caplog, monkeypatch
):
    """A database that goes away while the service runs (at start-up, the
    check refuses it: test_unusable_database_stops_gunicorn_at_start)."""
    from dm_channels.app import create_app

    monkeypatch.setattr(PostgresStore, "check_writable", lambda self: None)
    port = free_port() if where == "closed port" else request.getfixturevalue("silent_server")
    url = f"postgresql://postgres@127.0.0.1:{port}/dm"
    app = create_app({"DATABASE": url, "PG_POOL_TIMEOUT": 1, "PG_CONNECT_TIMEOUT": 2})
    request.addfinalizer(app.extensions["dm_channels"].store.close)
    client = app.test_client()
    for _ in range(2):
        started = time.monotonic()
        with caplog.at_level(logging.ERROR):
            response = client.get(dm_url(new_user(), new_user()))
        assert time.monotonic() - started < 1 + 1.5
        assert response.status_code == 500
        assert response.json["error"]["code"] == "STORE_ERROR"
        body = response.get_data(as_text=True)
        assert str(port) not in body and "postgres" not in body.lower()
    assert "PoolTimeout" in caplog.text
    started = time.monotonic()
    with pytest.raises(StoreError, match="PoolTimeout"):
        app.extensions["dm_channels"].store.ping()  # what /healthz asks
    assert time.monotonic() - started < 1 + 1.5


def allow_connections(url, allowed):
    name = url.rsplit("/", 1)[1]
    with postgres() as conn:
        conn.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS {allowed}")
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


# A request may wait 1 s for a connection: PG_POOL_TIMEOUT, and PgBouncer's
# query_wait_timeout in the tests' config.
OUTAGE_ENV = {"FLASK_PG_POOL_TIMEOUT": "1", "FLASK_PG_CONNECT_TIMEOUT": "2"}


def assert_500_while_down_then_recovers(server, go_down, come_back):
    """While down, requests answer the 500 envelope within the pool timeout;
    once back up, the service answers again by itself, with the same channels."""
    a, b = new_user(), new_user()
    status, before, _ = server.get(dm_url(a, b))
    assert status == 200
    go_down()
    try:
        for user1, user2 in [(a, b), (new_user(), new_user())]:
            started = time.monotonic()
            status, body, _ = server.get(dm_url(user1, user2), timeout=10)
            assert time.monotonic() - started < 1 + 1.5
            assert status == 500 and body["error"]["code"] == "STORE_ERROR"
    finally:
        come_back()
    deadline = time.monotonic() + 30
    while (status := server.get(dm_url(b, a))[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200, server.log()
    assert server.get(dm_url(b, a))[1]["data"] == {"channel": before["data"]["channel"], "created": False}
    assert server.get(dm_url(new_user(), new_user()))[1]["data"]["created"] is True


@pytest.mark.parametrize("postgres_database", OUTAGE_ROUTES, indirect=True)
@pytest.mark.xdist_group("timing")
def test_service_answers_500_while_the_database_is_down_and_recovers_by_itself(
    postgres_database, gunicorn
):
    server = gunicorn(postgres_database, workers=1, env=OUTAGE_ENV)
    assert_500_while_down_then_recovers(
        server,
        lambda: allow_connections(postgres_database, False),  # sessions ended, none accepted
        lambda: allow_connections(postgres_database, True),
    )


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.xdist_group("timing")
def test_service_answers_500_while_pgbouncer_is_down_and_recovers_by_itself(
    new_postgres_database, new_pgbouncer, gunicorn, mode
):
    pgbouncer = new_pgbouncer(mode)
    env = {**OUTAGE_ENV, "FLASK_PG_TRANSACTION_POOLING": str(mode == "transaction").lower()}
    server = gunicorn(pgbouncer.url(new_postgres_database()), workers=1, env=env)
    assert_500_while_down_then_recovers(
        server, lambda: pgbouncer.stop(signal.SIGKILL), pgbouncer.start
    )


# -- several hosts ---------------------------------------------------------------------


@pytest.mark.parametrize("postgres_database", OUTAGE_ROUTES, indirect=True)
def test_two_hosts_asked_at_once_make_one_channel_per_pair(postgres_database, gunicorn):
    hosts = [gunicorn(postgres_database, workers=2) for _ in range(2)]
    pairs = [(new_user(), new_user()) for _ in range(40)]

    answers = fire_at_once(first_request_rounds(pairs, hosts))

    assert_one_channel_per_pair(answers, pairs)
    assert query(postgres_database, "SELECT count(*) FROM dm_channel") == [(len(pairs),)]


def load(hosts, pairs, threads=32):
    """Ask for each pair's channel from `threads` client threads, spread over
    the hosts; return the answers' (status, body), in order."""

    def ask(i):
        return hosts[i % len(hosts)].get(dm_url(*pairs[i]))[:2]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(ask, range(len(pairs))))


def watch_server_sessions(url, seen, stop):
    """Until `stop`, add to `seen` how many server sessions the database of
    `url` has (this one aside), every 20 ms."""
    with postgres(url) as conn:
        while not stop.is_set():
            seen.append(conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0])
            time.sleep(0.02)


@pytest.mark.parametrize("postgres_database", ["pgbouncer-transaction"], indirect=True)
def test_two_hosts_of_4_workers_with_pools_of_4_need_4_server_sessions_behind_pgbouncer(
    postgres_database, gunicorn, capsys
):
    """docs/postgresql.md's example: 2 hosts x 4 workers x PG_POOL_MAX_SIZE 4
    = 32 client connections, which PgBouncer (transaction mode,
    default_pool_size 4) serves with at most 4 server sessions, under first
    requests racing, creates and gets: no error, one channel per pair."""
    env = {"FLASK_PG_POOL_MIN_SIZE": "4", "FLASK_PG_POOL_MAX_SIZE": "4"}
    hosts = [gunicorn(postgres_database, workers=4, env=env) for _ in range(2)]
    seen, stop = [], threading.Event()
    watcher = threading.Thread(target=watch_server_sessions, args=(postgres_database, seen, stop))
    watcher.start()
    try:
        raced = [(new_user(), new_user()) for _ in range(30)]
        answers = fire_at_once(first_request_rounds(raced, hosts))
        started = time.monotonic()
        created = load(hosts, [(new_user(), new_user()) for _ in range(320)])
        got = load(hosts, raced * 20)
        took = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()

    assert_one_channel_per_pair(answers, raced)
    assert [(status, body["data"]["created"]) for status, body in created] == [(200, True)] * 320
    channels = {body["data"]["channel"]["id"] for _, body in answers}
    assert all(status == 200 and not body["data"]["created"] for status, body in got)
    assert {body["data"]["channel"]["id"] for _, body in got} == channels
    assert query(
        postgres_database, "SELECT count(*), count(DISTINCT (user_low, user_high)) FROM dm_channel"
    ) == [(30 + 320, 30 + 320)]
    wait_until(lambda: sessions(postgres_database) == 2 * 4 * 4)
    assert 1 <= max(seen) <= 4
    report(
        capsys,
        f"2 hosts x 4 workers x pool 4 = {sessions(postgres_database)} clients of PgBouncer, "
        f"at most {max(seen)} server sessions: {len(answers)} racing first requests, "
        f"{len(created)} creates and {len(got)} gets at {(len(created) + len(got)) / took:,.0f}"
        " requests/s, 0 errors",
    )


# -- moving from SQLite ------------------------------------------------------------------


def test_import_sqlite_copies_every_channel_with_ids_and_times_kept(
    tmp_path, postgres_database, stores
):
    from dm_channels.app import create_app

    source = tmp_path / "old.sqlite3"
    old = Store(source)
    made = [old.get_or_create_dm(new_user(), new_user())[0] for _ in range(25)]
    old.close()
    target = stores(postgres_database)
    already, _ = target.get_or_create_dm(made[3].user_high, made[3].user_low)

    app = create_app({"TESTING": True, "DATABASE": postgres_database})
    runner = app.test_cli_runner()
    result = runner.invoke(args=["import-sqlite", str(source)])
    # Said, by pair and both ids, and an error unless accepted.
    assert result.exit_code == 1, result.output
    assert "Read 25 channels" in result.output and "added 24" in result.output
    assert f"1 channel of SOURCE differs from {target.path}, which keeps its own:" in result.output
    assert f"  {already.user_low} {already.user_high}: {made[3].id} in SOURCE, {already.id} here\n" in result.output
    # The pair that had a channel here keeps it; the others are the same as before.
    assert list(target.channels()) == [already] + made[:3] + made[4:]
    client = app.test_client()
    for channel in made[5:8]:
        data = client.get(dm_url(channel.user_low, channel.user_high)).json["data"]
        assert data["created"] is False
        assert data["channel"]["id"] == channel.id
        assert data["channel"]["createdAt"] == channel.created_at.isoformat(
            timespec="milliseconds"
        ).replace("+00:00", "Z")
    # Running it again adds nothing, and says the same pair again.
    again = runner.invoke(args=["import-sqlite", "--keep-different", str(source)])
    assert again.exit_code == 0, again.output
    assert "added 0" in again.output and f"{made[3].id} in SOURCE, {already.id} here" in again.output
    assert target.count() == 25
    app.extensions["dm_channels"].store.close()


def test_import_sqlite_from_the_command_line(tmp_path, postgres_database):
    """The README's procedure, as an operator types it."""
    source = tmp_path / "old.sqlite3"
    old = Store(source)
    made = [old.get_or_create_dm(new_user(), new_user())[0] for _ in range(3)]
    old.close()
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "import-sqlite", str(source)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "FLASK_DATABASE": postgres_database},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "added 3" in result.stdout
    assert query(postgres_database, "SELECT id::text FROM dm_channel ORDER BY seq") == [
        (c.id,) for c in made
    ]
