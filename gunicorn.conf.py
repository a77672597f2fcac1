"""gunicorn defaults for dm-channels: gunicorn "app:create_app()" reads this file.

Any of these can be overridden on the command line (--bind 0.0.0.0:8000,
--workers 8) or in GUNICORN_CMD_ARGS. The hooks' work is in the package
(dm_channels/ops.py, dm_channels/logs.py).
"""

import multiprocessing
import os
import sys

from dm_channels import logs, ops, settings

try:
    # FLASK_* as the app reads them: ACCESS_LOG, LOG_FORMAT and METRICS are used here.
    SETTINGS = settings.from_environment()
except ValueError:
    SETTINGS = settings.DEFAULTS  # on_starting stops gunicorn with the line naming it

bind = "127.0.0.1:8000"
# Reads scale with processes; SQLite takes one writer at a time whatever the count.
workers = multiprocessing.cpu_count() * 2 + 1
# gunicorn's gthread worker, but closing a connection never stalls its main
# loop for up to 2 s (gunicorn 26+ wait there for the client to close too):
# dm_channels/worker.py says how.
worker_class = "dm_channels.worker.ThreadWorker"
threads = 4
# Never load the app in the master: each worker opens its own database
# connections after the fork (the app opens none at import anyway).
preload_app = False
# A line per request costs about a sixth of a warm get's CPU
# (docs/performance.md); FLASK_ACCESS_LOG=false turns it off, e.g. behind
# nginx, which logs every request itself.
accesslog = "-" if SETTINGS["ACCESS_LOG"] else None
errorlog = "-"
# The access line holds no header value and ends with the request id;
# LOG_FORMAT json writes every line as a JSON object.
access_log_format = logs.ACCESS_LOG_FORMAT
logger_class = logs.GunicornJsonLogger if SETTINGS["LOG_FORMAT"] == "json" else logs.GunicornLogger
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
# No control socket (gunicorn 25.1+, for gunicornc): by default every instance
# of a user shares one path, and stopping one removes it under the others.
control_socket_disable = True
# The app answers a query string over app.MAX_QUERY_LENGTH (2048 bytes) with
# its own 414 envelope. This limit leaves room for such a query plus method,
# path and version, so gunicorn's own 414 (an HTML page) only meets request
# lines far beyond anything the app would read; behind nginx, none at all
# (deploy/nginx.conf.template refuses the same lines first).
limit_request_line = 4094


def on_starting(server):
    """Warn of each FLASK_* variable nothing reads (a misspelt setting), once;
    stop gunicorn with one line when the app cannot start (ops.app_builds);
    with METRICS on, set up the metrics' directory first, and empty it of the
    files the check wrote (and of any run's before)."""
    for line in settings.unread_variables(os.environ):
        server.log.warning("dm-channels: %s", line)
    if SETTINGS["METRICS"]:
        ops.make_metrics_directory(server)
    builds = ops.app_builds(server)
    if SETTINGS["METRICS"]:
        ops.empty_metrics_directory()
    if not builds:
        on_exit(server)  # gunicorn does not call it when on_starting stops it
        sys.exit(1)


def pre_request(worker, req):
    ops.close_after_unread_body(req)


def child_exit(server, worker):
    if SETTINGS["METRICS"]:
        ops.mark_worker_dead(worker.pid)


def on_exit(server):
    ops.remove_metrics_directory(server)
