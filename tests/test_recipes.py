"""The "Try it locally" recipes of docs/deployment.md (nginx in front) and
docs/postgresql.md (PgBouncer) are run as written, so they cannot rot.

Each recipe's sh block goes to bash (set -e) from the repository's root, with
free ports and a database of the test's own in place of the doc's, and each
step's output must match its `#> ` lines, as in the README's tour. The recipes
are for a normal user: when the tests run as root, the nginx recipe runs as
nobody; the PgBouncer one runs as root (the venv's Python may lie where nobody
cannot reach it) with the doc's own advice for root, PgBouncer as nobody.
Whatever a recipe leaves running is stopped by its pid file. Without nginx,
envsubst, PgBouncer or PostgreSQL these tests are skipped, or fail when
DM_CHANNELS_REQUIRE_NGINX or DM_CHANNELS_REQUIRE_POSTGRES is 1 (as in CI).
"""

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from helpers import POSTGRES_SERVER, ROOT, free_port, program, require_pgbouncer, unavailable
from test_readme import expected_pattern

MARKER = "--- next step ---"

# docs/postgresql.md's advice for root, which the test follows when it runs as root.
PGBOUNCER = 'pgbouncer -d "$DIR/pgbouncer.ini"'
AS_ROOT = ['chown nobody "$DIR"', 'pgbouncer -d -u nobody "$DIR/pgbouncer.ini"']


def recipe(doc, heading):
    """The sh block under `heading` in docs/<doc>."""
    section = (ROOT / "docs" / doc).read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(r"^```sh\n(.*?)^```", section, flags=re.M | re.S).group(1)


def replaced(block, changes):
    """`block` with each key of `changes` replaced by its value; each must be there."""
    for old, new in changes.items():
        assert old in block, f"the recipe no longer has {old!r}"
        block = block.replace(old, new)
    return block


def steps(block):
    """[[commands, expected output lines]]: the lines up to each run of `#> `
    lines (a heredoc or a continued line stays whole), and those lines."""
    found = [["", []]]
    for line in block.splitlines(keepends=True):
        if line.startswith("#> "):
            found[-1][1].append(line[3:].rstrip("\n"))
        else:
            if found[-1][1]:
                found.append(["", []])
            found[-1][0] += line
    return found


def need_curl():
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")


def running(folder):
    """The live processes of the pid files under folder (nginx.pid, pgbouncer.pid, ...)."""
    pids = []
    for path in folder.rglob("*.pid"):
        try:
            pid = int(path.read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # gone, or the file half written
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and path.stem.encode() in cmdline:
            pids.append(pid)
    return pids


def gone(folder, timeout):
    deadline = time.monotonic() + timeout
    while running(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(folder)


def run(block, as_root=False):
    """Run the recipe `block` step by step from the repository's root, as the
    tests' own user, or as nobody if that is root (unless as_root), with a
    fresh folder as TMPDIR (for its mktemp -d), nobody's if root; check each
    step's output, and that its last step stopped what it started. Whatever is
    left is stopped in any case."""
    recipe_steps = steps(block)
    script = "set -e\n" + "".join(f"{commands}echo '{MARKER}'\n" for commands, _ in recipe_steps)
    folder = Path(tempfile.mkdtemp(prefix="dm-recipe-"))
    as_user = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        if not as_root:
            as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    env = {
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}:/usr/sbin",
        "HOME": str(folder),
        "TMPDIR": str(folder),
        "LANG": "C.UTF-8",
    }
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # Files, not pipes: a daemon that kept one open would hold run() until it exits.
            done = subprocess.run(
                ["bash", "-c", script], cwd=ROOT, env=env, stdout=out, stderr=err, timeout=120,
                **as_user,
            )
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        assert done.returncode == 0, f"{stdout}\n{stderr}"
        outputs = stdout.split(MARKER + "\n")[:-1]
        assert len(outputs) == len(recipe_steps)
        for (commands, expected), output in zip(recipe_steps, outputs):
            assert re.fullmatch(expected_pattern(expected), output, flags=re.S), (
                f"{commands}\nexpected: {expected}\ngot: {output}\n{stderr}"
            )
        assert gone(folder, timeout=30), f"still running after the recipe: {running(folder)}"
    finally:
        for pid in running(folder):
            os.kill(pid, signal.SIGTERM)
        if not gone(folder, timeout=10):
            for pid in running(folder):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_nginx_recipe_runs_as_written(gunicorn, tmp_path):
    """docs/deployment.md: the template rendered into a folder of nginx's own,
    nginx started there unprivileged in front of the running service, asked
    through and stopped."""
    program("nginx")
    program("envsubst")
    need_curl()
    service = gunicorn(tmp_path / "recipe.sqlite3", workers=1)  # README's command 1
    block = replaced(recipe("deployment.md", "### Try it locally"), {
        "127.0.0.1:8000": f"127.0.0.1:{service.port}",
        "127.0.0.1:8080": f"127.0.0.1:{free_port()}",
    })
    run(block)


def test_the_pgbouncer_recipe_runs_as_written(new_postgres_database):
    """docs/postgresql.md: PgBouncer in transaction mode with an ini of its
    own, the schema made and a channel created through it, then both stopped."""
    require_pgbouncer()
    need_curl()
    server = urlsplit(POSTGRES_SERVER)
    if (server.username, server.password) != ("postgres", None):
        unavailable("the recipe logs in as postgres without a password, unlike DM_CHANNELS_TEST_POSTGRES")
    database = urlsplit(new_postgres_database()).path[1:]
    pgbouncer_port = free_port()
    block = replaced(recipe("postgresql.md", "#### Try it locally"), {
        "host=127.0.0.1 port=5432 dbname=test":
            f"host={server.hostname} port={server.port or 5432} dbname={database}",
        "listen_port = 6432": f"listen_port = {pgbouncer_port}",
        "127.0.0.1:6432": f"127.0.0.1:{pgbouncer_port}",
        "127.0.0.1:8001": f"127.0.0.1:{free_port()}",
    })
    if os.geteuid() == 0:
        doc = (ROOT / "docs" / "postgresql.md").read_text()
        assert all(f"`{line}`" in doc for line in AS_ROOT), "the doc no longer says what to do as root"
        block = replaced(block, {PGBOUNCER: "\n".join(AS_ROOT)})
    run(block, as_root=True)
