"""The HTTP contract of GET /api/messaging/dm-channel, through Flask's test client."""

import logging
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from datetime import datetime, timezone

import pytest
from flask import Flask

import dm_channels
from dm_channels.app import create_app, init_app
from dm_channels.store import Store
from helpers import BAD_IDS, ROOT, assert_envelope, dm_url, new_user, query, report, write_lock_held_by_another_process

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def get_channel(client, user1, user2):
    response = client.get(dm_url(user1, user2))
    assert response.status_code == 200, response.json
    return response.json["data"]


# -- success ---------------------------------------------------------------------


@pytest.mark.pgbouncer
def test_first_request_creates_the_channel_with_every_field(client):
    a, b = sorted([new_user(), new_user()])
    before = datetime.now(timezone.utc).replace(microsecond=0)
    response = client.get(dm_url(b, a))
    assert response.status_code == 200
    assert response.content_type == "application/json"
    body = response.json
    assert body["success"] is True
    assert body["data"]["created"] is True
    channel = body["data"]["channel"]
    assert set(channel) == {
        "id", "name", "serverId", "type", "description", "metadata", "createdAt"
    }
    assert uuid.UUID(channel["id"]).version == 4
    assert channel["id"] == channel["id"].lower()
    assert channel["name"] == f"DM-{a}-{b}"
    assert channel["metadata"] == {"user1": a, "user2": b}
    assert channel["description"] == ""
    assert channel["type"] == "dm"
    assert channel["serverId"] == "00000000-0000-0000-0000-000000000000"
    assert ISO_UTC.fullmatch(channel["createdAt"])
    created_at = datetime.fromisoformat(channel["createdAt"].replace("Z", "+00:00"))
    assert before <= created_at <= datetime.now(timezone.utc)


@pytest.mark.pgbouncer
def test_later_requests_return_the_same_channel_not_created(client):
    a, b = new_user(), new_user()
    first = get_channel(client, a, b)
    again = get_channel(client, a, b)
    assert again["created"] is False
    assert again["channel"] == first["channel"]


@pytest.mark.pgbouncer
def test_pair_is_unordered_and_case_insensitive(client):
    a, b = new_user(), new_user()
    first = get_channel(client, a, b)["channel"]
    for user1, user2 in [(b, a), (a.upper(), b), (b.upper(), a.upper())]:
        assert get_channel(client, user1, user2)["channel"] == first


def test_different_pairs_get_different_channels(client):
    a, b, c = new_user(), new_user(), new_user()
    ids = {get_channel(client, *pair)["channel"]["id"] for pair in [(a, b), (a, c), (b, c)]}
    assert len(ids) == 3


def test_any_version_nibble_is_accepted(client):
    a = "3c90c3cc-0d44-0b50-8888-8dd25736052a"  # version 0
    b = "3C90C3CC-0D44-FB50-Z888-8DD25736052A".replace("Z", "8")  # version F
    channel = get_channel(client, a, b)["channel"]
    assert channel["metadata"] == {"user1": a, "user2": b.lower()}


def test_unknown_query_parameters_are_ignored(client):
    a, b = new_user(), new_user()
    response = client.get(dm_url(a, b) + "&limit=3&userId3=x&userId3=y")
    assert response.status_code == 200


# -- invalid ids -----------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
@pytest.mark.parametrize("param", ["userId1", "userId2"])
@pytest.mark.sqlite_only
def test_malformed_id_is_refused_naming_the_parameter(client, param, bad):
    query = {"userId1": new_user(), "userId2": new_user(), param: bad}
    error = assert_envelope(client.get("/api/messaging/dm-channel", query_string=query), 400, "INVALID_USER_IDS")
    assert error["details"].startswith(f"{param}: Not a UUID")


@pytest.mark.parametrize("param", ["userId1", "userId2"])
@pytest.mark.sqlite_only
def test_missing_id_is_refused(client, param):
    query = {"userId1": new_user(), "userId2": new_user()}
    del query[param]
    error = assert_envelope(client.get("/api/messaging/dm-channel", query_string=query), 400, "INVALID_USER_IDS")
    assert error["details"] == f"{param}: Missing data for required field."


@pytest.mark.sqlite_only
def test_both_missing_names_both_in_plain_sentences(client):
    error = assert_envelope(client.get("/api/messaging/dm-channel"), 400, "INVALID_USER_IDS")
    assert error["details"] == (
        "userId1: Missing data for required field. userId2: Missing data for required field."
    )


@pytest.mark.parametrize(
    "query, code, details",
    [
        ("dm-channel?user1={a}&user2={b}", "INVALID_USER_IDS",
         "user1: not a parameter; did you mean userId1? user2: not a parameter; did you mean userId2?"),
        ("dm-channel?currentUserID={a}&targetUserId={b}", "INVALID_USER_IDS",
         "currentUserID: not a parameter; did you mean currentUserId?"),
        ("dm-channel?userId1={a}&other=1", "INVALID_USER_IDS",
         "other: not a parameter. userId2: Missing data for required field."),
        ("dm-channel?userId1={a}&userId2=x&userid2={b}", "INVALID_USER_IDS",
         "userId2: Not a UUID: expected 36 characters in the hyphenated 8-4-4-4-12 hex form"
         " (e.g. 3c90c3cc-0d44-4b50-8888-8dd25736052a). userid2: not a parameter; did you mean userId2?"),
        ("users/{a}/dm-channels?limit=0&limt=1", "INVALID_PARAMETER",
         "limit: Must be greater than or equal to 1 and less than or equal to 200."
         " limt: not a parameter; did you mean limit?"),
    ],
    ids=["both", "elizaos", "no close name", "given too", "page"],
)
@pytest.mark.sqlite_only
def test_a_parameter_no_route_reads_is_named_in_an_error_with_the_closest_one(client, query, code, details):
    error = assert_envelope(client.get("/api/messaging/" + query.format(a=new_user(), b=new_user())), 400, code)
    assert error["details"] == details


@pytest.mark.sqlite_only
def test_a_valid_query_with_a_parameter_no_route_reads_is_answered(client):
    assert client.get(dm_url(new_user(), new_user()) + "&user1=x").status_code == 200
    assert client.get(f"/api/messaging/users/{new_user()}/dm-channels?limt=1").status_code == 200


@pytest.mark.parametrize("param", ["userId1", "userId2"])
@pytest.mark.sqlite_only
def test_parameter_given_twice_is_refused_even_with_equal_values(client, param):
    a, b = new_user(), new_user()
    repeated = a if param == "userId1" else b
    response = client.get(dm_url(a, b) + f"&{param}={repeated}")
    error = assert_envelope(response, 400, "INVALID_USER_IDS")
    assert error["details"] == f"{param}: Given 2 times; give it once."


def test_self_dm_is_refused_by_default_in_any_case(client):
    a = new_user()
    error = assert_envelope(client.get(dm_url(a, a.upper())), 400, "SELF_DM_NOT_ALLOWED")
    assert a in error["details"]


@pytest.mark.pgbouncer
def test_self_dm_allowed_by_setting_is_one_notes_channel(make_app):
    client = make_app(ALLOW_SELF_DM=True).test_client()
    a = new_user()
    first = get_channel(client, a, a)
    assert first["created"] is True
    assert first["channel"]["metadata"] == {"user1": a, "user2": a}
    assert get_channel(client, a.upper(), a)["channel"] == first["channel"]


# -- errors everywhere are the envelope ----------------------------------------------


@pytest.mark.sqlite_only
def test_unknown_path_is_a_json_404_pointing_at_the_openapi_document(client):
    for path in ("/nowhere", "/", "/api", "/api/messaging", "/dm-channel/", "/api/messaging/dm-channel/"):
        error = assert_envelope(client.get(path), 404, "NOT_FOUND")
        assert error["details"] == "No such route; /openapi.json describes the API.", path


@pytest.mark.sqlite_only
def test_without_the_openapi_document_a_404_says_no_such_route(make_app):
    error = assert_envelope(make_app(OPENAPI_PATH=None).test_client().get("/api"), 404, "NOT_FOUND")
    assert error["details"] == "No such route."


@pytest.mark.sqlite_only
def test_options_answers_the_allowed_methods_with_no_body(client):
    response = client.options(dm_url(new_user(), new_user()))
    assert response.status_code == 200 and response.data == b""
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_a_doubled_slash_is_a_json_308_to_the_plain_path(client):
    a, b = new_user(), new_user()
    response = client.get(f"/api/messaging//dm-channel?userId1={a}&userId2={b}")
    error = assert_envelope(response, 308, "PERMANENT_REDIRECT")
    location = f"/api/messaging/dm-channel?userId1={a}&userId2={b}"
    assert response.headers["Location"].endswith(location)
    assert error["details"] == f"The resource is at {response.headers['Location']}."
    assert client.get(dm_url(a, b)).status_code == 200  # where it points


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.sqlite_only
def test_wrong_method_is_a_json_405_with_allow(client, method):
    response = client.open(dm_url(new_user(), new_user()), method=method)
    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


@pytest.mark.pgbouncer
def test_store_failure_is_a_500_envelope_and_logged(app, client, database, caplog):
    client.get(dm_url(new_user(), new_user()))  # the schema exists
    app.extensions["dm_channels"].store.close()
    query(database, "DROP TABLE dm_channel")
    with caplog.at_level(logging.ERROR):
        response = client.get(dm_url(new_user(), new_user()))
    error = assert_envelope(response, 500, "STORE_ERROR")
    assert error["message"] == "Error retrieving channel"
    body = response.get_data(as_text=True)
    assert "dm_channel" not in body and "Traceback" not in body
    assert "dm_channel" in caplog.text  # e.g. "no such table: dm_channel"


@pytest.mark.sqlite_only
def test_unexpected_error_is_a_500_envelope_and_logged(app, client, caplog, monkeypatch):
    def broken(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.extensions["dm_channels"].store, "get_or_create_dm", broken)
    with caplog.at_level(logging.ERROR):
        response = client.get(dm_url(new_user(), new_user()))
    assert_envelope(response, 500, "INTERNAL_ERROR")
    assert "secret internals" not in response.get_data(as_text=True)
    assert "secret internals" in caplog.text


@pytest.mark.sqlite_only
def test_a_query_string_that_is_not_utf8_is_a_400_envelope(client):
    # Raw bytes, as some servers pass them on (gunicorn refuses them itself).
    raw = "userId1=\xff\xfe&userId2=" + new_user()  # WSGI: each char one byte
    response = client.get("/api/messaging/dm-channel", environ_overrides={"QUERY_STRING": raw})
    assert_envelope(response, 400, "INVALID_QUERY_STRING")


# -- configuration -----------------------------------------------------------------


def test_server_id_setting_appears_in_channels(make_app):
    server = str(uuid.uuid4())
    client = make_app(SERVER_ID=server.upper()).test_client()
    assert get_channel(client, new_user(), new_user())["channel"]["serverId"] == server


def test_settings_come_from_flask_environment_variables(tmp_path, monkeypatch):
    server = str(uuid.uuid4())
    database = tmp_path / "from-env.sqlite3"
    monkeypatch.setenv("FLASK_DATABASE", str(database))
    monkeypatch.setenv("FLASK_SERVER_ID", server)
    monkeypatch.setenv("FLASK_ALLOW_SELF_DM", "true")
    monkeypatch.setenv("FLASK_BUSY_TIMEOUT", "2.5")
    app = create_app()
    assert app.config["BUSY_TIMEOUT"] == 2.5
    assert app.extensions["dm_channels"].store.busy_timeout == 2.5
    a = new_user()
    channel = get_channel(app.test_client(), a, a)["channel"]
    assert channel["serverId"] == server
    assert database.exists()


def test_the_app_opens_no_database_until_a_request(tmp_path):
    """Nothing is opened in create_app, so a pre-forking server stays safe."""
    database = tmp_path / "lazy.sqlite3"
    app = create_app({"TESTING": True, "DATABASE": str(database)})
    assert not database.exists()
    app.test_client().get(dm_url(new_user(), new_user()))
    assert database.exists()
    app.extensions["dm_channels"].store.close()


@pytest.mark.parametrize(
    "config, env",
    [({}, {}), ({"SQLITE_SYNCHRONOUS": "normal"}, {}), ({}, {"FLASK_SQLITE_SYNCHRONOUS": "NORMAL"})],
)
def test_the_service_commits_with_synchronous_full_unless_set(db_path, monkeypatch, config, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = create_app({"TESTING": True, "DATABASE": db_path, **config})
    store = app.extensions["dm_channels"].store
    app.test_client().get(dm_url(new_user(), new_user()))
    # A connection's own PRAGMA shows nowhere else: asked on the store's connection.
    level = store._connection().execute("PRAGMA synchronous").fetchone()[0]
    assert level == (1 if config or env else 2)  # NORMAL = 1, FULL = 2
    store.close()


@pytest.mark.parametrize(
    "setting, value",
    [
        ("ALLOW_SELF_DM", "yes"),
        ("SERVER_ID", "not-a-uuid"),
        ("BUSY_TIMEOUT", "soon"),
        ("BUSY_TIMEOUT", -1),
        ("BUSY_TIMEOUT", float("inf")),
        ("BUSY_TIMEOUT", float("nan")),
        ("BUSY_TIMEOUT", 1e10),
        ("SQLITE_SYNCHRONOUS", "SOMETIMES"),
        ("DATABASE", 123),
        ("DATABASE", ""),
        ("TRUSTED_PROXIES", -1),
        ("TRUSTED_PROXIES", "1"),
        ("TRUSTED_PROXIES", True),
    ],
)
def test_a_bad_setting_is_refused_at_start(db_path, setting, value):
    with pytest.raises(ValueError, match=f"^{setting} must be"):
        create_app({"TESTING": True, "DATABASE": db_path, setting: value})


# -- embedding and the command line ---------------------------------------------------


def test_host_app_mounts_the_service_with_one_call(tmp_path):
    host = Flask("host")
    host.config["DATABASE"] = str(tmp_path / "host.sqlite3")

    @host.get("/hello")
    def hello():
        return "hello from the host"

    init_app(host)
    client = host.test_client()
    a, b = new_user(), new_user()
    assert get_channel(client, a, b)["created"] is True
    # Errors on our routes, raised in views or by routing, are the envelope...
    assert_envelope(client.get(dm_url(a, "x")), 400, "INVALID_USER_IDS")
    assert_envelope(client.post(dm_url(a, b)), 405, "METHOD_NOT_ALLOWED")
    assert_envelope(client.get("/api/messaging/nowhere"), 404, "NOT_FOUND")
    # ...and the host's own pages are left as they were.
    assert client.get("/hello").get_data(as_text=True) == "hello from the host"
    outside = client.get("/nowhere")
    assert outside.status_code == 404 and outside.content_type.startswith("text/html")
    host.extensions["dm_channels"].store.close()


def test_host_keeps_its_own_http_error_handler(tmp_path):
    host = Flask("host")
    host.config["DATABASE"] = str(tmp_path / "host.sqlite3")
    host.register_error_handler(404, lambda e: ("host 404", 404))
    init_app(host)
    assert host.test_client().get("/nowhere").get_data(as_text=True) == "host 404"


@pytest.mark.pgbouncer
def test_init_db_command_creates_the_schema(app, runner, database):
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert app.extensions["dm_channels"].store.path in result.output
    assert "(schema version 1)" in result.output
    # The table is there: made by the command, not by this check.
    assert query(database, "SELECT count(*) FROM dm_channel") == [(0,)]


@pytest.mark.parametrize("command", ["backup", "import-sqlite"])
def test_commands_refuse_a_file_that_holds_no_channels(tmp_path, command):
    """A misspelt or wrong path is an error, never an empty copy nor a new table."""
    missing, other = tmp_path / "typo.sqlite3", tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    for source in (missing, other):
        if command == "backup":
            app = create_app({"TESTING": True, "DATABASE": str(source)})
            args = ["backup", str(tmp_path / "copy.sqlite3")]
        else:
            app = create_app({"TESTING": True, "DATABASE": str(tmp_path / "dm.sqlite3")})
            args = ["import-sqlite", str(source)]
        result = app.test_cli_runner().invoke(args=args)
        app.extensions["dm_channels"].store.close()
        assert result.exit_code != 0
        assert "Error:" in result.output and "Traceback" not in result.output
    assert not missing.exists()
    assert not (tmp_path / "copy.sqlite3").exists()
    with closing(sqlite3.connect(other)) as conn:
        assert conn.execute("SELECT name FROM sqlite_schema").fetchall() == [("notes",)]


def test_import_sqlite_says_the_pairs_whose_channel_differs_and_fails(tmp_path):
    source, target = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
    with closing(Store(source)) as old, closing(Store(target)) as new:
        made = [old.get_or_create_dm(new_user(), new_user())[0] for _ in range(10)]
        there = [new.get_or_create_dm(c.user_high, c.user_low)[0] for c in made[2:9]]
    # Only the command line accepts it: click would read this variable for the option.
    env = {"FLASK_DATABASE": str(target), "FLASK_IMPORT_SQLITE_KEEP_DIFFERENT": "1"}
    done = flask_cli("import-sqlite", str(source), env=env)
    assert done.returncode == 1
    assert done.stdout == f"Read 10 channels from {source}; added 3 to {target}.\n"
    assert done.stderr.splitlines() == [
        "Warning: FLASK_IMPORT_SQLITE_KEEP_DIFFERENT: not a setting; the README lists the settings",
        f"7 channels of SOURCE differ from {target}, which keeps its own:",
        *[f"  {c.user_low} {c.user_high}: {c.id} in SOURCE, {t.id} here" for c, t in zip(made[2:7], there)],
        "  ... and 2 more",
        "Error: clients holding the ids of SOURCE will not find those channels; --keep-different accepts that",
    ]
    done = flask_cli("import-sqlite", "--keep-different", str(source), env={"FLASK_DATABASE": str(target)})
    assert done.returncode == 0 and "added 0" in done.stdout and "7 channels of SOURCE" in done.stderr
    with closing(Store(target)) as new:
        assert [new.find_dm(c.user_low, c.user_high) for c in made[2:9]] == there


def flask_cli(*args, env):
    """A `flask --app app` command from the repository root, as a person types it."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )


REFUSED_AT_START = {
    "bad value": ({"FLASK_BUSY_TIMEOUT": '"soon"'}, "Error: BUSY_TIMEOUT must be a number of seconds"),
    "null": ({"FLASK_BUSY_TIMEOUT": "null"}, "Error: BUSY_TIMEOUT must be a number of seconds from 0 to 60, not null"),
    "null database": ({"FLASK_DATABASE": "null"}, "Error: DATABASE must be a SQLite file's path"),
    "folder missing": (
        {"FLASK_DATABASE": "/nowhere/dm.sqlite3"},
        "Error: DATABASE: cannot open /nowhere/dm.sqlite3: No such file or directory",
    ),
    "not a database": (
        {"FLASK_DATABASE": "{tmp}/notes.txt"},
        "Error: DATABASE: cannot use database {tmp}/notes.txt: file is not a database",
    ),
    "a SQLite URL": (
        {"FLASK_DATABASE": "sqlite:///srv/dm.sqlite3"},
        "Error: DATABASE must be a SQLite file's path (e.g. /srv/dm-channels.sqlite3) or a"
        " postgresql:// URL, not 'sqlite:///srv/dm.sqlite3'",
    ),
    "in memory": (
        {"FLASK_DATABASE": ":memory:"},
        "Error: DATABASE must be a SQLite file's path (e.g. /srv/dm-channels.sqlite3) or a"
        " postgresql:// URL, not ':memory:'",
    ),
    "libpq's key=value form, its password masked": (
        {"FLASK_DATABASE": "host=db.internal dbname=dm sslpassword=s3 password=secret"},
        "Error: DATABASE must be a SQLite file's path (e.g. /srv/dm-channels.sqlite3) or a"
        " postgresql:// URL, not 'password=*** dbname=dm host=db.internal sslpassword=***'",
    ),
    "another URL, its password masked": (
        {"FLASK_DATABASE": "mysql://dm:secret@db.internal/dm"},
        "Error: DATABASE must be a SQLite file's path (e.g. /srv/dm-channels.sqlite3) or a"
        " postgresql:// URL, not 'mysql://dm:***@db.internal/dm'",
    ),
}


# Every case with one command; every command with a bad setting and with a bad database.
@pytest.mark.parametrize("case, command", [(case, ["init-db"]) for case in REFUSED_AT_START] + [
    (case, command) for case in ("bad value", "not a database")
    for command in (["backup", "copy.sqlite3"], ["import-sqlite", "x"], ["run", "--port", "0"], ["routes"])
])
def test_flask_commands_refuse_to_start_in_one_line(tmp_path, command, case):
    (tmp_path / "notes.txt").write_text("not a database\n")
    env, says = (
        {name: value.replace("{tmp}", str(tmp_path)) for name, value in REFUSED_AT_START[case][0].items()},
        REFUSED_AT_START[case][1].replace("{tmp}", str(tmp_path)),
    )
    done = flask_cli(*command, env={"FLASK_DATABASE": str(tmp_path / "dm.sqlite3"), **env})
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(says), done.stderr
    assert "secret" not in done.stderr


def test_a_flask_command_warns_of_a_misspelt_setting_and_goes_on(tmp_path):
    database = str(tmp_path / "dm.sqlite3")
    env = {
        "FLASK_DATABASE": database, "FLASK_API_KYE": '"k"', "FLASK_busy_timeout": "2",
        "FLASK_RUN_PORT": "5001", "FLASK_DEBUG": "0", "FLASK_SESSION_COOKIE_NAME": "s",
    }
    done = flask_cli("init-db", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Initialized {database} ")
    assert done.stderr.splitlines() == [
        "Warning: FLASK_API_KYE: not a setting; did you mean FLASK_API_KEY?",
        "Warning: FLASK_busy_timeout: not a setting; did you mean FLASK_BUSY_TIMEOUT?",
    ]


def test_a_newer_schema_is_refused_at_start_in_one_line(tmp_path):
    database = tmp_path / "dm.sqlite3"
    with closing(Store(database)) as store:
        store.init_schema()
    with closing(sqlite3.connect(database)) as conn:
        conn.execute("PRAGMA user_version = 99")
    done = flask_cli("init-db", env={"FLASK_DATABASE": str(database)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: DATABASE: {database} has schema version 99, newer than this code's 1"
    ]


def test_a_store_error_inside_a_command_is_one_error_line(tmp_path):
    """init-db on a new file whose write lock another process holds: the
    store gives up after BUSY_TIMEOUT, and says so in one line."""
    database = str(tmp_path / "dm.sqlite3")
    with write_lock_held_by_another_process(database):
        done = flask_cli("init-db", env={"FLASK_DATABASE": database, "FLASK_BUSY_TIMEOUT": "0.2"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"Error: cannot prepare {database}: database is locked"]


def test_backup_to_a_missing_folder_names_the_folder(tmp_path):
    database = tmp_path / "dm.sqlite3"
    with closing(Store(database)) as store:
        store.get_or_create_dm(new_user(), new_user())
    dest = tmp_path / "no-such-folder" / "copy.sqlite3"
    done = flask_cli("backup", str(dest), env={"FLASK_DATABASE": str(database)})
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: cannot back up to {dest}: folder {dest.parent} does not exist"
    )


def own_calls(client, url):
    """The answer to GET url, and the calls of dm_channels' own functions it took."""
    package = os.path.dirname(dm_channels.__file__) + os.sep
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            calls.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        response = client.get(url)
    finally:
        sys.setprofile(None)
    return response, calls


def test_a_create_and_a_warm_get_take_few_calls_of_our_own(db_path, capsys):
    """The one request path stays short: docs/performance.md lists it."""
    client = create_app({"DATABASE": db_path}).test_client()
    a, b = new_user(), new_user()
    client.get(dm_url(new_user(), new_user()))  # the connection and the schema are ready
    created, create_calls = own_calls(client, dm_url(a, b))
    client.get(dm_url(a, b))  # kept from now on
    kept, get_calls = own_calls(client, dm_url(a, b))
    assert created.json["data"]["created"] is True and kept.json["data"]["created"] is False
    report(capsys, f"a create: {len(create_calls)} calls: {' '.join(create_calls)}")
    report(capsys, f"a warm get: {len(get_calls)} calls: {' '.join(get_calls)}")
    assert len(create_calls) <= 37
    assert len(get_calls) <= 10
