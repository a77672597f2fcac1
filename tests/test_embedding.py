"""dm-channels as a package: installed with pip, mounted in a host app that has
its own app.py, and its store used as a library."""

import contextlib
import json
import os
import re
import signal
import shlex
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flask import Flask
from packaging.requirements import Requirement

import dm_channels
from dm_channels.app import init_app
from dm_channels import ops
from dm_channels.store import StoreError
from helpers import ROOT, copy_checkout, dm_url, documented, free_port, new_user, outputs_at_once

# On one xdist worker: its installed package (a fixture of the module) is made once.
pytestmark = pytest.mark.xdist_group("embedding")


GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def make_host(tmp_path, **config):
    host = Flask("host")
    host.config.update(DATABASE=str(tmp_path / "host.sqlite3"), **config)
    return host


# -- where init_app mounts things ---------------------------------------------------------


def test_healthz_and_openapi_are_mounted_where_the_host_says(tmp_path):
    host = make_host(tmp_path, HEALTH_PATH="/dm/healthz", OPENAPI_PATH="/dm/openapi.json")
    init_app(host)
    client = host.test_client()
    assert client.get("/dm/healthz").json == {"success": True, "data": {"status": "ok"}}
    assert client.get("/dm/openapi.json").json["info"]["title"] == "dm-channels"
    assert client.get("/healthz").status_code == 404
    assert client.get("/openapi.json").status_code == 404
    host.extensions["dm_channels"].store.close()


@pytest.mark.parametrize("off", [None, ""])
def test_healthz_and_openapi_can_be_left_out(tmp_path, off):
    host = make_host(tmp_path, HEALTH_PATH=off, OPENAPI_PATH=off)
    init_app(host)
    rules = {rule.rule for rule in host.url_map.iter_rules()}
    assert not {"/healthz", "/openapi.json"} & rules
    assert host.test_client().get(dm_url(new_user(), new_user())).status_code == 200
    host.extensions["dm_channels"].store.close()


@pytest.mark.parametrize(
    "path, config",
    [
        ("/healthz", {}),
        ("/openapi.json", {}),
        ("/status", {"HEALTH_PATH": "/status"}),
        ("/api/messaging/dm-channel", {}),
        ("/api/messaging/channels/<int:id>", {}),  # the same path, whatever the names
    ],
)
def test_a_clash_with_a_host_route_is_an_error_naming_it(tmp_path, path, config):
    host = make_host(tmp_path, **config)
    host.add_url_rule(path, "hosts_own", lambda **kwargs: "the host's")
    with pytest.raises(ValueError, match=f"already routes {path} to 'hosts_own'"):
        init_app(host)


def test_a_clashing_host_route_added_after_init_app_is_refused_on_the_first_request(tmp_path, caplog):
    host = make_host(tmp_path)
    init_app(host)
    host.add_url_rule("/healthz", "hosts_own", lambda: "the host's")
    said = "dm-channels cannot mount /healthz: the app already routes /healthz to 'hosts_own'"
    for _ in range(2):  # not served while the clash stands
        assert host.test_client().get("/healthz").status_code == 500
        assert said in caplog.text
        caplog.clear()
    host.extensions["dm_channels"].store.close()


def test_a_host_route_of_another_method_is_no_clash(tmp_path):
    host = make_host(tmp_path)
    host.add_url_rule("/healthz", "hosts_own", lambda: "posted", methods=["POST"])
    init_app(host)
    client = host.test_client()
    assert client.post("/healthz").get_data(as_text=True) == "posted"
    assert client.get("/healthz").json["data"] == {"status": "ok"}
    host.extensions["dm_channels"].store.close()


@pytest.mark.parametrize("value", ["healthz", 5, True])
def test_a_path_setting_must_be_a_path(tmp_path, value):
    with pytest.raises(ValueError, match="^HEALTH_PATH must be"):
        init_app(make_host(tmp_path, HEALTH_PATH=value))


# What the README promises a host: "A bad setting or an unusable database is a
# ValueError or a dm_channels.channels.StoreError with a one-line message."
HOST_MISTAKES = {
    "bad number": ({"BUSY_TIMEOUT": "soon"}, ValueError),
    "null": ({"BUSY_TIMEOUT": None}, ValueError),
    "null database": ({"DATABASE": None}, ValueError),
    "pool sizes": ({"PG_POOL_MIN_SIZE": 5, "PG_POOL_MAX_SIZE": 2}, ValueError),
    "blank key": ({"API_KEY": " "}, ValueError),
    "another URL": ({"DATABASE": "mysql://dm:secret@127.0.0.1/dm"}, ValueError),
    "key=value": ({"DATABASE": "host=127.0.0.1 dbname=dm password=secret"}, ValueError),
    "a SQLite URL": ({"DATABASE": "sqlite:///dm.sqlite3"}, ValueError),
    "in memory": ({"DATABASE": ":memory:"}, ValueError),
    "a file: URI": ({"DATABASE": "file:dm.sqlite3?mode=memory"}, ValueError),
    "folder missing": ({"DATABASE": "{tmp}/nowhere/dm.sqlite3"}, StoreError),
    "not a database": ({"DATABASE": "{tmp}/notes.txt"}, StoreError),
    "no PostgreSQL there": ({"DATABASE": "postgresql://dm:secret@127.0.0.1:1/dm"}, StoreError),
}


@pytest.mark.parametrize("case", HOST_MISTAKES)
def test_init_app_raises_a_value_or_store_error_of_one_line(tmp_path, case):
    config, kind = HOST_MISTAKES[case]
    (tmp_path / "notes.txt").write_text("not a database\n")
    host = make_host(tmp_path)
    host.config.update({k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in config.items()})
    with pytest.raises((ValueError, StoreError)) as raised:
        init_app(host)
    assert isinstance(raised.value, kind)
    message = str(raised.value)
    assert "\n" not in message and message.split()[0].rstrip(":") in config and "secret" not in message


# -- request ids and metrics: the host's choice ----------------------------------------------


def test_init_app_leaves_the_hosts_requests_as_they_are(tmp_path):
    host = make_host(tmp_path, METRICS=True)
    host.add_url_rule("/hello", "hello", lambda: "hello")
    flask_wsgi_app = host.wsgi_app
    init_app(host)
    client = host.test_client()
    assert host.wsgi_app == flask_wsgi_app
    for path in ["/hello", dm_url(new_user(), new_user()), "/metrics"]:
        assert "X-Request-ID" not in client.get(path).headers
    host.extensions["dm_channels"].store.close()


def test_a_host_that_asks_for_request_ids_and_metrics_gets_them(tmp_path):
    host = make_host(tmp_path, METRICS=True)
    host.add_url_rule("/hello/<name>", "hello", lambda name: f"hello {name}")
    init_app(host)
    ops.init_app(host)  # as docs/operations.md says
    client = host.test_client()
    answer = client.get("/hello/alice", headers={"X-Request-ID": "host-1"})
    assert answer.get_data(as_text=True) == "hello alice"
    assert answer.headers["X-Request-ID"] == "host-1"
    assert GENERATED_ID.fullmatch(client.get(dm_url(new_user(), new_user())).headers["X-Request-ID"])
    exposition = client.get("/metrics").get_data(as_text=True)
    assert 'dm_channels_requests_total{endpoint="/hello/<name>",error_code="",status_class="2xx"}' in exposition
    assert "alice" not in exposition
    host.extensions["dm_channels"].store.close()


def test_metrics_will_not_shadow_a_hosts_own(tmp_path):
    host = make_host(tmp_path, METRICS=True)
    host.add_url_rule("/metrics", "hosts_metrics", lambda: "the host's own")
    init_app(host)
    with pytest.raises(ValueError, match="cannot serve /metrics .* already routes /metrics to 'hosts_metrics'"):
        ops.init_app(host)
    host.extensions["dm_channels"].store.close()


# -- the package ---------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_openapi_version_is_the_package_version(client):
    assert client.get("/openapi.json").json["info"]["version"] == dm_channels.__version__


def requirements_file(name):
    lines = (ROOT / name).read_text().splitlines()
    return {Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()}


def test_the_store_modules_do_not_import_each_other_or_flask():
    code = (
        "import sys, dm_channels.store, dm_channels.schemas;"
        "print(sorted(m for m in sys.modules if m.startswith(('dm_channels', 'flask'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "dm_channels.store" in loaded
    assert "dm_channels.pgstore" not in loaded and "flask" not in loaded


# -- installed with pip into a fresh venv, as a user would ------------------------------------


def run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def site_packages(venv):
    return Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """Fresh venvs with dm-channels pip-installed by the README's commands, plain and with the
    postgres extra, made at once, each from a copy of the working tree (the build leaves nothing here)."""
    commands = {
        "plain": documented("README.md", ".venv/bin/pip install /path/to/dm-channels"),
        "postgres": documented("README.md", '.venv/bin/pip install "/path/to/dm-channels[postgres]"'),
    }
    where = {name: tmp_path_factory.mktemp(name) for name in commands}
    running = {
        name: subprocess.Popen(
            ["bash", "-c", f"{shlex.quote(sys.executable)} -m venv .venv && "
             + command.replace("/path/to/dm-channels", str(copy_checkout(where[name] / "dm-channels")))],
            cwd=where[name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, command in commands.items()
    }
    for (name, process), out in zip(running.items(), outputs_at_once(list(running.values()), timeout=600)):
        assert process.returncode == 0, f"{commands[name]}\n{out}"
    return {name: where[name] / ".venv" for name in commands}


@pytest.fixture(scope="module")
def installed(installs):
    return installs["plain"]


def test_pip_installs_one_distinctive_package(installed):
    top = {p.name for p in site_packages(installed).iterdir()}
    ours = {name for name in top if name.startswith("dm_channels")}
    assert ours == {"dm_channels", f"dm_channels-{dm_channels.__version__}.dist-info"}
    for generic in ("app", "app.py", "store.py", "schemas.py", "pgstore.py", "tests", "bench"):
        assert generic not in top
    installed_files = {p.name for p in (site_packages(installed) / "dm_channels").iterdir()}
    assert {"__init__.py", "app.py", "schemas.py", "store.py", "pgstore.py"} <= installed_files
    # Its runtime dependencies came with it; psycopg only with the extra.
    version = run([installed / "bin" / "python", "-c", "import flask, marshmallow, gunicorn, apispec; import dm_channels; print(dm_channels.__version__)"])
    assert version.strip() == dm_channels.__version__
    assert not (site_packages(installed) / "psycopg").exists()


def test_installed_create_app_keeps_its_channels_in_the_venvs_instance_folder(installed, tmp_path):
    """Flask's rule for an installed package, as the README says: <venv>/var/dm_channels-instance."""
    code = "from dm_channels.app import create_app; print(create_app().config['DATABASE'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    instance = installed / "var" / "dm_channels-instance"
    elsewhere = str(tmp_path / "dm.sqlite3")
    assert run([installed / "bin" / "python", "-c", code], cwd=tmp_path, env={**env, "FLASK_DATABASE": elsewhere}).strip() == elsewhere
    assert not instance.exists()  # made only for a database of its own
    database = run([installed / "bin" / "python", "-c", code], cwd=tmp_path, env=env).strip()
    assert database == str(instance / "dm-channels.sqlite3") and instance.is_dir()
    assert "<venv>/var/dm_channels-instance/" in (ROOT / "README.md").read_text()


def test_a_postgresql_url_without_psycopg_is_a_store_error_of_one_line(installed, tmp_path):
    """The installed venv has no psycopg (it comes with the extra alone)."""
    code = textwrap.dedent("""
        from flask import Flask
        from dm_channels.app import init_app
        from dm_channels.store import StoreError
        host = Flask("host")
        host.config["DATABASE"] = "postgresql://dm:secret@127.0.0.1/dm"
        try:
            init_app(host)
        except StoreError as e:
            print(e)
    """)
    said = run([installed / "bin" / "python", "-c", code], cwd=tmp_path)
    assert said.splitlines() == [
        'DATABASE is a PostgreSQL URL but psycopg is not installed: pip install "dm-channels[postgres]"'
        " (or -r requirements-postgres.txt)"
    ]


def test_the_postgres_extra_brings_psycopg(installs, tmp_path):
    code = "import psycopg, psycopg_pool, dm_channels.pgstore; print('ok')"
    assert run([installs["postgres"] / "bin" / "python", "-c", code], cwd=tmp_path).strip() == "ok"


INSTALLED_SERVICE = '.venv/bin/gunicorn -c python:dm_channels.gunicorn_conf "dm_channels.app:create_app()"'


def serve_installed(installed, folder, **settings):
    """The installed service, run by the documented command from a folder that is no checkout,
    and its URL."""
    command = documented("README.md", INSTALLED_SERVICE).replace(".venv/", f"{installed}/")
    assert documented("docs/deployment.md", INSTALLED_SERVICE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "GUNICORN_"))}
    env.pop("PYTHONPATH", None)
    port = free_port()
    # A short graceful timeout: a worker forked an instant before the stop may miss its SIGTERM.
    env.update(settings, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port} --workers 2 --graceful-timeout 5")
    with open(folder / "gunicorn.log", "wb") as log:
        server = subprocess.Popen(
            ["bash", "-c", command], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return server, f"http://127.0.0.1:{port}"


def test_the_installed_service_runs_with_its_gunicorn_settings(installed, tmp_path):
    server, url = serve_installed(installed, tmp_path, FLASK_DATABASE=str(tmp_path / "dm.sqlite3"), FLASK_DATABSE="x")
    log = tmp_path / "gunicorn.log"
    try:
        deadline = time.monotonic() + 30
        while "Booting worker" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "Using worker: dm_channels.worker.ThreadWorker" in log.read_text()
        assert "dm-channels: FLASK_DATABSE: not a setting; did you mean FLASK_DATABASE?" in log.read_text()
        assert http_page(url + "/healthz", {}) == [200, {"success": True, "data": {"status": "ok"}}]
    finally:
        server.send_signal(signal.SIGTERM)  # to the master alone, as helpers.Gunicorn.stop
        server.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


def test_the_installed_service_refuses_a_bad_setting_at_start_in_one_line(installed, tmp_path):
    began = time.monotonic()
    server, _ = serve_installed(installed, tmp_path, FLASK_DATABASE=":memory:")
    try:
        assert server.wait(30) != 0 and time.monotonic() - began < 10
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # a service that did start is not left running
    log = (tmp_path / "gunicorn.log").read_text()
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "dm-channels cannot start: DATABASE must be a SQLite file's path (e.g. /srv/dm-channels.sqlite3)"
        " or a postgresql:// URL, not ':memory:'"
    ), log
    assert "Booting worker" not in log


def installed_metadata(venv):
    """The installed distribution's version, requirements and files."""
    code = (
        "import importlib.metadata as m, json; d = m.distribution('dm-channels');"
        "print(json.dumps([d.version, d.requires, [str(f) for f in d.files]]))"
    )
    return json.loads(run([venv / "bin" / "python", "-c", code]))


def test_the_installed_metadata_has_the_project_urls(installed):
    code = "import importlib.metadata as m; print('\\n'.join(m.metadata('dm-channels').get_all('Project-URL')))"
    urls = dict(line.split(", ", 1) for line in run([installed / "bin" / "python", "-c", code]).splitlines())
    assert {"Repository", "Documentation", "Changelog"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    assert urls["Changelog"].endswith("/CHANGELOG.md")


def test_the_installed_metadata_has_the_version_and_the_requirements_files(installed):
    """pyproject.toml reads both; the installed metadata says what it read."""
    version, requires, _ = installed_metadata(installed)
    assert version == dm_channels.__version__
    declared = [Requirement(r) for r in requires]
    plain = {r for r in declared if r.marker is None}
    postgres = {
        Requirement(str(r).split(";")[0]) for r in declared if r.marker is not None
        and r.marker.evaluate({"extra": "postgres"})
    }
    assert plain == requirements_file("requirements.txt") and plain
    assert postgres == requirements_file("requirements-postgres.txt") and postgres


def test_the_wheel_holds_the_package_folder_and_nothing_else(installed):
    *_, files = installed_metadata(installed)
    tops = {Path(f).parts[0] for f in files}
    # The dist-info, the package, and the bytecode pip compiled for it.
    assert tops - {"__pycache__"} == {"dm_channels", f"dm_channels-{dm_channels.__version__}.dist-info"}
    names = {Path(f).name for f in files}
    assert "gunicorn.conf.py" not in names and not any(f.startswith(("tests", "bench")) for f in files)
    package = {Path(f).name for f in files if f.startswith("dm_channels/") and f.endswith(".py")}
    assert package == {p.name for p in (ROOT / "dm_channels").glob("*.py")}


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_pip_installs_from_a_git_url(tmp_path):
    """pip install "git+<url>" builds the committed tree (HEAD) the same way."""
    target = tmp_path / "target"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, f"git+file://{ROOT}"])
    names = {p.name for p in target.iterdir()}
    assert "dm_channels" in names and not {"app.py", "store.py", "schemas.py"} & names
    assert any(n.startswith("dm_channels-") and n.endswith(".dist-info") for n in names)


HOST_APP = '''
"""A host's own tool: its app.py, schemas.py and store.py have nothing to do with dm-channels."""
from flask import Flask

import schemas
import store
from dm_channels.app import init_app


def create_app():
    app = Flask(__name__)
    app.config.from_prefixed_env()  # FLASK_DATABASE, FLASK_API_KEY, ...

    @app.get("/")
    def home():
        return f"host home: {schemas.NAME}, {store.NAME}"

    @app.get("/healthz")
    def healthz():
        return "host is fine"

    @app.errorhandler(404)
    def not_found(e):
        return "the host's own 404 page", 404

    init_app(app)
    return app
'''

# What both tests ask the host, after a first request for the pair (a, b) made
# the channel: (name, path, whether the API key is sent).
HOST_PAGES = [
    ("dm", "/api/messaging/dm-channel?userId1={a}&userId2={b}", True),
    ("channel", "/api/messaging/channels/{channel}", True),
    ("participants", "/api/messaging/channels/{channel}/participants", True),
    ("listing", "/api/messaging/users/{a}/dm-channels", True),
    ("api_404", "/api/messaging/nowhere", True),
    ("dm_health", "/dm/healthz", True),
    ("no_key", "/api/messaging/dm-channel?userId1={a}&userId2={b}", False),
    ("home", "/", False),
    ("host_health", "/healthz", False),
    ("host_404", "/nowhere", False),
]
HOST_KEY = {"X-API-KEY": "host-key"}

HOST_CHECK = """
# Drives the host through Flask's test client: argv is a, b, the API key's
# header and the pages, as JSON; prints [status, JSON body or text] of each.
import json, sys
from app import create_app

client = create_app().test_client()
a, b, key, pages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
made = client.get(f"/api/messaging/dm-channel?userId1={a}&userId2={b}", headers=key)
ids = {"a": a, "b": b, "channel": made.json["data"]["channel"]["id"]}
seen = {}
for name, path, with_key in pages:
    r = client.get(path.format(**ids), headers=key if with_key else {})
    seen[name] = [r.status_code, r.json if r.is_json else r.get_data(as_text=True)]
print(json.dumps(seen))
"""


@pytest.fixture
def host_project(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "app.py").write_text(textwrap.dedent(HOST_APP))
    (host / "schemas.py").write_text('NAME = "host schemas"\n')
    (host / "store.py").write_text('NAME = "host store"\n')
    (host / "check.py").write_text(HOST_CHECK)
    env = {
        **os.environ,
        "FLASK_DATABASE": str(tmp_path / "host-dm.sqlite3"),
        "FLASK_API_KEY": HOST_KEY["X-API-KEY"],
        "FLASK_HEALTH_PATH": "/dm/healthz",
    }
    env.pop("PYTHONPATH", None)
    return host, env


def http_page(url, headers):
    """[status, JSON body or text] of a GET."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get_content_type()
    return [status, json.loads(body) if kind == "application/json" else body.decode()]


def assert_host_behaviour(seen, a, b, database):
    status, body = seen["dm"]
    assert status == 200 and body["data"]["created"] is False  # made by the first request
    channel = body["data"]["channel"]
    assert channel["metadata"] == dict(zip(["user1", "user2"], sorted([a, b])))
    assert seen["channel"] == [200, {"success": True, "data": {"channel": channel}}]
    assert seen["participants"][1]["data"]["participants"] == sorted([a, b])
    assert seen["listing"][1]["data"] == {"channels": [channel], "nextCursor": None}
    # The host's config is honoured: its API key, its database file, its paths.
    assert seen["no_key"][0] == 401 and seen["no_key"][1]["error"]["code"] == "UNAUTHORIZED"
    assert database.exists()
    assert seen["dm_health"] == [200, {"success": True, "data": {"status": "ok"}}]
    # Errors under the API's prefix are the envelope; the host's pages stay its own.
    assert seen["api_404"][0] == 404 and seen["api_404"][1]["error"]["code"] == "NOT_FOUND"
    assert seen["home"] == [200, "host home: host schemas, host store"]
    assert seen["host_health"] == [200, "host is fine"]
    assert seen["host_404"] == [404, "the host's own 404 page"]


def test_a_host_with_its_own_app_py_mounts_it_through_the_test_client(installed, host_project):
    host, env = host_project
    a, b = new_user(), new_user()
    args = [a, b, json.dumps(HOST_KEY), json.dumps(HOST_PAGES)]
    out = run([installed / "bin" / "python", "check.py", *args], cwd=host, env=env)
    assert_host_behaviour(json.loads(out), a, b, Path(env["FLASK_DATABASE"]))


def test_a_host_with_its_own_app_py_serves_it_under_gunicorn(installed, host_project, tmp_path):
    host, env = host_project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "host-gunicorn.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [installed / "bin" / "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2", "app:create_app()"],
            cwd=host, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "Booting worker" not in log_path.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        a, b = new_user(), new_user()
        made = http_page(url + dm_url(a, b), HOST_KEY)  # the socket is bound before workers boot
        ids = {"a": a, "b": b, "channel": made[1]["data"]["channel"]["id"]}
        seen = {
            name: http_page(url + path.format(**ids), HOST_KEY if with_key else {})
            for name, path, with_key in HOST_PAGES
        }
        assert_host_behaviour(seen, a, b, Path(env["FLASK_DATABASE"]))
    finally:
        server.terminate()
        server.wait(30)


def test_a_host_route_that_clashes_stops_the_host_with_its_name(installed, host_project):
    host, env = host_project
    del env["FLASK_HEALTH_PATH"]
    done = subprocess.run(
        [installed / "bin" / "python", "-c", "from app import create_app; create_app()"],
        cwd=host, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 1
    assert "cannot mount /healthz: the app already routes /healthz to 'healthz'" in done.stderr
