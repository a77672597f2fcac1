"""Where a request's time goes, in-process: no server, no network.

    .venv/bin/python -m bench.breakdown

Times each step of the hot path on one thread (microseconds per call, the
median of 5 runs), next to a bare Flask request (bench/ceiling.py); then
creates with synchronous=FULL from 4 processes of 4 threads, committed one at
a time and in batches (the store's group commit). bench/run.py measures the
whole service under gunicorn; this says which step costs what.
"""

import io
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.ceiling import app as ceiling
from dm_channels import schemas
from dm_channels.app import create_app
from dm_channels.store import Store

PATH = "/api/messaging/dm-channel"


def environ(query):
    return {
        "REQUEST_METHOD": "GET", "PATH_INFO": PATH, "QUERY_STRING": query,
        "SERVER_NAME": "bench", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
    }


def per_call(step, n=5_000):
    """Median over 5 runs of the microseconds one call of step() takes."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            step()
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs)


def request(wsgi, query):
    return lambda: b"".join(wsgi(environ(query), lambda status, headers, exc_info=None: None))


def creates(path, processes, threads, seconds, batched):
    """Creates per second and CPU µs per create, from processes x threads."""
    results = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=create_loop, args=(path, threads, seconds, batched, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    done = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    count = sum(n for n, _ in done)
    return count / seconds, sum(cpu for _, cpu in done) / count * 1e6


def create_loop(path, threads, seconds, batched, results):
    store = Store(path)
    if not batched:  # one create per commit: each its own batch
        one_at_a_time = threading.Lock()
        create = store._create

        def alone(key):
            with one_at_a_time:
                return create(key)

        store._create = alone
    count = [0] * threads
    until = time.monotonic() + seconds

    def loop(i):
        while time.monotonic() < until:
            store.get_or_create_dm(str(uuid.uuid4()), str(uuid.uuid4()))
            count[i] += 1

    cpu = time.process_time()
    running = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    results.put((sum(count), time.process_time() - cpu))


def main():
    folder = Path(tempfile.mkdtemp(prefix="dm-breakdown-"))
    app = create_app({"DATABASE": str(folder / "dm.sqlite3")})
    uncached = create_app({"DATABASE": str(folder / "dm.sqlite3"), "CHANNEL_CACHE_SIZE": 0})
    store = app.extensions["dm_channels"]
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    query = f"userId1={a}&userId2={b}"
    channel, _ = store.get_or_create_dm(a, b)
    fast = app.extensions["dm_channels_fastpath"]
    answer = fast.answer
    body = schemas.dump(answer, {"data": {"channel": channel, "created": False}})
    flask_only = fast.wsgi_app

    print("one thread, µs per call (median of 5 runs):")
    for name, step in [
        ("bare Flask request (the ceiling)", request(ceiling.wsgi_app, query)),
        ("service: warm get, cached answer", request(app.wsgi_app, query)),
        ("service: warm get, not cached (read, dump, JSON)", request(uncached.wsgi_app, query)),
        ("  store: read of an existing pair", lambda: store.get_or_create_dm(a, b)),
        ("  marshmallow: dump of the answer", lambda: schemas.dump(answer, {"data": {"channel": channel, "created": False}})),
        ("  Flask's JSON provider: the answer's bytes", lambda: app.json.response(body).get_data()),
        ("service, Flask alone (no fast path, no request layer)", request(flask_only, query)),
        ("service: the fast path's cached answer alone", request(fast, query)),
    ]:
        print(f"  {name:<52} {per_call(step):8.1f}")
    for synchronous in ("FULL", "NORMAL"):
        one = Store(folder / f"{synchronous}.sqlite3", synchronous=synchronous)
        cost = per_call(lambda: one.get_or_create_dm(str(uuid.uuid4()), str(uuid.uuid4())), 500)
        print(f"  {'store: create, synchronous=' + synchronous:<52} {cost:8.1f}")
        one.close()

    print("creates, synchronous=FULL, 4 processes x 4 threads, 5 s each:")
    for batched in (False, True):
        path = folder / f"batched-{batched}.sqlite3"
        Store(path).init_schema()
        rate, cpu = creates(path, 4, 4, 5, batched)
        name = "group commit (as shipped)" if batched else "one create per commit"
        print(f"  {name:<28} {rate:8,.0f} creates/s  {cpu:6.0f} µs CPU per create")


if __name__ == "__main__":
    main()
