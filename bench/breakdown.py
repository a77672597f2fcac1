"""Where a request's time goes, in-process: no server, no network.

    .venv/bin/python -m bench.breakdown           # about two minutes
    .venv/bin/python -m bench.breakdown --quick   # a smoke run

First, requests on one thread, called as gunicorn calls the app (its WSGI
callable), beside a bare Flask request (bench/ceiling.py): a warm get as
shipped, with METRICS on, without request ids (init_app alone, as a host
mounts it), and with no answer kept (CHANNEL_CACHE_SIZE=0); then the steps a
kept answer skips. Rounds are interleaved; each figure is the median over
rounds of microseconds per request, and each ratio the median of the rounds'.

Then creates with synchronous=FULL from 4 processes of 4 threads each, as 4
gunicorn workers of 4 threads make them: as shipped (a process's creates
waiting written together, in turns among processes) and each create its own
INSERT, waiting in SQLite's own busy handler alone; creates a second, p99 and CPU per create,
rounds interleaved. bench/run.py measures the whole service
under gunicorn; this says which step costs what.
"""

import argparse
import io
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from flask import Flask
from werkzeug.datastructures import MultiDict

from bench.ceiling import app as ceiling
from dm_channels import schemas
from dm_channels.app import create_app, init_app

from dm_channels.store import FIND, Store, _channel, create_many

PATH = "/api/messaging/dm-channel"


def environ(query):
    return {
        "REQUEST_METHOD": "GET", "PATH_INFO": PATH, "QUERY_STRING": query,
        "SERVER_NAME": "bench", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
    }


def start_response(status, headers, exc_info=None):
    if not status.startswith("200"):
        raise RuntimeError(status)


def request(app, query):
    return lambda: b"".join(app.wsgi_app(environ(query), start_response))


def per_call(step, n):
    began = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - began) / n * 1e6


def interleaved(steps, rounds, n):
    """{name: [µs per call, a round each]}, every step in turn, round after round."""
    for step in steps.values():
        per_call(step, 100)  # connections open, answers kept
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(per_call(step, n))
    return times


def host(database):
    """The service as a host app mounts it: init_app alone, no request ids."""
    app = Flask("bench-host")
    app.json.sort_keys = False  # as create_app
    app.config["DATABASE"] = database
    init_app(app)
    return app


def requests_table(folder, rounds, n):
    database = str(folder / "dm.sqlite3")
    apps = {
        "service: warm get, answer kept (as shipped)": create_app({"DATABASE": database}),
        "  with METRICS on": create_app({"DATABASE": database, "METRICS": True}),
        "  without request ids (init_app alone)": host(database),
        "service: warm get, no answer kept (cache 0)": create_app(
            {"DATABASE": database, "CHANNEL_CACHE_SIZE": 0}
        ),
    }
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    query = f"userId1={a}&userId2={b}"
    store = apps["service: warm get, no answer kept (cache 0)"].extensions["dm_channels"].store
    channel, _ = store.get_or_create_dm(a, b)
    answer = schemas.DMChannelData()
    body = {"success": True, "data": answer.dump({"channel": channel, "created": False})}
    args = MultiDict({"userId1": a, "userId2": b})  # as request.args gives it
    query_schema = schemas.DMChannelQuery()
    steps = {
        "bare Flask request (the ceiling)": lambda: b"".join(
            ceiling.wsgi_app(environ(query), start_response)
        ),
        **{name: request(app, query) for name, app in apps.items()},
        "  store: read of an existing pair": lambda: store.get_or_create_dm(a, b),
        "  marshmallow: load of the query": lambda: query_schema.load(args),
        "  marshmallow: dump of the answer": lambda: answer.dump({"channel": channel, "created": False}),
        "  Flask's JSON provider: the answer's bytes": lambda: ceiling.json.dumps(body),
    }
    times = interleaved(steps, rounds, n)
    bare = times["bare Flask request (the ceiling)"]
    print(f"one thread, µs per request (median of {rounds} interleaved rounds of {n:,}):")
    for name, runs in times.items():
        line = f"  {name:<52} {statistics.median(runs):7.1f}"
        if name.startswith(("service", "  with", "  without")):
            ratio = statistics.median(t / b for t, b in zip(runs, bare))
            line += f"  {ratio:.2f} x bare Flask"
        print(line)


def plain_writes(store):
    """Creates as SQLite alone serves them: each one INSERT, its own
    transaction, waiting in SQLite's busy handler up to BUSY_TIMEOUT."""

    def create(key):
        rows = store._connection().execute(create_many(1), (*key, uuid.uuid4().bytes)).fetchall()
        return _channel(rows[0] if rows else store._one(FIND, key)), bool(rows)

    store._create = create


def create_loop(path, threads, seconds, plain, results):
    store = Store(path)
    if plain:
        plain_writes(store)
    waits = [[] for _ in range(threads)]
    failed = [0] * threads
    until = time.monotonic() + seconds

    def loop(i):
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                store.get_or_create_dm(str(uuid.uuid4()), str(uuid.uuid4()))
            except Exception:
                failed[i] += 1
            waits[i].append(time.perf_counter() - began)

    cpu = time.process_time()
    running = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    results.put(([w for ws in waits for w in ws], sum(failed), time.process_time() - cpu))


def creates(path, plain, processes=4, threads=4, seconds=5):
    """(creates a second, p99 ms, CPU µs per create, failures) from processes x threads."""
    results = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=create_loop, args=(path, threads, seconds, plain, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    done = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    waits = sorted(w for ws, _, _ in done for w in ws)
    return (
        len(waits) / seconds,
        waits[int(len(waits) * 0.99)] * 1000,
        sum(cpu for _, _, cpu in done) / len(waits) * 1e6,
        sum(failed for _, failed, _ in done),
    )


def creates_table(folder, rounds, seconds):
    ways = {"creates waiting written together (as shipped)": False,
            "plain INSERT, SQLite's busy timeout": True}
    figures = {name: [] for name in ways}
    for r in range(rounds):
        for name, plain in ways.items():
            path = folder / f"creates-{r}-{plain}.sqlite3"
            Store(path).init_schema()
            figures[name].append(creates(path, plain, seconds=seconds))
    print(
        f"creates, synchronous=FULL, 4 processes x 4 threads "
        f"(median of {rounds} interleaved rounds of {seconds} s):"
    )
    for name, runs in figures.items():
        rate, p99, cpu, failed = (statistics.median(column) for column in zip(*runs))
        print(
            f"  {name:<46} {rate:7,.0f} creates/s  p99 {p99:5.1f} ms  "
            f"{cpu:5.0f} µs CPU per create  {failed:.0f} failed"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of requests (7)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a round or two, short")
    args = parser.parse_args()
    rounds, n, create_rounds, seconds = (args.rounds, 3_000, 3, 5)
    if args.quick:
        rounds, n, create_rounds, seconds = (2, 200, 1, 1)
    folder = Path(tempfile.mkdtemp(prefix="dm-breakdown-"))
    try:
        print(f"{os.cpu_count()} cores; Python {sys.version.split()[0]}")
        requests_table(folder, rounds, n)
        creates_table(folder, create_rounds, seconds)
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
