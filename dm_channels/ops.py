"""What operators see of the service: request ids, Prometheus metrics, and
the checks gunicorn runs at start (the log lines are logs.py's).

`RequestLayer` wraps a Flask app's WSGI callable (create_app installs it
outermost). Every request passes through it, whether Flask or a faster path
inside answers it: it gets an id (its X-Request-ID if that is a sane one, else
a new one), which the answer's X-Request-ID header echoes and every log line
written while it runs carries. With METRICS on, the layer also counts and
times each request and answers /metrics.

The app tells the layer what happened through the WSGI environ:
    dm_channels.request_id    set here, before the app runs
    dm_channels.endpoint      the route template (app.note_endpoint), else "other"
    dm_channels.error_code    the envelope's code (api.envelope)
    dm_channels.created       True when the request created a channel
    dm_channels.store_error   the cause of a StoreError (store_error_cause)

Only the standard library is imported here at the top: gunicorn's master
imports this module (gunicorn.conf.py's hooks, at the end), and
prometheus_client is imported only once metrics are on.
"""

import contextvars
import glob
import hmac
import json
import os
import random
import shutil
import tempfile
import threading
import time

REQUEST_ID = "dm_channels.request_id"
ENDPOINT = "dm_channels.endpoint"
ERROR_CODE = "dm_channels.error_code"
CREATED = "dm_channels.created"
STORE_ERROR = "dm_channels.store_error"

# Room for any id scheme in use (UUIDs, W3C trace ids, prefixed ids), and
# still short in a log line.
MAX_REQUEST_ID = 200

METRICS_PATH = "/metrics"

# The environ of the request this thread is serving, for log lines (logs.py).
current_environ = contextvars.ContextVar("dm_channels_request", default=None)


def new_request_id():
    # 32 hex digits from the random module: not a secret, only unique, and
    # about 3x cheaper than os.urandom (a system call) or uuid4. Python
    # reseeds the module's generator in every forked child.
    return random.randbytes(16).hex()


def valid_request_id(value):
    """1 to MAX_REQUEST_ID characters of visible ASCII (no space, no control
    character): safe in a header and on one log line."""
    return (
        0 < len(value) <= MAX_REQUEST_ID
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


class RequestLayer:
    """The WSGI middleware of request ids and metrics, around `wsgi_app`;
    `app` is the Flask app whose settings (METRICS, METRICS_TOKEN), logger
    and store it uses."""

    def __init__(self, wsgi_app, app):
        self.wsgi_app = wsgi_app
        self.logger = app.logger
        self.metrics = None
        if app.config["METRICS"]:
            for rule in app.url_map.iter_rules():
                if rule.rule == METRICS_PATH:
                    raise ValueError(
                        f"dm-channels cannot serve {METRICS_PATH} (METRICS): the app already "
                        f"routes {rule.rule} to {rule.endpoint!r}"
                    )
            self.metrics = metrics()
            self.token = app.config["METRICS_TOKEN"]
            store = app.extensions.get("dm_channels")
            self.metrics.watch(store)
            self.pool_stats = getattr(store, "pool_stats", None)  # PostgreSQL's

    def __call__(self, environ, start_response):
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if not request_id or not valid_request_id(request_id):
            request_id = new_request_id()
        environ[REQUEST_ID] = request_id
        header = ("X-Request-ID", request_id)
        status = None

        def start(status_line, headers, exc_info=None):
            nonlocal status
            status = status_line
            headers.append(header)
            return start_response(status_line, headers, exc_info)

        token = current_environ.set(environ)
        metrics = self.metrics
        if metrics is not None:
            began = time.perf_counter()
            metrics.in_progress.inc()
        try:
            if metrics is not None and environ.get("PATH_INFO") == METRICS_PATH:
                environ[ENDPOINT] = METRICS_PATH
                return self.scrape(environ, start)
            return self.wsgi_app(environ, start)
        except Exception:
            # Flask answers its own errors; this is for anything that gets
            # past it, so that every answer has its request id.
            if status is not None:
                raise  # the answer has begun: the server can only end it
            self.logger.exception(
                "unexpected error on %s", environ.get("PATH_INFO"), extra={"status": 500}
            )
            environ[ERROR_CODE] = "INTERNAL_ERROR"
            return envelope(
                start, "500 Internal Server Error", "INTERNAL_ERROR", "Internal server error",
                with_request_id("The cause was logged.", request_id),
            )
        finally:
            if metrics is not None:
                metrics.in_progress.dec()
                # The apps here start their answer before they return it.
                metrics.record(environ, status or "500", time.perf_counter() - began)
                if self.pool_stats is not None:
                    metrics.show_pool(self.pool_stats())
            current_environ.reset(token)

    def scrape(self, environ, start):
        if self.token is not None:
            scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            # Constant time, as the API key.
            given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
            if not hmac.compare_digest(given, self.token.encode()):
                environ[ERROR_CODE] = "UNAUTHORIZED"
                return envelope(
                    start, "401 Unauthorized", "UNAUTHORIZED", "Missing or wrong metrics token.",
                    "Send it as Authorization: Bearer <METRICS_TOKEN>.",
                    headers=[("WWW-Authenticate", 'Bearer realm="metrics"')],
                )
        return self.metrics.exposition(environ, start)


def with_request_id(details, request_id):
    """A 5xx envelope's details, pointing to the request id."""
    quote = f"Quote request id {request_id} when you report this."
    return f"{details} {quote}" if details else quote


def envelope(start, status, code, message, details, headers=()):
    """The API's error envelope, without Flask (the layer's own answers)."""
    body = json.dumps(
        {"success": False, "error": {"code": code, "message": message, "details": details}},
        separators=(",", ":"),
    ).encode()
    start(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]


# -- metrics ------------------------------------------------------------------------

# Seconds: a warm get is answered in about 0.1 ms of the worker's time, a
# create waits for the write lock up to BUSY_TIMEOUT (5 s by default, 60 at most).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOCK_WAIT_BUCKETS = (0.0001, 0.00025, *REQUEST_BUCKETS)

STORE_ERROR_CAUSES = ("lock_timeout", "io", "postgres_unavailable", "other")

_metrics = None
_metrics_lock = threading.Lock()


def metrics():
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
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

        self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            # What /metrics shows: every worker's file, read at each scrape.
            shown = CollectorRegistry()
            multiprocess.MultiProcessCollector(shown)
        else:
            shown = self.registry
        self.exposition = make_wsgi_app(shown)
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
        for cause in STORE_ERROR_CAUSES:
            self.store_errors.labels(cause)  # shown as 0 before the first
        self.write_lock_wait = None  # the store's metrics, once watched
        self.pool = None
        self._lock = threading.Lock()
        # Label children by their values: labels() takes a lock and checks
        # its arguments each time. Route templates, status classes and error
        # codes are few, so these stay small.
        self._requests = {}
        self._durations = {}

    def record(self, environ, status, seconds):
        endpoint = environ.get(ENDPOINT, "other")
        key = (endpoint, status[0], environ.get(ERROR_CODE, ""))
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(endpoint, key[1] + "xx", key[2])
        counter.inc()
        histogram = self._durations.get(endpoint)
        if histogram is None:
            histogram = self._durations[endpoint] = self.duration.labels(endpoint)
        histogram.observe(seconds)
        if environ.get(CREATED):
            self.created.inc()
        cause = environ.get(STORE_ERROR)
        if cause is not None:
            self.store_errors.labels(cause).inc()

    def watch(self, store):
        """Metrics of the store's own, made the first time a store of its kind
        is watched: the SQLite store's write-lock waits (the store reports
        them), the PostgreSQL store's pool (show_pool)."""
        from prometheus_client import Gauge, Histogram

        with self._lock:
            if hasattr(store, "observe_lock_wait"):
                if self.write_lock_wait is None:
                    self.write_lock_wait = Histogram(
                        "dm_channels_write_lock_wait_seconds",
                        "Seconds creates waited in the writers' queue for SQLite's write lock.",
                        buckets=LOCK_WAIT_BUCKETS,
                        registry=self.registry,
                    )
                store.observe_lock_wait = self.write_lock_wait.observe
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

# SQLite's primary result codes (sqlite3 error's sqlite_errorcode & 0xff).
SQLITE_LOCK_CODES = {5, 6}  # BUSY, LOCKED
SQLITE_IO_CODES = {3, 8, 10, 11, 13, 14, 15, 26}  # PERM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB
# PostgreSQL's query_canceled (statement_timeout) and lock_not_available.
POSTGRES_TIMEOUTS = {"57014", "55P03"}


def store_error_cause(error):
    """Why a StoreError happened, for dm_channels_store_errors_total: lock_timeout
    (SQLite's write lock not had within BUSY_TIMEOUT; PostgreSQL's statement
    timeout, which bounds its lock waits), io (the file: disk, permissions,
    corruption), postgres_unavailable (no connection to the server, or none
    free in the pool within PG_POOL_TIMEOUT), or other."""
    cause = error.__cause__
    code = getattr(cause, "sqlite_errorcode", None)
    if code is not None:
        code &= 0xFF
        return "lock_timeout" if code in SQLITE_LOCK_CODES else "io" if code in SQLITE_IO_CODES else "other"
    if type(cause).__module__.startswith(("psycopg.", "psycopg_pool")):
        if getattr(cause, "sqlstate", None) in POSTGRES_TIMEOUTS:
            return "lock_timeout"
        import psycopg

        return "postgres_unavailable" if isinstance(cause, psycopg.OperationalError) else "other"
    if isinstance(cause, OSError):
        return "io"
    if cause is None and "locked" in str(error):
        return "lock_timeout"  # the writers' queue's own
    return "other"


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
            server.app.wsgi()
            status = 0
        except Exception as e:
            server.log.debug("the app failed to start", exc_info=True)
            server.log.error("dm-channels cannot start: %s", e)
        finally:
            os._exit(status)  # whatever happened, the child goes no further
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


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
