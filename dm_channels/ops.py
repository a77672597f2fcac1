"""What operators see of the service: request ids, Prometheus metrics, and the
checks gunicorn runs at start (the log lines are logs.py's).

init_app(app), which create_app calls (and a host app may), gives every answer
of the app an X-Request-ID header: the request's id (api.request_id), its own
if the client sent a sane one, which every log line written while it runs
carries and a 5xx envelope quotes. With METRICS on, it counts and times every
request from what Flask knows of it: the route that answered, the answer's
status and, for an error, its code; and /metrics serves them.

prometheus_client is imported only once metrics are on.
"""

import glob
import hmac
import os
import shutil
import tempfile
import threading
import time

from flask import current_app, g, request

from dm_channels import api
from dm_channels.channels import CAUSES

METRICS_PATH = "/metrics"


def init_app(app):
    """Request ids for every answer of `app`, and with METRICS on, the
    metrics of every request and /metrics (a ValueError if the app already
    routes /metrics). After dm_channels.app.init_app(app), which checks the
    settings and opens the store."""
    if "dm_channels" not in app.extensions:
        raise ValueError("dm_channels.ops.init_app(app) comes after dm_channels.app.init_app(app)")
    app.extensions["dm_channels_request_ids"] = True
    app.after_request(give_request_id)
    if app.config["METRICS"]:
        for rule in app.url_map.iter_rules():
            if rule.rule == METRICS_PATH:
                raise ValueError(
                    f"dm-channels cannot serve {METRICS_PATH} (METRICS): the app already "
                    f"routes {rule.rule} to {rule.endpoint!r}"
                )
        metrics = app.extensions["dm_channels_metrics"] = process_metrics()
        metrics.watch(app.extensions.get("dm_channels"))
        app.add_url_rule(METRICS_PATH, "dm_channels_metrics", scrape)
        # First of the app's before-request hooks, so that every request is
        # timed and counted, even one another hook answers (the API key's).
        app.before_request_funcs.setdefault(None, []).insert(0, begin)
        app.after_request(record)
        app.teardown_request(done)


def give_request_id(response):
    response.headers["X-Request-ID"] = api.request_id()
    return response


def begin():
    g.dm_channels_began = time.perf_counter()
    current_app.extensions["dm_channels_metrics"].in_progress.inc()


def record(response):
    rule = request.url_rule
    began = g.get("dm_channels_began", time.perf_counter())
    current_app.extensions["dm_channels_metrics"].record(
        "other" if rule is None else rule.rule,
        response.status_code,
        g.get("dm_channels_error_code", ""),  # the envelope's, if the answer is one (api.envelope)
        time.perf_counter() - began,
    )
    return response


def done(error):
    metrics = current_app.extensions["dm_channels_metrics"]
    if "dm_channels_began" in g:
        metrics.in_progress.dec()
    stats = getattr(current_app.extensions.get("dm_channels"), "pool_stats", None)
    if stats is not None:  # PostgreSQL's pool
        metrics.show_pool(stats())


def count_store_error(error):
    """A StoreError answered: counted by its cause, with METRICS on."""
    metrics = current_app.extensions.get("dm_channels_metrics")
    if metrics is not None:
        metrics.store_errors.labels(error.cause).inc()


def scrape():
    """/metrics: every worker's metrics, summed (with METRICS_TOKEN set, for
    its bearer alone)."""
    token = current_app.config["METRICS_TOKEN"]
    if token is not None:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        # Constant time, as the API key.
        given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, token.encode()):
            return api.envelope(
                401, "UNAUTHORIZED", "Missing or wrong metrics token.",
                "Send it as Authorization: Bearer <METRICS_TOKEN>.",
                {"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = current_app.extensions["dm_channels_metrics"]
    return current_app.response_class(generate_latest(metrics.shown), content_type=CONTENT_TYPE_LATEST)


# -- metrics ------------------------------------------------------------------------

# Seconds: a warm get is answered in about 0.1 ms of the worker's time, a
# create waits for the write lock up to BUSY_TIMEOUT (5 s by default, 60 at most).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOCK_WAIT_BUCKETS = (0.0001, 0.00025, *REQUEST_BUCKETS)

_metrics = None
_metrics_lock = threading.Lock()


def process_metrics():
    """This process's Metrics, made on first use: however many apps a process
    builds, each metric is registered once."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


class Metrics:
    """The service's metrics in prometheus_client. Under gunicorn.conf.py
    (PROMETHEUS_MULTIPROC_DIR set) each worker writes its own file and /metrics
    sums all of them; elsewhere (flask run, a host app) a plain registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            # What /metrics shows: every worker's file, read at each scrape.
            self.shown = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.shown)
        else:
            self.shown = self.registry
        self.requests = Counter(
            "dm_channels_requests_total",
            "Requests answered, by route template, status class and error code.",
            ["endpoint", "status_class", "error_code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "dm_channels_request_duration_seconds",
            "Seconds from a request reaching the app to its answer being ready, by route template.",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "dm_channels_requests_in_progress",
            "Requests being answered now.",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.created = Counter(
            "dm_channels_channels_created_total", "Channels created.", registry=self.registry
        )
        self.store_errors = Counter(
            "dm_channels_store_errors_total",
            "Requests the store failed, by cause: lock_timeout, io, postgres_unavailable, other.",
            ["cause"],
            registry=self.registry,
        )
        for cause in CAUSES:
            self.store_errors.labels(cause)  # shown as 0 before the first
        self.write_lock_wait = None  # the store's metrics, once watched
        self.pool = None
        self._lock = threading.Lock()
        # Label children by their values: labels() takes a lock and checks
        # its arguments each time. Route templates, status classes and error
        # codes are few, so these stay small.
        self._requests = {}
        self._durations = {}

    def record(self, endpoint, status, code, seconds):
        key = (endpoint, status // 100, code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(endpoint, f"{key[1]}xx", code)
        counter.inc()
        histogram = self._durations.get(endpoint)
        if histogram is None:
            histogram = self._durations[endpoint] = self.duration.labels(endpoint)
        histogram.observe(seconds)

    def watch(self, store):
        """What the store reports itself: each channel it creates; the SQLite
        store's waits in its writers' queue; the PostgreSQL store's pool
        (show_pool)."""
        from prometheus_client import Gauge, Histogram

        store.observe_created = self.created.inc
        with self._lock:
            writers = getattr(store, "writers", None)
            if writers is not None:
                if self.write_lock_wait is None:
                    self.write_lock_wait = Histogram(
                        "dm_channels_write_lock_wait_seconds",
                        "Seconds creates waited in the writers' queue for their turn to write.",
                        buckets=LOCK_WAIT_BUCKETS,
                        registry=self.registry,
                    )
                writers.observe_wait = self.write_lock_wait.observe
            if hasattr(store, "pool_stats") and self.pool is None:
                self.pool = {
                    stat: Gauge(name, help, multiprocess_mode="livesum", registry=self.registry)
                    for stat, name, help in POOL_GAUGES
                }

    def show_pool(self, stats):
        """The PostgreSQL pool's gauges, from the store's pool_stats()."""
        if stats is not None:
            for stat, gauge in self.pool.items():
                gauge.set(stats.get(stat, 0))


# psycopg_pool's get_stats() names, and ours: every worker's pool, summed.
POOL_GAUGES = [
    ("pool_size", "dm_channels_pg_pool_connections",
     "PostgreSQL connections the pools hold: in use, idle or being opened."),
    ("pool_available", "dm_channels_pg_pool_idle_connections",
     "PostgreSQL connections idle in the pools."),
    ("pool_max", "dm_channels_pg_pool_max_connections",
     "The most PostgreSQL connections the pools may open (PG_POOL_MAX_SIZE each)."),
    ("requests_waiting", "dm_channels_pg_pool_requests_waiting",
     "Requests waiting for a PostgreSQL connection."),
]


# -- gunicorn's hooks (gunicorn.conf.py) -----------------------------------------------


def app_builds(server):
    """Whether the app builds: gunicorn's on_starting builds it once in a
    forked child, exactly as a worker would, and throws it away. Otherwise the
    log gets one line saying why (a bad setting, a database that cannot be
    written), instead of every worker failing to boot with a traceback.

    The master itself never builds the app: workers still open their
    database connections after the fork.
    """
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            app = server.app.wsgi()
            if "dm_channels" in getattr(app, "extensions", {}):  # not, e.g., bench's ceiling
                server.log.info("dm-channels: %s", keys_in_use(app))
            status = 0
        except Exception as e:
            server.log.debug("the app failed to start", exc_info=True)
            server.log.error("dm-channels cannot start: %s", e)
        finally:
            os._exit(status)  # whatever happened, the child goes no further
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def keys_in_use(app):
    """One line saying which of the app's paths want a key."""
    line = "the API wants an API key (X-API-KEY)"
    if app.config["API_KEY"] is None:
        line = "the API is open to anyone who reaches it: API_KEY is not set"
    if app.config["METRICS"]:
        line += "; /metrics " + (
            "wants METRICS_TOKEN" if app.config["METRICS_TOKEN"] else "is open: METRICS_TOKEN is not set"
        )
    return line


def close_after_unread_body(req):
    """gunicorn's pre_request: a GET or HEAD that announces a body is answered
    with "Connection: close". Kept alive, gunicorn would read that body,
    which nothing asked for, before the next request, holding a server
    thread for as long as the client takes to send it."""
    if req.method in ("GET", "HEAD") and any(
        name == "TRANSFER-ENCODING" or (name == "CONTENT-LENGTH" and value.strip() != "0")
        for name, value in req.headers
    ):
        req.force_close()


def make_metrics_directory(server):
    """With METRICS on, prometheus_client's multiprocess mode: each worker
    writes its metrics to files in one directory, and /metrics sums them.
    PROMETHEUS_MULTIPROC_DIR if set, else a new temporary directory, removed
    on exit (remove_metrics_directory). Set before any worker starts, so that
    each imports prometheus_client already in that mode."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
    else:
        made = server.dm_channels_metrics_made = tempfile.mkdtemp(prefix="dm-channels-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made


def empty_metrics_directory():
    # A new run starts from nothing, as prometheus_client's docs require.
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)


def mark_worker_dead(pid):
    """A worker is gone (stopped, restarted, killed): its counters and
    histograms stay in the sums (prometheus_client keeps a dead process's
    files), its live gauges (requests in progress, PostgreSQL pool) go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def remove_metrics_directory(server):
    made = getattr(server, "dm_channels_metrics_made", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
