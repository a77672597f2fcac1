"""The service as a user meets it: a fresh checkout, in a folder of any name,
with the venv the README's command 1 makes and nothing else (no editable
install, no FLASK_* setting, Flask's instance folder where Flask puts it).
Every command README.md and docs/ show with the venv's programs is run here
(or by the test file named in DOCUMENTED), or excused with its reason."""

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import time
from contextlib import closing, contextmanager
from datetime import datetime, timezone

import pytest

from helpers import (
    DOCS,
    ROOT,
    copy_checkout,
    free_port,
    http_get,
    new_user,
    outputs_at_once,
    shell_blocks,
    venv_commands,
)

from dm_channels.store import Channel, Store

# On one xdist worker: its checkout (a fixture of the module) is made once.
pytestmark = pytest.mark.xdist_group("checkout")

COMMAND_1 = next(line for line in venv_commands(ROOT / "README.md") if "requirements.txt" in line)
HERE = "run by this file"
BENCHMARK = "a benchmark of minutes, not a check: tests/test_bench.py runs its smoke form"
SUITE = "runs tests of this suite, which .ci/run runs: here it is only checked to select some"
RECIPE = "run as written, in its recipe (docs/deployment.md, docs/postgresql.md), by tests/test_recipes.py"

# Each documented command, and who runs it: this file, another test file (which
# holds the command verbatim), or why it is not run.
DOCUMENTED = {
    COMMAND_1: HERE,
    "python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && .venv/bin/python -m pytest":
        "the suite itself: .ci/run runs this very command",
    ".venv/bin/...": "not a command: the README's note that commands use the venv's programs",
    '.venv/bin/gunicorn --bind 0.0.0.0:8080 "app:create_app()"': HERE,
    ".venv/bin/flask --app app run --debug": HERE,
    ".venv/bin/pip install /path/to/dm-channels": "tests/test_embedding.py",
    '.venv/bin/pip install "/path/to/dm-channels[postgres]"': "tests/test_embedding.py",
    '.venv/bin/gunicorn -c python:dm_channels.gunicorn_conf "dm_channels.app:create_app()"': "tests/test_embedding.py",
    '.venv/bin/gunicorn "app:create_app()"': HERE,
    '.venv/bin/gunicorn --bind 0.0.0.0:8080 --workers 8 "app:create_app()"': HERE,
    "FLASK_DATABASE=/srv/dm-channels/dm.sqlite3 FLASK_API_KEY='\"a long random key\"' "
    '.venv/bin/gunicorn --bind 0.0.0.0:8000 "app:create_app()"': HERE,
    '.venv/bin/python -m pytest -s tests/test_nginx.py -k "slowloris or starve"': SUITE,
    'FLASK_TRUSTED_PROXIES=1 .venv/bin/gunicorn "app:create_app()"': HERE,
    "mkdir -p backups && .venv/bin/flask --app app backup backups/dm-channels-$(date +%F).sqlite3": HERE,
    ".venv/bin/flask --app app init-db": HERE,
    'FLASK_ACCESS_LOG=false .venv/bin/gunicorn "app:create_app()"': HERE,
    ".venv/bin/pip install -r requirements-postgres.txt": HERE,
    ".venv/bin/flask --app app import-sqlite SOURCE": HERE,
    "FLASK_DATABASE=postgresql://dm@db.internal/dm_channels .venv/bin/flask --app app init-db": HERE,
    "FLASK_DATABASE=postgresql://dm@db.internal/dm_channels .venv/bin/flask --app app import-sqlite "
    "instance/dm-channels.sqlite3": HERE,
    ".venv/bin/python -m pytest -s tests/test_reliability.py": SUITE,
    ".venv/bin/python -m pytest -s tests/test_failover.py": SUITE,
    ".venv/bin/python -m pytest tests/test_app.py -k few_calls -s": SUITE,
    ".venv/bin/python -m bench.run --quick": "tests/test_bench.py",
    ".venv/bin/python -m bench.run": BENCHMARK,
    ".venv/bin/python -m bench.run --rounds 7 --duration 3 --workloads warm,held,spread,create --settings default "
    "--before <checkout>": BENCHMARK,
    ".venv/bin/python -m bench.run --database $P/dm_bench_main --fast-database $P/dm_bench_fast "
    "--small-database $P/dm_bench_small --large-database $P/dm_bench_large": BENCHMARK,
    "FLASK_METRICS=true .venv/bin/python -m bench.run --workloads warm --rounds 5 --pairs 1000": BENCHMARK,
    ".venv/bin/python -m bench.breakdown": "a measurement of minutes, printed for reading: "
    "tests/test_bench.py runs its smoke form",
    ".venv/bin/python -m bench.breakdown --quick": "tests/test_bench.py",
    "port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); "
    "print(s.getsockname()[1])'; }": RECIPE,
    'FLASK_DATABASE=$DIR/dm.sqlite3 .venv/bin/gunicorn --bind $SERVICE --pid "$DIR/gunicorn.pid" '
    '"app:create_app()" >"$DIR/gunicorn.log" 2>&1 &': RECIPE,
    '.venv/bin/flask --app app init-db || { echo "see $DIR/pgbouncer.log" >&2; exit 1; }': RECIPE,
    '.venv/bin/gunicorn --bind $SERVICE --pid "$DIR/gunicorn.pid" "app:create_app()" >"$DIR/gunicorn.log" 2>&1 &':
        RECIPE,
}


def test_every_documented_command_is_run_or_excused():
    shown = {command for path in DOCS for command in venv_commands(path)}
    assert shown == set(DOCUMENTED)
    for command, who in DOCUMENTED.items():
        if who.startswith("tests/"):  # that file runs the very command
            assert command in (ROOT / who).read_text(), f"{who} does not run {command}"


def test_the_pytest_commands_select_tests():
    """Run as written from the repository's root, in the test venv (command 2), all at once."""
    running = [
        subprocess.Popen(["bash", "-c", command + " --collect-only -q"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for command, who in DOCUMENTED.items() if who == SUITE
    ]
    for process, out in zip(running, outputs_at_once(running, timeout=120)):
        assert process.returncode == 0, out
        assert re.search(r"^\d+(/\d+)? tests? (collected|selected)", out, re.M), out


# -- a fresh checkout and its command-1 venv -----------------------------------------------


def user_env(**settings):
    """The environment of a user who has set nothing of dm-channels' or Flask's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "GUNICORN_"))}
    env.pop("PYTHONPATH", None)
    return {**env, **settings}


def shell(command, cwd, env=None, timeout=300):
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env or user_env(), capture_output=True, text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def serving(command, cwd, port, env=None, timeout=180):
    """Run a server command as documented (bash -c) until the block ends;
    ready once /healthz answers on the port."""
    log = cwd.parent / f"server-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", command], cwd=cwd, env=env or user_env(), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"{command} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{command} never answered:\n{log.read_text()}"
            try:
                if http_get(f"http://127.0.0.1:{port}/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)  # to the master alone (bash execs it), as helpers.Gunicorn.stop
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # anything of the group left behind


def bound(port):
    """gunicorn's bind for a command that names none: GUNICORN_CMD_ARGS, which
    gunicorn reads before its command line, after gunicorn.conf.py."""
    return user_env(GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port} --workers 2")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree in a folder not named after the project, with
    README command 1's venv, made by the very command (which then serves, until
    it is stopped). The folder's parent holds what a careless tool could pick
    up: an __init__.py, and an instance folder with a database of its own."""
    parent = tmp_path_factory.mktemp("parent")
    (parent / "__init__.py").write_text("")
    (parent / "instance").mkdir()
    decoy = Store(parent / "instance" / "dm-channels.sqlite3")
    decoy.get_or_create_dm(new_user(), new_user())
    decoy.close()
    folder = copy_checkout(parent / "clone1")
    port = free_port()
    with serving(COMMAND_1, folder, port, env=bound(port)):
        pass
    return folder


def channel_ids(database):
    with closing(sqlite3.connect(database)) as conn:
        return {blob.hex() for (blob,) in conn.execute("SELECT id FROM dm_channel")}


def hex_id(channel_id):
    return channel_id.replace("-", "")


def test_every_command_acts_on_the_checkouts_one_database(checkout):
    default = checkout / "instance" / "dm-channels.sqlite3"
    decoy = checkout.parent / "instance" / "dm-channels.sqlite3"
    decoy_ids = channel_ids(decoy)

    out = shell(documented_here(".venv/bin/flask --app app init-db"), checkout)
    assert f"Initialized {default} " in out

    a, b = new_user(), new_user()
    port = free_port()
    with serving(documented_here('.venv/bin/gunicorn "app:create_app()"'), checkout, port, env=bound(port)) as url:
        status, body, _ = http_get(f"{url}/api/messaging/dm-channel?userId1={a}&userId2={b}")
    assert status == 200 and body["data"]["created"] is True
    made = body["data"]["channel"]["id"]

    backup = documented_here(
        "mkdir -p backups && .venv/bin/flask --app app backup backups/dm-channels-$(date +%F).sqlite3"
    )
    out = shell(backup, checkout)
    [copy] = (checkout / "backups").iterdir()
    assert f"Backed up {default} to backups/{copy.name}." in out
    assert hex_id(made) in channel_ids(copy)

    port = free_port()
    env = user_env(FLASK_RUN_PORT=str(port))  # flask run's own setting for its port
    with serving(documented_here(".venv/bin/flask --app app run --debug"), checkout, port, env=env) as url:
        status, body, _ = http_get(f"{url}/api/messaging/dm-channel?userId1={b}&userId2={a}")
    assert status == 200 and body["data"] == {"channel": body["data"]["channel"], "created": False}
    assert body["data"]["channel"]["id"] == made

    source = checkout.parent / f"{checkout.name}-other.sqlite3"
    other = Store(source)
    moved = Channel(
        "5d0e8f52-6f0c-4c0d-9a55-2a8f2f1f6b3e", *sorted([new_user(), new_user()]),
        datetime(2026, 1, 2, tzinfo=timezone.utc),
    )
    other.add_channels([moved])
    other.close()
    command = documented_here(".venv/bin/flask --app app import-sqlite SOURCE")
    out = shell(command.replace("SOURCE", str(source)), checkout)
    assert f"added 1 to {default}." in out

    assert {hex_id(made), hex_id(moved.id)} <= channel_ids(default)
    assert channel_ids(decoy) == decoy_ids  # the parent's is none of theirs


def documented_here(command):
    assert DOCUMENTED.get(command) == HERE, f"not a documented command of this file's: {command}"
    return command


@pytest.mark.parametrize("command, key", [
    ('.venv/bin/gunicorn --bind 0.0.0.0:8080 "app:create_app()"', None),
    ('.venv/bin/gunicorn --bind 0.0.0.0:8080 --workers 8 "app:create_app()"', None),
    ("FLASK_DATABASE=/srv/dm-channels/dm.sqlite3 FLASK_API_KEY='\"a long random key\"' "
     '.venv/bin/gunicorn --bind 0.0.0.0:8000 "app:create_app()"', "a long random key"),
    ('FLASK_TRUSTED_PROXIES=1 .venv/bin/gunicorn "app:create_app()"', None),
    ('FLASK_ACCESS_LOG=false .venv/bin/gunicorn "app:create_app()"', None),
])
def test_the_documented_gunicorn_commands_serve(checkout, tmp_path, command, key):
    port = free_port()
    run = documented_here(command).replace("/srv/dm-channels", str(tmp_path))
    run = re.sub(r"--bind 0\.0\.0\.0:\d+", f"--bind 0.0.0.0:{port}", run)
    env = user_env() if "--bind" in run else bound(port)
    with serving(run, checkout, port, env=env) as url:
        a, b = new_user(), new_user()
        status, body, _ = http_get(
            f"{url}/api/messaging/dm-channel?userId1={a}&userId2={b}",
            headers={"X-API-KEY": key} if key else {},
        )
        assert status == 200 and body["data"]["created"] is True
        if key:
            assert http_get(f"{url}/api/messaging/dm-channel?userId1={a}&userId2={b}")[0] == 401
    if "/srv/dm-channels/dm.sqlite3" in command:
        assert hex_id(body["data"]["channel"]["id"]) in channel_ids(tmp_path / "dm.sqlite3")


def test_the_postgresql_recipe_runs(checkout, new_postgres_database):
    """docs/postgresql.md: psycopg into the command-1 venv, then the service, the
    schema and a move of the checkout's SQLite channels, on a real server."""
    url = new_postgres_database()
    shell(documented_here(".venv/bin/pip install -r requirements-postgres.txt"), checkout)
    recipe = next(b for b in shell_blocks(ROOT / "docs" / "postgresql.md") if "export FLASK_DATABASE" in b)
    lines = [re.sub(r"\s+#\s.*$", "", line) for line in recipe.splitlines()]
    export, init_db, serve = lines[1], lines[2], lines[3]
    env = user_env(FLASK_DATABASE=url)
    assert export.startswith("export FLASK_DATABASE=postgresql://")
    shell(documented_here(init_db.strip()), checkout, env=env)
    port = free_port()
    with serving(documented_here(serve.strip()), checkout, port, env={**env, **bound(port), "FLASK_DATABASE": url}) as served:
        a, b = new_user(), new_user()
        status, body, _ = http_get(f"{served}/api/messaging/dm-channel?userId1={a}&userId2={b}")
        assert status == 200 and body["data"]["created"] is True
    sqlite_ids = channel_ids(checkout / "instance" / "dm-channels.sqlite3")
    example = "postgresql://dm@db.internal/dm_channels"
    init = documented_here(f"FLASK_DATABASE={example} .venv/bin/flask --app app init-db")
    shell(init.replace(example, url), checkout)
    move = documented_here(
        f"FLASK_DATABASE={example} .venv/bin/flask --app app import-sqlite instance/dm-channels.sqlite3"
    )
    out = shell(move.replace(example, url), checkout)
    assert f"Read {len(sqlite_ids)} channels from instance/dm-channels.sqlite3; added {len(sqlite_ids)}" in out
    import psycopg

    with psycopg.connect(url) as conn:
        ids = {row[0].hex for row in conn.execute("SELECT id FROM dm_channel")}
    assert sqlite_ids < ids and hex_id(body["data"]["channel"]["id"]) in ids
