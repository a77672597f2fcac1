"""What ops.RequestLayer costs a request, measured in-process.

    .venv/bin/python -m bench.ops_cost            # under a minute

The WSGI callables are called directly (no server, no socket), in two sets:
the layer around an app that answers at once (the layer's own cost, with
little else to blur it), and a warm get of one existing pair through the
service (what that cost is next to a real request). Each set three ways:
without the layer, the layer with METRICS off (request ids only: the
default), and with METRICS on. prometheus_client runs in its multiprocess
mode, as under gunicorn.conf.py (files in a temporary directory). Rounds are
interleaved; each figure is the median over rounds of microseconds per
request, and each difference the median of the rounds' differences.
"""

import argparse
import atexit
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

# Before prometheus_client is imported: it picks its mode then.
WORKDIR = tempfile.mkdtemp(prefix="dm-ops-cost-")
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
os.makedirs(os.path.join(WORKDIR, "metrics"))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(WORKDIR, "metrics")

from dm_channels.app import create_app  # noqa: E402
from dm_channels.ops import RequestLayer  # noqa: E402

A = "3c90c3cc-0d44-4b50-8888-8dd25736052a"
B = "0b1e2c4d-9f1a-4c2e-8d7b-1a2b3c4d5e6f"


def environ():
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/messaging/dm-channel",
        "QUERY_STRING": f"userId1={A}&userId2={B}",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def start_response(status, headers, exc_info=None):
    if not status.startswith("200"):
        raise RuntimeError(status)


def per_request(wsgi, count):
    began = time.perf_counter()
    for _ in range(count):
        body = wsgi(environ(), start_response)
        getattr(body, "close", lambda: None)()
    return (time.perf_counter() - began) / count * 1e6


def nothing(environ, start_response):
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]


def measure(ways, rounds, count, relative=True):
    for wsgi in ways.values():
        per_request(wsgi, 200)  # the pair exists, connections are open
    figures = {name: [] for name in ways}
    for _ in range(rounds):
        for name, wsgi in ways.items():
            figures[name].append(per_request(wsgi, count))
    base_name, *_ = ways
    base = figures[base_name]
    for name, times in figures.items():
        line = f"  {name:34} {statistics.median(times):7.1f} µs"
        if name != base_name:
            extra = statistics.median(way - alone for way, alone in zip(times, base))
            share = f", {extra / statistics.median(base):+.1%}" if relative else ""
            line += f"  ({extra:+.1f} µs{share})"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=2000, help="per round and way")
    args = parser.parse_args()

    database = os.path.join(WORKDIR, "bench.sqlite3")
    off = create_app({"DATABASE": database})
    on = create_app({"DATABASE": database, "METRICS": True})
    print(f"per request, in-process, median of {args.rounds} rounds of {args.requests}:")
    measure(
        {
            "an app that answers at once": nothing,
            "  in the layer, METRICS off": RequestLayer(nothing, off),
            "  in the layer, METRICS on": RequestLayer(nothing, on),
        },
        args.rounds, args.requests, relative=False,
    )
    measure(
        {
            "warm get, Flask alone": off.wsgi_app.wsgi_app,
            "  in the layer, METRICS off": off.wsgi_app,
            "  in the layer, METRICS on": on.wsgi_app,
        },
        args.rounds, args.requests,
    )


if __name__ == "__main__":
    main()
