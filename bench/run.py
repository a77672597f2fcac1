"""Benchmark the service against its ceiling, a bare Flask app, with wrk.

    .venv/bin/python -m bench.run            # the full run: a few minutes
    .venv/bin/python -m bench.run --quick    # a smoke run: well under a minute

Starts gunicorn serving the service on fresh databases and, beside it, the
ceiling (bench/ceiling.py) under the very same settings (gunicorn.conf.py,
4 workers); drives them with wrk (bench/workload.lua), rounds interleaved;
prints one line per workload and a markdown table of the issue's figures.
Ratios within one run are what count: absolute numbers depend on the machine.
"""

import argparse
import json
import os
import platform
import random
import runpy
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from dm_channels.app import is_postgres_url, open_store
from dm_channels.settings import DEFAULTS
from dm_channels.store import Channel

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = ROOT / "bench" / "workload.lua"
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
PATH = "/api/messaging/dm-channel"


def known_pair(i):
    """Preloaded pair i, the same ids as known_pair() in bench/workload.lua."""
    h = i * 2654435761 % 2**32
    return f"{h:08x}-b0b0-4000-8000-{i:012x}", f"{h:08x}-b0b0-4000-9000-{i:012x}"


def preload(database, count, batch=100_000):
    """Give pairs 0 .. count-1 a channel, through the store, in bulk."""
    channels = open_store(database)
    now = datetime.now(timezone.utc)
    for start in range(0, count, batch):
        channels.add_channels(
            Channel(str(uuid.uuid4()), *known_pair(i), now)
            for i in range(start, min(start + batch, count))
        )
    channels.close()
    return count_channels(database)


def count_channels(database):
    channels = open_store(database)
    try:
        return channels.count()
    finally:
        channels.close()


def bytes_per_channel(database, count):
    """File bytes per channel: on SQLite the main file plus -wal after a full
    checkpoint; on PostgreSQL the table with its indexes and TOAST."""
    if is_postgres_url(database):
        import psycopg

        with psycopg.connect(database, autocommit=True) as conn:
            (size,) = conn.execute("SELECT pg_total_relation_size('dm_channel')").fetchone()
        return size / count
    with closing(sqlite3.connect(database)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        raise RuntimeError(f"could not checkpoint {database}")
    files = [database, database + "-wal"]
    return sum(os.path.getsize(f) for f in files if os.path.exists(f)) / count


def free_port():
    """A port no one listens on, below Linux's ephemeral range (32768-60999)
    so that no client's outgoing connection takes it before the server binds."""
    while True:
        port = random.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # free on every address: some servers bind 0.0.0.0
            except OSError:
                continue
            return port


class Server:
    """gunicorn with gunicorn.conf.py, in its own process group; `settings`
    overrides some of the file's (e.g. {"worker_class": "sync"})."""

    def __init__(self, name, app, workers, workdir, env=None, settings=None, root=ROOT):
        self.name = name
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / f"{name}.log"
        conf = root / "gunicorn.conf.py"
        if settings:
            conf = workdir / f"{name}.conf.py"
            # gunicorn.conf.py as it is, then these.
            conf.write_text(
                f"__file__ = {str(root / 'gunicorn.conf.py')!r}\n"
                f"exec(compile(open(__file__).read(), __file__, 'exec'))\n"
                + "".join(f"{key} = {value!r}\n" for key, value in settings.items())
            )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "gunicorn",
                    "--config", str(conf),
                    "--bind", self.url.removeprefix("http://"),
                    "--workers", str(workers),
                    app,
                ],
                cwd=root,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers = workers

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            booted = self.log_path.read_text(errors="replace").count("Booting worker")
            if booted >= self.workers:
                try:
                    urllib.request.urlopen(self.url + "/", timeout=5)
                except urllib.error.HTTPError:
                    return self  # a 404 from a worker: it answers
                except OSError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text()}")

    def body(self, query):
        with urllib.request.urlopen(self.url + PATH + query, timeout=10) as response:
            return response.read()

    def workers_stat(self):
        """/proc/<pid>/stat fields (after the command name) of each worker."""
        stats = {}
        for entry in os.listdir("/proc"):
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(self.process.pid):
                stats[int(entry)] = fields
        return stats

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the workers."""
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(int(f[11]) + int(f[12]) for f in self.workers_stat().values()) / ticks

    def worker_rss_mb(self):
        """Resident memory (VmRSS) of each worker process, in MB."""
        sizes = []
        for pid in self.workers_stat():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return sizes

    def stop(self):
        try:
            self.process.send_signal(signal.SIGTERM)  # to the master alone: it stops its workers
            self.process.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wrk(server, mode, count, seconds, connections):
    """One wrk run against server; returns its figures (latencies in ms)."""
    command = [
        "wrk", "--threads", "2", "--connections", str(connections),
        "--duration", f"{seconds}s", "--timeout", "10s", "--script", str(SCRIPT),
        server.url + PATH, "--", mode, str(count), str(random.randrange(2**31)),
    ]
    cpu = server.cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    cpu = server.cpu_seconds() - cpu
    for line in done.stdout.splitlines():
        if line.startswith("WRK "):
            run = json.loads(line[4:])
            return {
                "rps": run["requests"] / (run["duration_us"] / 1e6),
                "requests": run["requests"],
                "p50": run["p50_us"] / 1000,
                "p99": run["p99_us"] / 1000,
                "non_2xx": run["non_2xx"],
                "socket_errors": run["socket_errors"],
                "cpu_us": cpu * 1e6 / max(run["requests"], 1),
            }
    raise RuntimeError(f"wrk gave no figures:\n{done.stdout}{done.stderr}")


def interleaved(args, *targets):
    """args.rounds rounds of wrk on each target in turn, each a (server, mode,
    count); returns one list of runs per target."""
    runs = [[] for _ in targets]
    for _ in range(args.rounds):
        for (server, mode, count), into in zip(targets, runs):
            into.append(wrk(server, mode, count, args.duration, args.connections))
    return runs


def summary(runs):
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50": statistics.median(r["p50"] for r in runs),
        "p99": statistics.median(r["p99"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "cpu_us": statistics.median(r["cpu_us"] for r in runs),
    }


def median_ratio(tops, bottoms, key="rps"):
    """The median over rounds of top/bottom, and every round's ratio."""
    ratios = [t[key] / b[key] for t, b in zip(tops, bottoms)]
    return statistics.median(ratios), ratios


def describe(label, s):
    errors = f"non-2xx {s['non_2xx']}"
    if s["socket_errors"]:
        errors += f", socket errors {s['socket_errors']}"
    return (
        f"{label} {s['rps']:,.0f} req/s  p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms  "
        f"{errors}  cpu {s['cpu_us']:.0f} us/req"
    )


def compare(name, label_a, runs_a, label_b, runs_b):
    """Print a workload's line (a's figures | b's figures | a/b) and return
    the median ratio of requests/s and of p99, with both sides' summaries."""
    a, b = summary(runs_a), summary(runs_b)
    ratio, ratios = median_ratio(runs_a, runs_b)
    p99_ratio, _ = median_ratio(runs_a, runs_b, "p99")
    print(
        f"{name:<9} {describe(label_a, a)} | {describe(label_b, b)} | "
        f"ratio {ratio:.2f} (rounds: {' '.join(f'{r:.2f}' for r in ratios)})",
        flush=True,
    )
    return {"ratio": ratio, "p99_ratio": p99_ratio, "a": a, "b": b}


def throughput(r):
    return (
        f"{r['a']['rps']:,.0f} / {r['b']['rps']:,.0f} req/s; CPU "
        f"{r['a']['cpu_us']:.0f} / {r['b']['cpu_us']:.0f} us per request"
    )


def row(figure, target, measured, met, width):
    """A figure measured once: in the first column, and `width` columns in all."""
    mark = "" if met else " **(no)**"
    return f"| {figure} | {target} | {measured}{mark} |" + " |" * (width - 1)


# The gunicorn settings measured, as overrides of gunicorn.conf.py: the
# service and the ceiling under each; the ceiling alone under BARE.
SETTINGS = {
    "default": {},
    "fastest": {"accesslog": None},
}
BARE = {"worker_class": "sync", "accesslog": None}
SETTINGS_NAMES = {
    "default": "gunicorn.conf.py as shipped",
    "fastest": "gunicorn.conf.py without its access log",
    "bare": "the service as shipped / the ceiling on sync workers without access log",
    "before": "the service of --before, as its gunicorn.conf.py ships it / the ceiling as shipped",
}
COLUMNS = ("default", "fastest", "bare", "before")

# (workload, wrk mode, the figure's name, its target)
WORKLOADS = ("warm", "held", "spread", "create", "mixed", "scale")
TARGETS = {"warm": 0.98, "held": 0.95, "spread": 0.80, "create": 0.48, "mixed": 0.85, "scale": 0.95}
HELD = DEFAULTS["CHANNEL_CACHE_SIZE"]  # the held workload's pairs: as many as the default cache keeps
P99_TARGETS = {"warm": 1.5, "create": 3.0}


def markdown(results, rss, args, conf):
    """The docs' table of the issue's figures, from this run."""
    columns = [c for c in COLUMNS if any(c in r for r in results.values())]
    lines = [
        f"{os.cpu_count()} cores; gunicorn {args.workers} workers "
        f"({conf.get('worker_class', 'sync')}, {conf.get('threads', 1)} threads), "
        f"wrk {args.connections} connections, `synchronous={args.synchronous}`; "
        f"median of {args.rounds} interleaved rounds of {args.duration} s. Columns: "
        + "; ".join(f"**{c}**: {SETTINGS_NAMES[c]}" for c in columns) + ".",
        "",
        "| figure | target | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]

    def cells(workload, show, met):
        out = []
        for column in columns:
            r = results[workload].get(column)
            out.append("-" if r is None else show(r) + ("" if met(r) else " **(no)**"))
        return out

    names = {
        "warm": "warm get (one pair): requests/s, service / ceiling",
        "held": f"gets spread over {min(HELD, args.pairs):,} existing pairs, each worker's cache filled first: "
                "requests/s, service / ceiling",
        "spread": f"gets spread over {args.pairs:,} existing pairs: requests/s, service / ceiling",
        "create": "create (`synchronous=FULL`): requests/s, service / ceiling",
        "mixed": f"mixed (95% of {args.pairs:,} existing, 5% new): requests/s, service / ceiling",
    }
    for workload, name in names.items():
        if workload not in results:
            continue
        target = TARGETS[workload]
        lines.append(f"| {name} | >= {target:.2f} | " + " | ".join(cells(
            workload, lambda r: f"{r['ratio']:.2f} ({r['a']['rps']:,.0f} / {r['b']['rps']:,.0f})",
            lambda r, t=target: r["ratio"] >= t,
        )) + " |")
        if workload in P99_TARGETS:
            target = P99_TARGETS[workload]
            lines.append(f"| {workload}: p99 latency, service / ceiling | <= {target} | " + " | ".join(cells(
                workload,
                lambda r: f"{r['p99_ratio']:.2f} ({r['a']['p99']:.1f} / {r['b']['p99']:.1f} ms)",
                lambda r, t=target: r["p99_ratio"] <= t,
            )) + " |")
        if workload == "create":
            for column in columns:
                if "durable" in results["create"].get(column, {}):
                    acknowledged, committed = results["create"][column]["durable"]
                    lines.append(row(
                        f"create ({column}): acknowledged channels committed", "all",
                        f"{committed:,} committed of {acknowledged:,} acknowledged",
                        committed >= acknowledged, len(columns),
                    ))
    if "scale" in results:
        for key, what in (("cached", "as shipped"), ("uncached", "`CHANNEL_CACHE_SIZE=0`, the store alone")):
            r = results["scale"][key]
            lines.append(row(
                f"gets spread over {r['large']:,} / over {args.small:,} pairs ({what}): requests/s",
                ">= 0.95", f"{r['ratio']:.2f} ({r['a']['rps']:,.0f} / {r['b']['rps']:,.0f})",
                r["ratio"] >= 0.95, len(columns),
            ))
        r = results["scale"]
        if r["bytes"] is not None:
            lines.append(row(
                f"database bytes per channel at {r['large']:,} channels", "<= 250",
                f"{r['bytes']:.0f}", r["bytes"] <= 250, len(columns),
            ))
    errors = sum(
        c[side]["non_2xx"] + c[side]["socket_errors"]
        for r in results.values() for c in r.values() if isinstance(c, dict) and "a" in c
        for side in "ab"
    )
    lines.append(row(
        "non-2xx answers and socket errors, all runs", "0", f"{errors}", not errors, len(columns)
    ))
    if rss:
        rss = max(rss)
        lines.append(row(
            "resident memory per worker after the run (VmRSS, largest)", "<= 60 MB",
            f"{rss:.0f} MB", rss <= 60, len(columns),
        ))
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per workload (5)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (3)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (4)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument(
        "--pairs", type=int, default=100_000,
        help="preloaded pairs the spread and mixed workloads draw from (100,000)",
    )
    parser.add_argument("--small", type=int, default=1_000, help="small scale store (1,000)")
    parser.add_argument(
        "--large", type=int, default=1_000_000, help="large scale store (1,000,000)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: 2 workers, no warm-up or fill, 1 round of 1 s, 1,000 pairs, large store of 10,000, "
        "default settings only",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (all)",
    )
    parser.add_argument(
        "--settings", default=None,
        help="comma-separated subset of default,fastest,bare: the gunicorn settings compared (all; default with --quick)",
    )
    for name, which in (("database", "main"), ("fast-database", "fastest settings' main"),
                        ("small-database", "small scale"), ("large-database", "large scale")):
        parser.add_argument(
            f"--{name}",
            help=f"DATABASE of the {which} store, empty (default: a new SQLite file)",
        )
    parser.add_argument(
        "--synchronous", default="FULL",
        help="the service's SQLITE_SYNCHRONOUS (FULL, the targets' setting)",
    )
    parser.add_argument(
        "--before",
        help="a checkout of an earlier version (e.g. a git worktree) to measure beside this "
        "one: its service, under its own gunicorn.conf.py, is column 'before'",
    )
    parser.add_argument(
        "--warm-up", type=int, default=1,
        help="seconds of gets over each server's pairs before the rounds (1): every worker opens its connections",
    )
    parser.add_argument(
        "--fill", type=int, default=40,
        help=f"seconds of gets over the held workload's {HELD:,} pairs on each service before its rounds (40): "
        "each worker's answer cache mostly filled, as in a service that has run a while",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.rounds, args.duration, args.pairs, args.large = 2, 1, 1, 1_000, 10_000
        args.warm_up = args.fill = 0
    if args.settings is None:
        args.settings = "default" if args.quick else "default,fastest,bare"
    args.workloads = args.workloads.split(",")
    if not set(args.workloads) <= set(WORKLOADS):
        parser.error(f"--workloads: choose from {','.join(WORKLOADS)}")
    args.settings = args.settings.split(",")
    if not set(args.settings) <= {"default", "fastest", "bare"} or "default" not in args.settings:
        parser.error("--settings: choose from default,fastest,bare (default among them)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit(
            "bench/run.py needs wrk, the HTTP load generator, and it is not on PATH.\n"
            "Install it (Debian/Ubuntu): apt-get install wrk"
        )
    workdir = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    try:
        benchmark(args, workdir)
    except BaseException:
        print(f"\nthe servers' logs are kept in {workdir}", file=sys.stderr)
        raise
    if args.keep:
        print(f"\nkept {workdir}")
    else:
        shutil.rmtree(workdir)


MODES = {"warm": ("one", 1), "held": ("existing", HELD), "spread": ("existing", None), "create": ("create", 1),
         "mixed": ("mixed", None)}


def benchmark(args, workdir):
    """Preload, start the servers, run every workload; print the figures."""
    databases = {
        "default": args.database or str(workdir / "main.sqlite3"),
        "fastest": args.fast_database or str(workdir / "fast.sqlite3"),
        "before": str(workdir / "before.sqlite3"),
    }
    small_db = args.small_database or str(workdir / "small.sqlite3")
    large_db = args.large_database or str(workdir / "large.sqlite3")
    conf = runpy.run_path(str(GUNICORN_CONF))
    scale = "scale" in args.workloads
    print(
        f"machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}\n"
        f"gunicorn: {args.workers} workers, worker_class {conf.get('worker_class', 'sync')}, "
        f"threads {conf.get('threads', 1)}; wrk: {args.connections} connections; "
        f"{args.rounds} rounds of {args.duration} s per workload; "
        f"synchronous={args.synchronous}; settings compared: {', '.join(args.settings)}",
        flush=True,
    )

    started = time.monotonic()
    results = {}
    per_channel = None
    measured = [s for s in SETTINGS if s in args.settings] + (["before"] if args.before else [])
    for setting in measured:
        preload(databases[setting], args.pairs)
    if scale:
        preload(small_db, args.small)
        large = preload(large_db, args.large)
        per_channel = bytes_per_channel(large_db, large)
        print(f"preloaded {large:,} channels in {time.monotonic() - started:.1f} s", flush=True)

    env = {"FLASK_SQLITE_SYNCHRONOUS": args.synchronous}
    servers = {}

    def start(name, app, database=None, settings=None, extra=None, root=ROOT):
        env_of = {**env, **(extra or {})}
        if database:
            env_of["FLASK_DATABASE"] = database
        servers[name] = Server(name, app, args.workers, workdir, env_of, settings, root)

    try:
        for setting, overrides in SETTINGS.items():
            if setting in args.settings:
                start(f"ceiling-{setting}", "bench.ceiling:app", settings=overrides)
                start(f"service-{setting}", "app:create_app()", databases[setting], overrides)
        if "bare" in args.settings:
            start("ceiling-bare", "bench.ceiling:app", settings=BARE)
        if args.before:
            start("service-before", "app:create_app()", databases["before"], root=Path(args.before).resolve())
        if scale:
            for cache, extra in (("cached", None), ("uncached", {"FLASK_CHANNEL_CACHE_SIZE": "0"})):
                start(f"small-{cache}", "app:create_app()", small_db, extra=extra)
                start(f"large-{cache}", "app:create_app()", large_db, extra=extra)
        for server in servers.values():
            server.wait_ready()
        if args.warm_up:  # gets of the pairs each store has: every worker opens its connections
            for name, server in servers.items():
                count = args.small if name.startswith("small") else args.large if name.startswith("large") else args.pairs
                wrk(server, "existing", count, args.warm_up, args.connections)
        query = "?userId1=%s&userId2=%s" % known_pair(0)
        print(
            f"body of a warm get: service {len(servers['service-default'].body(query))} bytes, "
            f"ceiling {len(servers['ceiling-default'].body(query))} bytes",
            flush=True,
        )

        for workload in args.workloads:
            if workload == "scale":
                continue
            mode, count = MODES[workload]
            count = min(count or args.pairs, args.pairs)
            names = [n for n in servers if n.startswith(("ceiling-", "service-"))]
            if workload == "held" and args.fill:
                for name in names:
                    if name.startswith("service-"):
                        wrk(servers[name], mode, count, args.fill, args.connections)
            before = {s: count_channels(databases[s]) for s in measured}
            runs = dict(zip(names, interleaved(args, *((servers[n], mode, count) for n in names))))
            results[workload] = {}
            pairs = [(s, f"service-{s}", f"ceiling-{s}") for s in SETTINGS if s in args.settings]
            if "bare" in args.settings:
                pairs.append(("bare", "service-default", "ceiling-bare"))
            if args.before:
                pairs.append(("before", "service-before", "ceiling-default"))
            for column, service, ceiling in pairs:
                results[workload][column] = compare(
                    f"{workload} [{column}]", "service", runs[service], "ceiling", runs[ceiling]
                )
            if workload == "create":
                for setting in before:
                    acknowledged = sum(r["requests"] - r["non_2xx"] for r in runs[f"service-{setting}"])
                    committed = count_channels(databases[setting]) - before[setting]
                    results["create"][setting]["durable"] = (acknowledged, committed)
                    print(
                        f"create [{setting}]: {acknowledged:,} channels acknowledged, "
                        f"{committed:,} committed (requests in flight when wrk stops may add a few)",
                        flush=True,
                    )

        if scale:
            # Each store is asked for pairs drawn from all of its own.
            runs = interleaved(
                args,
                *((servers[f"{size}-{cache}"], "existing", n)
                  for cache in ("cached", "uncached") for size, n in (("small", args.small), ("large", large))),
            )
            results["scale"] = {"large": large, "bytes": per_channel}
            for i, cache in enumerate(("cached", "uncached")):
                results["scale"][cache] = compare(
                    f"scale [{cache}]", f"{large:,}:", runs[2 * i + 1], f"{args.small:,}:", runs[2 * i]
                )
                results["scale"][cache]["large"] = large

        rss = {name: s.worker_rss_mb() for name, s in servers.items()}
        print(
            "resident memory per worker (VmRSS, MB): "
            + "; ".join(f"{n} {' '.join(f'{m:.1f}' for m in sorted(v))}" for n, v in rss.items()),
            flush=True,
        )
        service_rss = [m for name, v in rss.items() if not name.startswith("ceiling") for m in v]
    finally:
        for server in servers.values():
            server.stop()
    if per_channel is not None:
        print(
            f"database: {per_channel:.0f} bytes per channel at {large:,} channels "
            "(file + -wal after a TRUNCATE checkpoint)"
        )
    print(f"total {time.monotonic() - started:.0f} s\n")
    print(markdown(results, service_rss, args, conf))


if __name__ == "__main__":
    main()
