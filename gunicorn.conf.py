"""gunicorn's settings for dm-channels: gunicorn "app:create_app()" reads this file.

Any of them can be overridden on the command line (--bind 0.0.0.0:8000,
--workers 8) or in GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os
import sys

from dm_channels import logs, ops, settings

try:
    SETTINGS = settings.from_environment()  # ACCESS_LOG, LOG_FORMAT and METRICS are used here
except ValueError:
    SETTINGS = settings.DEFAULTS  # on_starting stops gunicorn with the line naming it

bind = "127.0.0.1:8000"
# Reads scale with processes; SQLite takes one writer at a time whatever the count.
workers = multiprocessing.cpu_count() * 2 + 1
# gthread, but closing a connection never stalls the worker (dm_channels/worker.py).
worker_class = "dm_channels.worker.ThreadWorker"
threads = 4
# Each worker opens its own database connections, after the fork.
preload_app = False
accesslog = "-" if SETTINGS["ACCESS_LOG"] else None
errorlog = "-"
# No header value in the access line; the request id at its end.
access_log_format = logs.ACCESS_LOG_FORMAT
logger_class = logs.GunicornJsonLogger if SETTINGS["LOG_FORMAT"] == "json" else logs.GunicornLogger
# deploy/nginx.conf.template closes its idle connections sooner (1 s), so
# nginx never sends a request down one that gunicorn is closing.
keepalive = 2
# The app reads X-Forwarded-* itself, from TRUSTED_PROXIES proxies (none by default).
forwarded_allow_ips = ""
graceful_timeout = 30
# By default every instance of a user shares one control socket, and
# stopping one removes it under the others.
control_socket_disable = True
# Room for the longest query the app reads (2048 bytes, else its own 414
# envelope) plus method, path and version.
limit_request_line = 4094


def on_starting(server):
    """Warn of each FLASK_* variable nothing reads, once; stop gunicorn with
    one line when the app cannot start; set up the metrics' directory."""
    for line in settings.unread_variables(os.environ):
        server.log.warning("dm-channels: %s", line)
    if SETTINGS["METRICS"]:
        ops.make_metrics_directory(server)
    builds = ops.app_builds(server)
    if SETTINGS["METRICS"]:
        ops.empty_metrics_directory()  # of the check's files, and any earlier run's
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
