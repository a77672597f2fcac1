"""gunicorn defaults for dm-channels: gunicorn "app:create_app()" reads this file.

Any of these can be overridden on the command line (--bind 0.0.0.0:8000,
--workers 8) or in GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os
import sys

bind = "127.0.0.1:8000"
# Reads scale with processes; SQLite takes one writer at a time whatever the count.
workers = multiprocessing.cpu_count() * 2 + 1
worker_class = "gthread"
threads = 4
# Never load the app in the master: each worker opens its own database
# connections after the fork (the app opens none at import anyway).
preload_app = False
accesslog = "-"
errorlog = "-"
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


def on_starting(server):
    """Refuse to start, with one line in the log, when the app cannot start
    (a bad setting, a database that cannot be written), instead of letting
    every worker fail to boot with a traceback.

    The check builds the app once in a forked child, exactly as a worker
    would, and throws it away. The master itself never imports the app, so
    workers still open their database connections after the fork and a HUP
    still loads new code.
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
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(1)
