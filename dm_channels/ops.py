"""Request ids, Prometheus metrics at /metrics, and the work of dm_channels.gunicorn_conf's hooks."""

import functools
import glob
import hmac
import os
import re
import shutil
import tempfile
import time

from flask import current_app, g, request

from dm_channels import api
from dm_channels.settings import METRICS_PATH
from dm_channels.store import CAUSES


def init_app(app):
    """Give every answer an X-Request-ID and, with METRICS, count requests and serve /metrics; after app.init_app."""
    if "dm_channels" not in app.extensions:
        raise ValueError("dm_channels.ops.init_app(app) comes after dm_channels.app.init_app(app)")
    dm_channels = app.extensions["dm_channels"]
    dm_channels.request_ids = True
    app.after_request(give_request_id)
    if not app.config["METRICS"]:
        return  # prometheus_client is not even imported
    for rule in app.url_map.iter_rules():
        if rule.rule == METRICS_PATH:
            raise ValueError(f"dm-channels cannot serve {METRICS_PATH} (METRICS): the app already "
                             f"routes {rule.rule} to {rule.endpoint!r}")
    metrics = dm_channels.metrics = process_metrics()
    dm_channels.store.observe_created = metrics.created.inc
    if hasattr(dm_channels.store, "observe_wait"):  # SQLite's writers
        dm_channels.store.observe_wait = metrics.write_lock_wait.observe
    app.add_url_rule(METRICS_PATH, "dm_channels_metrics", scrape)
    # First of the before-request hooks: a request another hook answers is counted too.
    app.before_request_funcs.setdefault(None, []).insert(0, begin)
    app.after_request(record)
    app.teardown_request(done)


def give_request_id(response):
    response.headers["X-Request-ID"] = api.request_id()
    return response


def begin():
    g.dm_channels_began = time.perf_counter()
    current_app.extensions["dm_channels"].metrics.in_progress.inc()


def record(response):
    metrics = current_app.extensions["dm_channels"].metrics
    endpoint = "other" if request.url_rule is None else request.url_rule.rule
    status_class = f"{response.status_code // 100}xx"
    metrics.requests.labels(endpoint, status_class, g.get("dm_channels_error_code", "")).inc()
    began = g.get("dm_channels_began", time.perf_counter())
    metrics.duration.labels(endpoint).observe(time.perf_counter() - began)
    return response


def done(error):
    dm_channels = current_app.extensions["dm_channels"]
    if "dm_channels_began" in g:
        dm_channels.metrics.in_progress.dec()
    stats = dm_channels.store.pool_stats() if hasattr(dm_channels.store, "pool_stats") else None
    if stats is not None:
        for stat, gauge in dm_channels.metrics.pool.items():
            gauge.set(stats.get(stat, 0))


def scrape():
    """/metrics: every worker's metrics, summed; with METRICS_TOKEN, for its bearer alone."""
    token = current_app.config["METRICS_TOKEN"]
    if token is not None:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, token.encode()):
            return api.envelope(401, "UNAUTHORIZED", "Missing or wrong metrics token.",
                                "Send it as Authorization: Bearer <METRICS_TOKEN>.",
                                {"WWW-Authenticate": 'Bearer realm="metrics"'})
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    shown = current_app.extensions["dm_channels"].metrics.shown
    return current_app.response_class(generate_latest(shown), content_type=CONTENT_TYPE_LATEST)


# Seconds: a warm get takes about 0.1 ms of a worker, a create waits up to BUSY_TIMEOUT.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# psycopg_pool's get_stats() names: every worker's pool, summed.
POOL_GAUGES = {
    "pool_size": ("connections", "PostgreSQL connections the pools hold: in use, idle or being opened."),
    "pool_available": ("idle_connections", "PostgreSQL connections idle in the pools."),
    "pool_max": ("max_connections", "The most PostgreSQL connections the pools may open (PG_POOL_MAX_SIZE each)."),
    "requests_waiting": ("requests_waiting", "Requests waiting for a PostgreSQL connection."),
}


@functools.cache
def process_metrics():
    """This process's Metrics: a metric may be registered only once, however many apps it builds."""
    return Metrics()


class Metrics:
    """The service's metrics; with PROMETHEUS_MULTIPROC_DIR, each worker writes its own file and `shown` sums them."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        registry = self.shown = CollectorRegistry()
        if self.folder:
            self.shown = CollectorRegistry()
            self.shown.register(self)  # collect() below
        self.requests = Counter("dm_channels_requests_total",
                                "Requests answered, by route template, status class and error code.",
                                ["endpoint", "status_class", "error_code"], registry=registry)
        self.duration = Histogram(
            "dm_channels_request_duration_seconds",
            "Seconds from a request reaching the app to its answer being ready, by route template.",
            ["endpoint"], buckets=REQUEST_BUCKETS, registry=registry,
        )
        self.in_progress = Gauge("dm_channels_requests_in_progress", "Requests being answered now.",
                                 multiprocess_mode="livesum", registry=registry)
        self.created = Counter("dm_channels_channels_created_total", "Channels created.", registry=registry)
        self.store_errors = Counter(
            "dm_channels_store_errors_total",
            "Requests the store failed, by cause: lock_timeout, io, postgres_unavailable, other.",
            ["cause"], registry=registry,
        )
        for cause in CAUSES:
            self.store_errors.labels(cause)  # shown as 0 before the first
        self.write_lock_wait = Histogram("dm_channels_write_lock_wait_seconds",
                                         "Seconds creates waited to be written: their turn, then SQLite's write lock.",
                                         buckets=(0.0001, 0.00025, *REQUEST_BUCKETS), registry=registry)
        self.pool = {
            stat: Gauge(f"dm_channels_pg_pool_{name}", help, multiprocess_mode="livesum", registry=registry)
            for stat, (name, help) in POOL_GAUGES.items()
        }

    def collect(self):
        """Every worker's files, summed, as MultiProcessCollector sums them, less empty ones: a file is
        empty while its worker makes it (for good if killed then), and prometheus_client fails on one."""
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(self.folder, "*.db"))
        return MultiProcessCollector.merge([f for f in files if written(f)], accumulate=True)


def written(path):
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # a dead worker's live gauges, removed meanwhile
        return False


def app_builds(server):
    """Whether the app builds in a forked child, as a worker builds it (the master opens no database); if not, why."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            app = server.app.wsgi()
            if "dm_channels" in getattr(app, "extensions", {}):  # not bench's ceiling
                server.log.info("dm-channels: %s", keys_in_use(app.config))
            status = 0
        except Exception as e:
            server.log.debug("the app failed to start", exc_info=True)
            server.log.error("dm-channels cannot start: %s", e)
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def keys_in_use(config):
    """One line saying which of the app's paths want a key."""
    line = "the API wants an API key (X-API-KEY)"
    if config["API_KEY"] is None:
        line = "the API is open to anyone who reaches it: API_KEY is not set"
    if config["METRICS"]:
        token = config["METRICS_TOKEN"]
        line += "; /metrics " + ("wants METRICS_TOKEN" if token else "is open: METRICS_TOKEN is not set")
    return line


def close_after_unread_body(req):
    """Close after a request that announces a body: no route reads one, and gunicorn would, however slowly it came."""
    if any(
        name == "TRANSFER-ENCODING" or (name == "CONTENT-LENGTH" and value.strip() != "0")
        for name, value in req.headers
    ):
        req.force_close()


def make_metrics_directory(server):
    """PROMETHEUS_MULTIPROC_DIR, made private (0700) or a new one removed on exit; before workers import prometheus."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, mode=0o700, exist_ok=True)
    else:
        made = server.dm_channels_metrics_made = tempfile.mkdtemp(prefix="dm-channels-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made


# prometheus_client's file names: values.py's "<type>_<pid>.db", a gauge's type with its mode.
METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_(live)?(all|min|max|sum|mostrecent))_\d+\.db")


def empty_metrics_directory():
    # A new run starts from nothing, as prometheus_client's docs require; the folder may hold others' files.
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(folder):
        if METRICS_FILE.fullmatch(name):
            os.remove(os.path.join(folder, name))


def remove_metrics_directory(server):
    made = getattr(server, "dm_channels_metrics_made", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
