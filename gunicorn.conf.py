"""gunicorn defaults for dm-channels: gunicorn "app:create_app()" reads this file.

Any of these can be overridden on the command line (--bind 0.0.0.0:8000,
--workers 8) or in GUNICORN_CMD_ARGS.
"""

import glob
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import tempfile

from gunicorn import glogging


def flask_setting(name, default):
    """FLASK_<name> from the environment, read as the app reads it (JSON, or
    the string as it is). The app checks it when it starts."""
    value = os.environ.get(f"FLASK_{name}")
    if value is None:
        return default
    try:
        return json.loads(value)
    except ValueError:
        return value


def load_ops():
    # ops.py (its log formats), beside this file and under a name of its own:
    # the master never imports dm_channels' modules, so that workers import
    # them after the fork and a HUP still loads new code.
    spec = importlib.util.spec_from_file_location(
        "dm_channels_gunicorn_ops", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ops = load_ops()
LOG_FORMAT = "json" if str(flask_setting("LOG_FORMAT", "text")).lower() == "json" else "text"
METRICS = flask_setting("METRICS", False) is True
ACCESS_LOG = flask_setting("ACCESS_LOG", True) is not False

bind = "127.0.0.1:8000"
# Reads scale with processes; SQLite takes one writer at a time whatever the count.
workers = multiprocessing.cpu_count() * 2 + 1
worker_class = "gthread"
threads = 4
# Never load the app in the master: each worker opens its own database
# connections after the fork (the app opens none at import anyway).
preload_app = False
# A line per request costs about a sixth of a warm get's CPU
# (docs/performance.md); FLASK_ACCESS_LOG=false turns it off, e.g. behind
# nginx, which logs every request itself.
accesslog = "-" if ACCESS_LOG else None
errorlog = "-"
# Text access lines as gunicorn's usual ones, without the header values
# (referer, user agent, the user of Authorization), and with the request id;
# LOG_FORMAT json writes them as JSON (Logger, below).
ACCESS_LOG_FORMAT = '%(h)s - - %(t)s "%(r)s" %(s)s %(b)s %({dm_channels.request_id}e)s'
access_log_format = ACCESS_LOG_FORMAT
# Seconds an idle kept-alive connection stays open (gunicorn's default).
# deploy/nginx.conf.template closes its idle connections to gunicorn sooner
# (keepalive_timeout 1s), so that nginx never sends a request down one that
# gunicorn is closing at that moment.
keepalive = 2
# Trust no X-Forwarded-* header here: the app reads them itself, from as many
# proxies as its TRUSTED_PROXIES setting says (none by default). gunicorn's own
# default trusts X-Forwarded-Proto from 127.0.0.1, whatever that setting.
forwarded_allow_ips = ""
# A worker that is stopped (SIGTERM) finishes its in-flight requests first.
graceful_timeout = 30
# The app answers a query string over app.MAX_QUERY_LENGTH (2048 bytes) with
# its own 414 envelope. This limit leaves room for such a query plus method,
# path and version, so gunicorn's own 414 (an HTML page) only meets request
# lines far beyond anything the app would read; behind nginx, none at all
# (deploy/nginx.conf.template refuses the same lines first).
limit_request_line = 4094


class Logger(glogging.Logger):
    """gunicorn's error and access logs in the app's LOG_FORMAT: with json,
    one object a line, as ops.JsonFormatter writes the app's own lines; an
    access line has the request's id, path, status, method, client address,
    bytes and seconds, and no header value."""

    def setup(self, cfg):
        super().setup(cfg)
        if LOG_FORMAT == "json":
            for handler in self.error_log.handlers + self.access_log.handlers:
                handler.setFormatter(ops.JsonFormatter())

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        if LOG_FORMAT != "json":
            if self.cfg.access_log_format != ACCESS_LOG_FORMAT:
                return super().access(resp, req, environ, request_time)  # a format of yours
            # ACCESS_LOG_FORMAT's line, made from the few values it shows:
            # gunicorn's own way first copies every header and every environ
            # variable of the request into a dict, and costs several times more.
            sent = getattr(resp, "sent", None)
            self.access_log.info(
                '%s - - %s "%s %s %s" %s %s %s',
                environ.get("REMOTE_ADDR", "-"),
                self.now(),
                environ["REQUEST_METHOD"],
                environ["RAW_URI"].replace('"', '\\"'),
                environ["SERVER_PROTOCOL"],
                resp.status_code,
                "-" if sent is None else sent,
                environ.get(ops.REQUEST_ID, "-").replace('"', '\\"'),
            )
            return
        status = resp.status_code
        self.access_log.info(
            "%s %s %s", environ["REQUEST_METHOD"], environ["RAW_URI"], status,
            extra={
                "request_id": environ.get(ops.REQUEST_ID),
                "path": environ.get("PATH_INFO"),
                "status": status,
                "method": environ["REQUEST_METHOD"],
                "client": environ.get("REMOTE_ADDR"),
                "bytes": getattr(resp, "sent", None),
                "duration_seconds": request_time.total_seconds(),
            },
        )


logger_class = Logger


def on_starting(server):
    """Refuse to start, with one line in the log, when the app cannot start
    (a bad setting, a database that cannot be written), instead of letting
    every worker fail to boot with a traceback.

    The check builds the app once in a forked child, exactly as a worker
    would, and throws it away. The master itself never imports the app, so
    workers still open their database connections after the fork and a HUP
    still loads new code.

    With METRICS on, the metrics' directory is set up first; once the check
    is done, it is emptied of the files the check wrote and of any run's before.
    """
    if METRICS:
        metrics_directory(server)
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
    if METRICS:
        wipe_metrics(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if os.waitstatus_to_exitcode(status) != 0:
        on_exit(server)  # gunicorn does not call it when on_starting stops it
        sys.exit(1)


def metrics_directory(server):
    """With METRICS on, prometheus_client's multiprocess mode: each worker
    writes its metrics to files in one directory, and /metrics sums them.
    PROMETHEUS_MULTIPROC_DIR if set, else a new temporary directory, removed
    on exit. Set before any worker starts, so that each imports
    prometheus_client already in that mode."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
    else:
        made = server.dm_channels_metrics_made = tempfile.mkdtemp(prefix="dm-channels-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made


def wipe_metrics(directory):
    # A new run starts from nothing, as prometheus_client's docs require.
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def child_exit(server, worker):
    """A worker is gone (stopped, restarted, killed): its counters and
    histograms stay in the sums (prometheus_client keeps a dead process's
    files), its live gauges (requests in progress, PostgreSQL pool) go."""
    if METRICS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    made = getattr(server, "dm_channels_metrics_made", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
