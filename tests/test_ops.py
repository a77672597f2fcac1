"""What operators see (ops.py): request ids, the metrics at /metrics and the
log lines, in-process and with real gunicorn workers."""

import fcntl
import glob
import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from flask import Flask, request
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from dm_channels import api, ops
from dm_channels.app import create_app, init_app
from dm_channels.store import Store, StoreError
from helpers import (
    dm_url,
    free_port,
    new_user,
    query,
    release,
    write_lock_held_by_another_process,
)

DM = "/api/messaging/dm-channel"
CHANNEL = "/api/messaging/channels/<channelId>"
GENERATED = re.compile(r"[0-9a-f]{32}")


def value(exposition, name, **labels):
    """A sample's value in a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0


def requests(exposition, endpoint, status_class="2xx", error_code=""):
    return value(
        exposition, "dm_channels_requests_total",
        endpoint=endpoint, status_class=status_class, error_code=error_code,
    )


def answered(exposition, endpoint):
    """How many requests of the endpoint the latency histogram counted."""
    return value(exposition, "dm_channels_request_duration_seconds_count", endpoint=endpoint)


@pytest.fixture
def metrics_app(make_app):
    return make_app(METRICS=True)


def scrape_client(client, **kwargs):
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data(as_text=True)


# -- request ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    ["3c90c3cc-0d44-4b50-8888-8dd25736052a", "a", "req:42/b=c;d", "x" * api.MAX_REQUEST_ID],
)
def test_a_sane_request_id_is_echoed(client, given):
    response = client.get(dm_url(new_user(), new_user()), headers={"X-Request-ID": given})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == given


@pytest.mark.parametrize(
    "given",
    ["", " ", "two words", "x" * (api.MAX_REQUEST_ID + 1), "caf\xe9", "a\x01b", "tab\there", "\x7f"],
    ids=["empty", "space", "inner space", "too long", "beyond ascii", "control", "tab", "delete"],
)
def test_any_other_request_id_is_replaced_by_a_new_one(client, given):
    response = client.get(
        dm_url(new_user(), new_user()), environ_overrides={"HTTP_X_REQUEST_ID": given}
    )
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["X-Request-ID"])


def broken_store(app, monkeypatch):
    def broken(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.extensions["dm_channels"].store, "get_or_create_dm", broken)


@pytest.mark.parametrize("metrics", [False, True], ids=["metrics-off", "metrics-on"])
def test_every_answer_has_a_request_id_of_its_own(make_app, monkeypatch, metrics):
    app = make_app(METRICS=metrics, API_KEY="key")
    broken_store(app, monkeypatch)
    client = app.test_client()
    key = {"X-API-KEY": "key"}
    answers = [
        client.get(dm_url(new_user(), new_user()), headers=key),  # 500
        client.get(dm_url(new_user(), "nope"), headers=key),  # 400
        client.get(dm_url(new_user(), new_user())),  # 401
        client.get(f"/api/messaging/channels/{new_user()}", headers=key),  # 404
        client.get("/api/messaging/nowhere", headers=key),
        client.get("/nowhere"),
        client.post(DM, headers=key),  # 405
        client.get("/api//messaging/dm-channel", headers=key),  # 308
        client.get(DM + "?" + "a" * 3000, headers=key),  # 414
        client.options(DM, headers=key),
        client.get("/healthz"),
        client.get("/openapi.json"),
        client.get("/metrics"),  # 200 or 404
    ]
    ids = [answer.headers.get("X-Request-ID") for answer in answers]
    assert all(GENERATED.fullmatch(i or "") for i in ids), ids
    assert len(set(ids)) == len(ids)


@pytest.mark.pgbouncer
def test_every_5xx_envelope_quotes_the_request_id_and_no_4xx_does(make_app, database, monkeypatch):
    app = make_app()
    client = app.test_client()
    assert client.get(dm_url(new_user(), new_user())).status_code == 200  # the schema exists
    headers = {"X-Request-ID": "report-me-1"}
    quote = "Quote request id report-me-1 when you report this."

    missing = client.get(f"/api/messaging/channels/{new_user()}", headers=headers)
    assert missing.status_code == 404 and "report-me-1" not in missing.get_data(as_text=True)

    app.extensions["dm_channels"].store.close()
    query(database, "DROP TABLE dm_channel")
    store_error = client.get(dm_url(new_user(), new_user()), headers=headers)
    health = client.get("/healthz", headers=headers)
    broken_store(app, monkeypatch)
    internal = client.get(dm_url(new_user(), new_user()), headers=headers)

    for answer, status, code in [
        (store_error, 500, "STORE_ERROR"), (health, 503, "STORE_UNAVAILABLE"),
        (internal, 500, "INTERNAL_ERROR"),
    ]:
        assert answer.status_code == status and answer.json["error"]["code"] == code
        assert answer.json["error"]["details"].endswith(quote)
        assert answer.headers["X-Request-ID"] == "report-me-1"


@pytest.mark.sqlite_only
def test_an_error_in_another_hook_is_still_an_envelope_with_the_request_id(app, caplog):
    @app.before_request
    def fails():
        raise RuntimeError("secret internals")

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get(DM, headers={"X-Request-ID": "in-a-hook"})
    assert response.status_code == 500 and response.json["error"]["code"] == "INTERNAL_ERROR"
    assert response.headers["X-Request-ID"] == "in-a-hook"
    assert "in-a-hook" in response.json["error"]["details"]
    assert "secret internals" not in response.get_data(as_text=True)
    assert "secret internals" in caplog.text


# -- log lines -----------------------------------------------------------------------------


def log_of(app, path, request_id):
    errors = io.StringIO()
    response = app.test_client().get(
        path, headers={"X-Request-ID": request_id}, environ_overrides={"wsgi.errors": errors}
    )
    return response, errors.getvalue()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_apps_log_lines_carry_the_request_id(make_app, monkeypatch, log_format):
    app = make_app(LOG_FORMAT=log_format)
    broken_store(app, monkeypatch)

    response, log = log_of(app, dm_url(new_user(), new_user()), "log-me-7")

    assert response.status_code == 500
    if log_format == "text":
        first = log.splitlines()[0]
        assert "[ERROR] [log-me-7] unexpected error on /api/messaging/dm-channel" in first
        assert "RuntimeError: secret internals" in log
    else:
        [line] = log.splitlines()  # the traceback inside it
        entry = json.loads(line)
        assert entry["level"] == "ERROR"
        assert entry["request_id"] == "log-me-7"
        assert entry["path"] == DM
        assert entry["status"] == 500
        assert entry["message"] == f"unexpected error on {DM}"
        assert "RuntimeError: secret internals" in entry["exception"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


@pytest.mark.sqlite_only
def test_log_format_is_text_or_json(make_app):
    with pytest.raises(ValueError, match="^LOG_FORMAT must be text or json, not 'xml'"):
        make_app(LOG_FORMAT="xml")
    assert make_app(LOG_FORMAT="JSON").config["LOG_FORMAT"] == "json"


def test_apps_made_one_after_another_do_not_repeat_log_lines(make_app, monkeypatch):
    for _ in range(3):
        app = make_app()
    broken_store(app, monkeypatch)
    _, log = log_of(app, dm_url(new_user(), new_user()), "once")
    assert log.count("[once] unexpected error") == 1


# -- metrics, in one process ---------------------------------------------------------------


def test_metrics_are_off_by_default_and_prometheus_client_is_not_even_imported(tmp_path):
    code = (
        "import sys; from dm_channels.app import create_app;"
        f"c = create_app({{'DATABASE': {str(tmp_path / 'off.sqlite3')!r}}}).test_client();"
        "r = c.get('/metrics'); c.get('/healthz');"
        "print(r.status_code, r.json['error']['code'], 'prometheus_client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["404", "NOT_FOUND", "False"]


def test_metrics_count_requests_by_route_template_never_by_id(metrics_app):
    client = metrics_app.test_client()
    before = scrape_client(client)
    made = [client.get(dm_url(new_user(), new_user())).json["data"]["channel"] for _ in range(3)]
    for channel in made:
        assert client.get(f"/api/messaging/channels/{channel['id']}").status_code == 200
    missing = new_user()
    assert client.get(f"/api/messaging/channels/{missing}").status_code == 404
    assert client.get("/api/messaging/nowhere").status_code == 404
    after = scrape_client(client)

    def grew(endpoint, *args):
        return requests(after, endpoint, *args) - requests(before, endpoint, *args)

    assert grew(DM) == 3
    assert grew(CHANNEL) == 3
    assert grew(CHANNEL, "4xx", "CHANNEL_NOT_FOUND") == 1
    assert grew("other", "4xx", "NOT_FOUND") == 1
    created = "dm_channels_channels_created_total"
    assert value(after, created) - value(before, created) == 3
    assert answered(after, CHANNEL) - answered(before, CHANNEL) == 4
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", after)  # no id in any label


def test_answers_of_the_guard_and_of_raising_hooks_are_counted_with_their_code(make_app):
    app = make_app(METRICS=True, API_KEY="k")

    @app.before_request
    def fails():
        if request.args.get("fail"):
            raise RuntimeError("in a hook")

    client = app.test_client()
    key = {"X-API-KEY": "k"}
    before = scrape_client(client)
    assert client.get(dm_url(new_user(), new_user())).status_code == 401  # the guard answers
    assert client.post(dm_url(new_user(), new_user()), headers=key).status_code == 405
    assert client.get(DM + "?" + "a" * 3000, headers=key).status_code == 414
    assert client.get(dm_url(new_user(), new_user()) + "&fail=1", headers=key).status_code == 500
    after = scrape_client(client)
    for endpoint, status_class, code in [
        (DM, "4xx", "UNAUTHORIZED"), (DM, "4xx", "REQUEST_URI_TOO_LONG"), (DM, "5xx", "INTERNAL_ERROR"),
        ("other", "4xx", "METHOD_NOT_ALLOWED"),  # no route matched: no template
    ]:
        grew = requests(after, endpoint, status_class, code) - requests(before, endpoint, status_class, code)
        assert grew == 1, (endpoint, code)
    assert value(after, "dm_channels_requests_in_progress") == 1  # the scrape itself


def test_a_hosts_own_error_answers_are_counted_without_a_code(tmp_path):
    host = Flask("host")
    host.config.update(DATABASE=str(tmp_path / "host.sqlite3"), METRICS=True)
    host.add_url_rule("/list", "list", lambda: (["not", "an", "envelope"], 400))
    host.add_url_rule("/text", "text", lambda: ({"error": "plain words"}, 409))
    init_app(host)
    ops.init_app(host)
    client = host.test_client()
    assert client.get("/list").status_code == 400
    assert client.get("/text").status_code == 409
    exposition = scrape_client(client)
    assert requests(exposition, "/list", "4xx", "") == 1
    assert requests(exposition, "/text", "4xx", "") == 1
    host.extensions["dm_channels"].store.close()


def test_ops_comes_after_init_app(tmp_path):
    host = Flask("host")
    host.config.update(DATABASE=str(tmp_path / "host.sqlite3"), METRICS=True)
    with pytest.raises(ValueError, match=r"comes after dm_channels.app.init_app\(app\)"):
        ops.init_app(host)


def test_metrics_need_their_own_token_when_it_is_set_and_never_the_api_key(make_app):
    app = make_app(METRICS=True, API_KEY="api-key", METRICS_TOKEN="scrape-token")
    client = app.test_client()
    refused = [
        client.get("/metrics"),
        client.get("/metrics", headers={"X-API-KEY": "api-key"}),
        client.get("/metrics", headers={"Authorization": "Bearer api-key"}),
        client.get("/metrics", headers={"Authorization": "Bearer scrape-toke"}),
        client.get("/metrics", headers={"Authorization": "Basic scrape-token"}),
    ]
    for answer in refused:
        assert answer.status_code == 401 and answer.json["error"]["code"] == "UNAUTHORIZED"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "scrape-token" not in answer.get_data(as_text=True)
    assert "dm_channels_requests_total" in scrape_client(
        client, headers={"Authorization": "Bearer scrape-token"}
    )
    # Without a token of its own, /metrics is open, whatever API_KEY says.
    open_app = make_app(METRICS=True, API_KEY="api-key")
    assert "dm_channels_requests_total" in scrape_client(open_app.test_client())


def test_metrics_on_twice_in_one_process_is_harmless(make_app, monkeypatch):
    monkeypatch.setenv("FLASK_METRICS", "true")
    first, second = make_app(), make_app()
    assert first.config["METRICS"] is True and second.config["METRICS"] is True
    assert second.test_client().get(dm_url(new_user(), new_user())).status_code == 200
    assert "dm_channels_requests_total" in scrape_client(first.test_client())


@pytest.mark.parametrize("name", ["HEALTH_PATH", "OPENAPI_PATH"])
@pytest.mark.sqlite_only
def test_no_route_of_ours_may_sit_where_metrics_are_served(make_app, name):
    make_app(**{name: "/metrics"})  # metrics off: nothing is served there
    with pytest.raises(ValueError, match=f"^{name} must not be /metrics: METRICS are served there"):
        make_app(METRICS=True, **{name: "/metrics"})


def test_metrics_show_the_postgresql_pool(postgres_database):
    app = create_app(
        {"TESTING": True, "DATABASE": postgres_database, "METRICS": True, "PG_POOL_MAX_SIZE": 3}
    )
    client = app.test_client()
    assert client.get(dm_url(new_user(), new_user())).status_code == 200
    exposition = scrape_client(client)
    app.extensions["dm_channels"].store.close()
    assert value(exposition, "dm_channels_pg_pool_connections") >= 1
    assert value(exposition, "dm_channels_pg_pool_max_connections") == 3
    assert value(exposition, "dm_channels_pg_pool_requests_waiting") == 0
    assert "dm_channels_pg_pool_idle_connections" in exposition


# -- the store's own measures ---------------------------------------------------------------


@pytest.mark.xdist_group("timing")
def test_creates_report_their_wait_in_the_writers_queue(db_path):
    store = Store(db_path, busy_timeout=0.5)
    waits = []
    store.observe_wait = waits.append
    store.get_or_create_dm(new_user(), new_user())
    assert len(waits) == 1 and waits[0] < 0.1

    # Another writer of the queue holds it: the create waits, then goes in or gives up.
    writers = os.open(db_path + "-writers", os.O_RDWR)
    fcntl.flock(writers, fcntl.LOCK_EX)
    threading.Timer(0.3, fcntl.flock, [writers, fcntl.LOCK_UN]).start()
    store.get_or_create_dm(new_user(), new_user())
    assert 0.25 <= waits[1] < 0.5  # the timer started a moment before the create
    fcntl.flock(writers, fcntl.LOCK_EX)
    with pytest.raises(StoreError, match="locked"):
        store.get_or_create_dm(new_user(), new_user())
    os.close(writers)
    assert 0.5 <= waits[2] < 0.7
    store.get_or_create_dm(new_user(), new_user())
    assert len(waits) == 4

    # A writer outside the queue holds SQLite's lock: the wait counts until it is had.
    with write_lock_held_by_another_process(db_path) as holder:
        threading.Timer(0.3, release, [holder]).start()
        store.get_or_create_dm(new_user(), new_user())
    assert 0.25 <= waits[4] < 0.5
    store.close()


def store_error(work):
    with pytest.raises(StoreError) as caught:
        work()
    return caught.value.cause


def test_store_errors_are_told_apart_by_cause_on_sqlite(db_path, tmp_path):
    store = Store(db_path, busy_timeout=0.2)
    store.init_schema()
    with write_lock_held_by_another_process(db_path):
        assert store_error(lambda: store.get_or_create_dm(new_user(), new_user())) == "lock_timeout"
    store.close()
    not_a_database = tmp_path / "not.sqlite3"
    not_a_database.write_bytes(b"this is not a database" * 512)
    assert store_error(lambda: Store(str(not_a_database)).ping()) == "io"
    writers = Store(str(tmp_path / "writers.sqlite3"))
    writers.init_schema()
    os.mkdir(writers.path + "-writers")  # the queue's lock file cannot be opened
    assert store_error(lambda: writers.get_or_create_dm(new_user(), new_user())) == "io"
    writers.close()


def test_store_errors_are_told_apart_by_cause_on_postgresql(new_postgres_database):
    from dm_channels.pgstore import PostgresStore

    url = new_postgres_database()
    schema = PostgresStore(url)
    schema.init_schema()
    schema.close()
    slow = PostgresStore(url, busy_timeout=0.1)
    assert store_error(lambda: slow._run(lambda c: c.execute("SELECT pg_sleep(1)"))) == "lock_timeout"
    slow.close()
    nowhere = url.replace(url.split("@")[-1].split("/")[0], f"127.0.0.1:{free_port()}")
    gone = PostgresStore(nowhere, pool_timeout=0.5, connect_timeout=2)
    assert store_error(gone.ping) == "postgres_unavailable"
    gone.close()


# -- with real gunicorn workers --------------------------------------------------------------


def scrape(server):
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def requests_by_worker(directory):
    """{pid: requests it counted}, read from each worker's own file."""
    counted = {}
    for path in filter(os.path.getsize, glob.glob(os.path.join(directory, "counter_*.db"))):  # not one being made
        pid = int(os.path.basename(path)[len("counter_"):-len(".db")])
        families = MultiProcessCollector.merge([path])
        counted[pid] = sum(
            s.value for f in families for s in f.samples
            if s.name == "dm_channels_requests_total" and s.labels["endpoint"] == DM
        )
    return counted


def test_counters_are_summed_over_workers_and_the_histogram_counts_every_request(
    gunicorn, db_path, tmp_path
):
    temp = tmp_path / "temp"
    temp.mkdir()
    server = gunicorn(db_path, workers=3, env={"FLASK_METRICS": "true", "TMPDIR": str(temp)})
    [directory] = glob.glob(str(temp / "dm-channels-metrics-*"))
    pairs = [(new_user(), new_user()) for _ in range(30)]
    sent = 0
    with ThreadPoolExecutor(9) as pool:
        while True:  # until the requests were spread over several workers
            # A new connection for each: any worker may take it.
            statuses = list(pool.map(lambda pair: server.get(dm_url(*pair))[0], pairs * 3))
            assert statuses == [200] * len(statuses)
            sent += len(statuses)
            by_worker = requests_by_worker(directory)
            if sum(1 for n in by_worker.values() if n) >= 2 or sent >= 900:
                break

    exposition = scrape(server)
    assert sum(1 for n in by_worker.values() if n) >= 2, by_worker
    assert requests(exposition, DM) == sent == sum(by_worker.values())
    assert answered(exposition, DM) == sent
    assert value(exposition, "dm_channels_channels_created_total") == len(pairs)
    # Each create queued for the write lock once (a pair's first requests at
    # once may each queue: INSERT OR IGNORE makes one channel of them).
    assert len(pairs) <= value(exposition, "dm_channels_write_lock_wait_seconds_count") <= sent
    server.stop()
    assert not os.path.exists(directory)  # made for the run, removed with it


def test_a_killed_workers_counts_stay_counted_once_and_its_live_gauges_go(
    gunicorn, db_path, tmp_path
):
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"an earlier run's leftovers")
    server = gunicorn(
        db_path, workers=2,
        env={"FLASK_METRICS": "true", "PROMETHEUS_MULTIPROC_DIR": str(directory),
             "FLASK_BUSY_TIMEOUT": "20"},
    )
    assert not (directory / "counter_999999.db").exists()  # wiped at start
    deadline = time.monotonic() + 30
    while len(server.worker_pids()) < 2:  # it answers once one is up
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = server.worker_pids()
    while not all((directory / f"counter_{pid}.db").exists() for pid in killed):
        assert time.monotonic() < deadline  # each worker has built its app, and metrics
        time.sleep(0.05)
    before = [server.get(dm_url(new_user(), new_user()))[0] for _ in range(20)]
    assert before == [200] * 20

    with write_lock_held_by_another_process(db_path) as holder:
        in_flight = threading.Thread(target=lambda: _ignore_errors(server, dm_url(new_user(), new_user())))
        in_flight.start()
        # The create waits for the lock; the scrape counts itself too. A
        # request's gauge goes down just after its answer is sent, so on a
        # busy machine a scrape may still count an earlier request (a get, or
        # the scrape before): the create is the one still there 0.3 s later.
        deadline = time.monotonic() + 10
        while not in_progress_stays(server, 2, 0.3):
            assert time.monotonic() < deadline
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        in_flight.join()
        release(holder)

    deadline = time.monotonic() + 30
    while len(set(server.worker_pids()) - set(killed)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.wait_ready()
    exposition = scrape(server)
    # The killed workers' counts are all there, once; the request they were
    # answering never was, so it is in no count; their in-progress gauge is gone.
    assert requests(exposition, DM) == 20
    assert answered(exposition, DM) == 20
    assert value(exposition, "dm_channels_requests_in_progress") == 1
    for pid in killed:
        assert (directory / f"counter_{pid}.db").exists()
        assert not (directory / f"gauge_livesum_{pid}.db").exists()

    after = [server.get(dm_url(new_user(), new_user()))[0] for _ in range(10)]
    assert after == [200] * 10
    # A worker killed while making its file leaves it empty (prometheus_client sizes it just after).
    (directory / "counter_999998.db").touch()
    exposition = scrape(server)
    assert requests(exposition, DM) == answered(exposition, DM) == 30


def test_a_metrics_folder_the_service_makes_is_private(tmp_path, monkeypatch):
    server = SimpleNamespace()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    ops.make_metrics_directory(server)  # a new one of its own
    made = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    named = tmp_path / "run" / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(named))
    ops.make_metrics_directory(server)  # the operator's, made as it did not exist
    assert [stat.S_IMODE(os.stat(folder).st_mode) for folder in (made, named)] == [0o700, 0o700]
    ops.remove_metrics_directory(server)
    assert not os.path.exists(made)


def test_only_prometheus_clients_own_files_leave_the_operators_metrics_folder(tmp_path, monkeypatch):
    others = ["dm.db", "dm.sqlite3", "counter.db", "notes_12.db"]
    for name in others:
        (tmp_path / name).write_text("not prometheus_client's")
    modes = ["all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"]
    code = (
        "from prometheus_client import Counter, Gauge, Histogram, Summary\n"
        "Counter('c', 'c').inc(); Histogram('h', 'h').observe(1); Summary('s', 's').observe(1)\n"
        f"for mode in {modes!r}: Gauge('g_' + mode, 'g', multiprocess_mode=mode).set(1)\n"
    )
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, check=True)
    assert len(os.listdir(tmp_path)) == len(others) + 3 + len(modes)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ops.empty_metrics_directory()
    assert sorted(os.listdir(tmp_path)) == sorted(others)


def in_progress_stays(server, count, seconds):
    """Whether two scrapes, `seconds` apart, each count `count` requests in progress."""
    if value(scrape(server), "dm_channels_requests_in_progress") != count:
        time.sleep(0.05)
        return False
    time.sleep(seconds)
    return value(scrape(server), "dm_channels_requests_in_progress") == count


def _ignore_errors(server, path):
    try:
        server.get(path, timeout=30)
    except OSError:
        pass  # its worker was killed


def log_lines(server):
    return [line for line in server.log().splitlines() if line.strip()]


def test_json_log_lines_parse_and_carry_the_id_of_their_request(gunicorn, db_path):
    secret_key, agent = "the-api-key-9f8e7d", "agent-marker-5c4b3a"
    server = gunicorn(
        db_path, workers=2,
        env={"FLASK_LOG_FORMAT": "json", "FLASK_API_KEY": json.dumps(secret_key)},
    )
    headers = {"X-API-KEY": secret_key, "User-Agent": agent, "Referer": "http://referer.example/"}
    sent = {}
    for i in range(12):
        request_id = f"json-log-{i}"
        path = dm_url(new_user(), new_user()) if i % 3 else "/api/messaging/nowhere"
        status, _, got = server.get(path, headers={**headers, "X-Request-ID": request_id})
        assert got["X-Request-ID"] == request_id
        sent[request_id] = (path.split("?")[0], status)
    server.stop()

    entries = [json.loads(line) for line in log_lines(server)]  # every line is one object
    for entry in entries:
        assert {"time", "level", "logger", "message", "request_id", "path", "status"} <= set(entry)
    access = {e["request_id"]: e for e in entries if e["logger"] == "gunicorn.access"}
    for request_id, (path, status) in sent.items():
        assert access[request_id]["path"] == path
        assert access[request_id]["status"] == status
        assert access[request_id]["method"] == "GET"
    assert any("Booting worker" in e["message"] for e in entries)
    text = server.log()
    assert secret_key not in text and agent not in text and "referer.example" not in text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_store_error_shows_in_metrics_log_and_envelope_with_one_request_id(
    gunicorn, db_path, log_format
):
    server = gunicorn(
        db_path, workers=2,
        env={"FLASK_METRICS": "true", "FLASK_BUSY_TIMEOUT": "1", "FLASK_LOG_FORMAT": log_format},
    )
    assert server.get(dm_url(new_user(), new_user()))[0] == 200
    with write_lock_held_by_another_process(db_path):
        status, body, headers = server.get(
            dm_url(new_user(), new_user()),
            headers={"X-Request-ID": "report-me-42", "User-Agent": "agent-marker-3d2c1b"},
        )
    exposition = scrape(server)

    assert status == 500 and body["error"]["code"] == "STORE_ERROR"
    assert headers["X-Request-ID"] == "report-me-42"
    assert body["error"]["details"].endswith("Quote request id report-me-42 when you report this.")
    assert value(exposition, "dm_channels_store_errors_total", cause="lock_timeout") == 1
    assert requests(exposition, DM, "5xx", "STORE_ERROR") == 1
    server.log_line("report-me-42")  # waits for the access line
    assert "agent-marker-3d2c1b" not in server.log()  # no header value but the request id
    lines = [line for line in log_lines(server) if "report-me-42" in line]
    if log_format == "text":
        [error, access] = lines
        assert "[ERROR] [report-me-42] store failure on /api/messaging/dm-channel" in error
        assert access.startswith("127.0.0.1 ") and '" 500 ' in access
        assert access.endswith(" report-me-42")
    else:
        [error, access] = [json.loads(line) for line in lines]
        assert error["level"] == "ERROR" and error["status"] == 500 and error["path"] == DM
        assert "database is locked" in error["exception"]
        assert access["logger"] == "gunicorn.access" and access["status"] == 500
