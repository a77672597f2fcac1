"""gunicorn's settings and hooks for dm-channels (`-c python:dm_channels.gunicorn_conf`, or a checkout's conf)."""

import multiprocessing
import os
import sys

from dm_channels import logs, ops, settings

try:
    SETTINGS = settings.from_environment()  # for ACCESS_LOG, LOG_FORMAT and METRICS
except ValueError:
    SETTINGS = settings.DEFAULTS  # on_starting stops gunicorn with the line naming it

bind = "127.0.0.1:8000"
workers = multiprocessing.cpu_count() * 2 + 1
worker_class = "dm_channels.worker.ThreadWorker"
threads = 4
preload_app = False  # each worker opens its own database connections
accesslog = "-" if SETTINGS["ACCESS_LOG"] else None
errorlog = "-"
access_log_format = logs.ACCESS_LOG_FORMAT
logger_class = logs.GunicornJsonLogger if SETTINGS["LOG_FORMAT"] == "json" else logs.GunicornLogger
# Longer than nginx's 1 s (deploy/nginx.conf.template): nginx never reuses a connection gunicorn is closing.
keepalive = 2
forwarded_allow_ips = ""  # the app reads X-Forwarded-* itself, with TRUSTED_PROXIES
graceful_timeout = 30
# Otherwise one user's instances share one control socket, and stopping one removes it under the others.
control_socket_disable = True
# The longest query the app reads (2048 bytes) plus method, path and version.
limit_request_line = 4094


def on_starting(server):
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
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    ops.remove_metrics_directory(server)
