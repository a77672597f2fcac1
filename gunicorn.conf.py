"""gunicorn defaults for dm-channels: gunicorn "app:create_app()" reads this file.

Any of these can be overridden on the command line (--bind 0.0.0.0:8000,
--workers 8) or in GUNICORN_CMD_ARGS.
"""

import multiprocessing

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
# A worker that is stopped (SIGTERM) finishes its in-flight requests first.
graceful_timeout = 30
