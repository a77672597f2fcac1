"""bench/run.py, the benchmark, as its smoke run (--quick): small stores, a
second per workload. Benchmarks are not tests: nothing here looks at a figure's value,
only that the script runs end to end and reports every workload."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, documented

# The benchmark loads every core: on the xdist worker that runs the tests that
# time things (xdist_group "timing"), never beside one of them.
pytestmark = pytest.mark.xdist_group("timing")

BENCH = [sys.executable, "-m", "bench.run"]
QUICK = documented("docs/performance.md", ".venv/bin/python -m bench.run --quick")
BREAKDOWN_QUICK = documented("docs/performance.md", ".venv/bin/python -m bench.breakdown --quick")


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (apt-get install wrk; .ci/run installs it)",
)
def test_benchmark_runs_end_to_end_and_reports_every_workload():
    # As docs/performance.md shows it, in the test venv (README's command 2).
    result = subprocess.run(
        ["bash", "-c", QUICK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = out.splitlines()
    for workload in ("warm", "held", "spread", "create", "mixed"):
        line = next((l for l in lines if l.startswith(f"{workload} [default] ")), None)
        assert line is not None, f"no line for {workload} [default]:\n{out}"
        assert "req/s" in line and "p99" in line and "ratio" in line
    for cache in ("cached", "uncached"):
        assert any(l.startswith(f"scale [{cache}] ") for l in lines), out
    assert "body of a warm get: service 409 bytes, ceiling 409 bytes" in out
    for figure in (
        "| warm get (one pair): requests/s, service / ceiling | >= 0.98 |",
        "| warm: p99 latency, service / ceiling | <= 1.5 |",
        "| gets spread over 1,000 existing pairs, each worker's cache filled first: requests/s, service / ceiling "
        "| >= 0.95 |",
        "| gets spread over 1,000 existing pairs: requests/s, service / ceiling | >= 0.80 |",
        "| create (`synchronous=FULL`): requests/s, service / ceiling | >= 0.48 |",
        "| create: p99 latency, service / ceiling | <= 3.0 |",
        "| mixed (95% of 1,000 existing, 5% new): requests/s, service / ceiling | >= 0.85 |",
        "| gets spread over 10,000 / over 1,000 pairs (as shipped): requests/s | >= 0.95 |",
        "| database bytes per channel at 10,000 channels | <= 250 |",
        "| resident memory per worker after the run (VmRSS, largest) | <= 60 MB |",
    ):
        assert figure in out, out
    # Every request of the run was answered with a 2xx, and every create was committed.
    assert "| non-2xx answers and socket errors, all runs | 0 | 0 |" in out, out
    assert re.search(
        r"\| create \(default\): acknowledged channels committed \| all \| [0-9,]+ "
        r"committed of [0-9,]+ acknowledged \|", out
    ), out
    assert "acknowledged **(no)**" not in out, out


def test_benchmark_without_wrk_says_how_to_install_it(tmp_path):
    result = subprocess.run(
        BENCH + ["--quick"],
        cwd=ROOT,
        env={**os.environ, "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "wrk" in result.stderr and "apt-get install wrk" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_breakdown_runs_end_to_end_and_reports_every_step():
    result = subprocess.run(
        ["bash", "-c", BREAKDOWN_QUICK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for step in (
        "bare Flask request (the ceiling)", "service: warm get, answer kept (as shipped)",
        "with METRICS on", "without request ids (init_app alone)",
        "service: warm get, no answer kept (cache 0)", "store: read of an existing pair",
        "marshmallow: load of the query", "marshmallow: dump of the answer",
    ):
        assert re.search(rf"{re.escape(step)}\s+[0-9.]+", out), f"no figure for {step}:\n{out}"
    for way in ("creates waiting written together (as shipped)", "plain INSERT, SQLite's busy timeout"):
        assert re.search(rf"{re.escape(way)}\s+[0-9,]+ creates/s  p99 +[0-9.]+ ms", out), out
