"""Hostile and malformed input, the API key and /healthz: a clear answer, nothing more."""

import http.client
import json
import logging
import os
import pwd
import re
import sqlite3
import runpy
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from flask import Flask, request
from hypothesis import given, settings
from hypothesis import strategies as st

from dm_channels.api import MAX_QUERY_LENGTH
from dm_channels.app import create_app, init_app
from dm_channels.store import Store, StoreError, open_lock
from helpers import ROOT, dm_url, free_port, new_user, query

DM_PATH = "/api/messaging/dm-channel"

# -- strategies: query strings a hostile or broken client may send -----------------

SQL = [
    "1' OR '1'='1",
    "'; DROP TABLE dm_channel; --",
    '" OR ""="',
    "3c90c3cc-0d44-4b50-8888-8dd25736052a' --",
    "3c90c3cc-0d44-4b50-8888-8dd25736052a;DELETE FROM dm_channel",
    "x') UNION SELECT id FROM dm_channel --",
    "%27%20OR%201%3D1",
]
uuids = st.uuids().map(str)
id_like = st.one_of(
    uuids,
    uuids.map(str.upper),
    uuids.map(lambda u: "{" + u + "}"),
    uuids.map(lambda u: u.replace("-", "")),
    uuids.map(lambda u: u[:-1]),
    st.sampled_from(SQL),
    st.text(max_size=40),
)
# Percent-escapes, broken or not, and the characters that split a query.
escapes = st.sampled_from(
    ["%", "%2", "%G1", "%zz", "%00", "%0A", "%ff", "%C3", "%E2%82", "%ED%A0%80",
     "%C0%AF", "%u0041", "%25", "%26", "%3D", "+", "&", "=", ";", "#", "?"]
)
values = st.lists(st.one_of(id_like, escapes), max_size=4).map("".join)
names = st.one_of(
    st.sampled_from(["userId1", "userId2", "userid1", "USERID2", "userId1[]", "userId2%00"]),
    st.text(max_size=10),
)
params = st.tuples(names, st.booleans(), values).map(
    lambda p: p[0] + ("=" + p[2] if p[1] else "")
)
queries = st.lists(params, max_size=6).map("&".join)


def assert_json_answer(status, content_type, body):
    """200 with a channel, or a 4xx envelope: never a 5xx, never HTML."""
    assert status == 200 or 400 <= status < 500, (status, body)
    assert content_type == "application/json", (status, content_type, body)
    answer = json.loads(body)
    if status == 200:
        assert answer["success"] is True and answer["data"]["channel"]["type"] == "dm"
    else:
        assert answer["success"] is False
        assert isinstance(answer["error"]["code"], str)
        assert isinstance(answer["error"]["message"], str)


def wsgi_form(query):
    """The query as a WSGI server hands it over: its UTF-8 bytes as latin-1 text."""
    return query.encode("utf-8", "surrogatepass").decode("latin-1")


@pytest.mark.sqlite_only
def test_any_query_string_is_answered_with_json_never_5xx(client):
    @settings(max_examples=200, deadline=None)
    @given(st.one_of(queries.map(wsgi_form), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
    def check(query):
        response = client.get(DM_PATH, environ_overrides={"QUERY_STRING": query})
        assert_json_answer(response.status_code, response.content_type, response.get_data())

    check()


# What a request line may carry in its query (RFC 3986), plus "%" so that
# broken escapes reach the server as they are; everything else is escaped.
QUERY_SAFE = "-._~!$&'()*+,;=:@/?%"


def test_any_query_string_through_gunicorn_is_answered_with_json(gunicorn, db_path):
    server = gunicorn(db_path, workers=2)

    @settings(max_examples=100, deadline=None)
    @given(queries)
    def check(query):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", DM_PATH + "?" + quote(query, safe=QUERY_SAFE, errors="surrogatepass"))
            response = conn.getresponse()
            assert_json_answer(
                response.status, response.getheader("Content-Type"), response.read()
            )
        finally:
            conn.close()

    check()


# -- SQL metacharacters ------------------------------------------------------------------


@pytest.mark.parametrize("payload", SQL)
def test_sql_metacharacters_in_ids_are_refused_at_validation(client, database, payload):
    a, b = new_user(), new_user()
    assert client.get(dm_url(a, b)).status_code == 200
    for params in ({"userId1": payload, "userId2": b}, {"userId1": a, "userId2": payload}):
        response = client.get(DM_PATH + "?" + urlencode(params))
        assert response.status_code == 400
        assert response.json["error"]["code"] == "INVALID_USER_IDS"
    assert query(database, "SELECT count(*) FROM dm_channel") == [(1,)]


@pytest.mark.parametrize("payload", SQL)
def test_the_store_refuses_a_non_uuid_id_before_any_sql(app, payload):
    store = app.extensions["dm_channels"].store
    with pytest.raises(ValueError):
        store.get_or_create_dm(payload, new_user())
    assert store.count() == 0


# -- limits ---------------------------------------------------------------------------------


def padded_url(length):
    """A valid request whose query string is exactly `length` bytes long."""
    url = dm_url(new_user(), new_user()) + "&pad="
    query_length = len(url) - len(DM_PATH) - 1
    return url + "x" * (length - query_length)


def test_longest_query_is_read_one_byte_more_is_a_414_envelope(client):
    assert client.get(padded_url(MAX_QUERY_LENGTH)).status_code == 200
    response = client.get(padded_url(MAX_QUERY_LENGTH + 1))
    assert response.status_code == 414
    assert response.json["error"]["code"] == "REQUEST_URI_TOO_LONG"
    assert str(MAX_QUERY_LENGTH) in response.json["error"]["details"]


def test_gunicorn_request_line_limit_leaves_room_for_the_longest_query():
    limit = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["limit_request_line"]
    longest = f"OPTIONS {DM_PATH}?{'x' * MAX_QUERY_LENGTH} HTTP/1.1"
    assert len(longest) <= limit


def test_over_long_requests_through_gunicorn_are_4xx(gunicorn, db_path):
    server = gunicorn(db_path, workers=1)
    status, body, _ = server.get(padded_url(MAX_QUERY_LENGTH))
    assert status == 200
    status, body, headers = server.get(padded_url(MAX_QUERY_LENGTH + 1))
    assert status == 414 and body["error"]["code"] == "REQUEST_URI_TOO_LONG"
    # Beyond gunicorn's own limit, gunicorn refuses the line itself.
    status, _, _ = server.get(padded_url(8000))
    assert status == 414


# -- X-Forwarded-* headers ------------------------------------------------------------------

SPOOFED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
# Redirected (308) to the plain path.
DOUBLED = "/api//messaging/dm-channel"


def test_without_trusted_proxies_no_forwarded_header_is_believed(db_path):
    app = create_app({"TESTING": True, "DATABASE": db_path})
    answer = probe(app).get("/probe", headers=SPOOFED, environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert answer.get_data(as_text=True) == "192.0.2.1 http"
    app.extensions["dm_channels"].store.close()


def test_a_client_of_gunicorn_alone_sets_neither_its_address_nor_its_scheme(gunicorn, db_path):
    """gunicorn.conf.py trusts no X-Forwarded-* header, even from 127.0.0.1."""
    server = gunicorn(db_path, workers=1)
    user = new_user()
    status, headers, _ = raw_get(server.port, f"{DOUBLED}?userId1={user}", SPOOFED)
    assert status == 308
    assert headers["Location"] == f"/api/messaging/dm-channel?userId1={user}"
    line = server.log_line(user)
    assert line.startswith("127.0.0.1 ") and "203.0.113.7" not in line


# -- the API key ----------------------------------------------------------------------------

KEY = "k3y-Of-The-Test-0123456789"


@pytest.fixture
def keyed_app(db_path):
    app = create_app({"TESTING": True, "DATABASE": db_path, "API_KEY": KEY})
    yield app
    app.extensions["dm_channels"].store.close()


def assert_unauthorized(response):
    assert response.status_code == 401
    assert response.content_type == "application/json"
    assert response.json["success"] is False
    assert response.json["error"]["code"] == "UNAUTHORIZED"
    assert KEY not in response.get_data(as_text=True)


def test_api_key_is_off_by_default(client):
    assert client.get(dm_url(new_user(), new_user())).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-KEY": ""},
        {"X-API-KEY": KEY[:-1]},
        {"X-API-KEY": KEY + "0"},
        {"X-API-KEY": KEY.lower()},
        {"X-API-KEY": " "},
        {"X-API-KEY": "ключ"},  # not ASCII: compared as bytes, no crash
        {"Authorization": f"Bearer {KEY}"},
    ],
    ids=["missing", "empty", "short", "long", "lower", "space", "non-ascii", "wrong header"],
)
def test_api_key_missing_or_wrong_is_401(keyed_app, headers):
    client = keyed_app.test_client()
    assert_unauthorized(client.get(dm_url(new_user(), new_user()), headers=headers))
    # Checked before anything else: bad input says nothing without the key.
    assert_unauthorized(client.get(DM_PATH + "?userId1=x", headers=headers))


def test_api_key_right_is_served(keyed_app):
    client = keyed_app.test_client()
    for name in ("X-API-KEY", "x-api-key"):
        response = client.get(dm_url(new_user(), new_user()), headers={name: KEY})
        assert response.status_code == 200


def test_api_key_guards_the_service_mounted_in_a_host(tmp_path):
    host = Flask("host")
    host.config.update(DATABASE=str(tmp_path / "host.sqlite3"), API_KEY=KEY)
    init_app(host)
    client = host.test_client()
    assert_unauthorized(client.get(dm_url(new_user(), new_user())))
    assert client.get(dm_url(new_user(), new_user()), headers={"X-API-KEY": KEY}).status_code == 200
    host.extensions["dm_channels"].store.close()


def test_api_key_never_appears_in_logs_or_bodies(keyed_app, caplog):
    client = keyed_app.test_client()
    with caplog.at_level(logging.DEBUG):
        bodies = [
            client.get(dm_url(new_user(), new_user()), headers={"X-API-KEY": KEY}),
            client.get(dm_url(new_user(), new_user()), headers={"X-API-KEY": "wrong"}),
            client.get(DM_PATH + "?userId1=bad", headers={"X-API-KEY": KEY}),
            client.get("/healthz"),
        ]
    assert all(KEY not in r.get_data(as_text=True) for r in bodies)
    assert KEY not in caplog.text


def test_api_key_through_gunicorn_is_required_and_never_logged(gunicorn, db_path):
    server = gunicorn(db_path, workers=1, env={"FLASK_API_KEY": KEY})
    status, body, _ = server.get(dm_url(new_user(), new_user()))
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    status, body, _ = server.get(dm_url(new_user(), new_user()), headers={"X-API-KEY": KEY})
    assert status == 200
    status, body, _ = server.get("/healthz")
    assert status == 200
    assert KEY not in server.log()


@pytest.mark.parametrize(
    "key", ["", " padded-secret ", 12345, True, "sécret-key", "tab\tsecret"],
    ids=["empty", "spaces", "number", "bool", "non-ascii", "control"],
)
def test_a_key_no_header_could_carry_is_refused_at_start_without_quoting_it(db_path, key):
    with pytest.raises(ValueError, match="API_KEY") as refused:
        create_app({"TESTING": True, "DATABASE": db_path, "API_KEY": key})
    if isinstance(key, str) and key:
        assert key.strip() not in str(refused.value)


# -- /healthz -----------------------------------------------------------------------------------


@pytest.mark.pgbouncer
def test_healthz_is_ok_while_the_store_answers(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"success": True, "data": {"status": "ok"}}


def test_healthz_is_open_even_with_an_api_key(keyed_app):
    response = keyed_app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.json["data"] == {"status": "ok"}


def test_healthz_is_503_when_the_store_does_not_answer(db_path, caplog):
    """(On PostgreSQL: tests/test_pgstore.py, an unreachable server.)"""
    app = create_app({"TESTING": True, "DATABASE": db_path})
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    app.extensions["dm_channels"].store.close()
    with open(db_path, "wb") as f:
        f.write(b"this is not a database" * 512)
    with caplog.at_level(logging.ERROR):
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.content_type == "application/json"
    assert response.json["success"] is False
    assert response.json["error"]["code"] == "STORE_UNAVAILABLE"
    assert db_path not in response.get_data(as_text=True)
    assert "health check failed" in caplog.text
    app.extensions["dm_channels"].store.close()


# -- files: private whatever the umask ------------------------------------------------------

PRIVATE_FILES = """
import os, stat, sys
os.umask(0o022)
from flask import Flask
from dm_channels.app import init_app
from dm_channels.store import Store, StoreError

host = Flask("host", instance_path=sys.argv[1] + "/instance")
init_app(host)  # DATABASE: <instance>/dm-channels.sqlite3, the folder made here
store = host.extensions["dm_channels"].store
store.get_or_create_dm("3c90c3cc-0d44-4b50-8888-8dd25736052a", "0b1e2c4d-9f1a-4c2e-8d7b-1a2b3c4d5e6f")
with host.app_context():
    result = host.test_cli_runner().invoke(args=["backup", sys.argv[1] + "/backup.sqlite3"])
    assert result.exit_code == 0, result.output
database = store.path
paths = [os.path.dirname(database), database] + [database + end for end in ("-wal", "-shm", "-writers")]
paths.append(sys.argv[1] + "/backup.sqlite3")
for path in paths:
    print(path, oct(stat.S_IMODE(os.stat(path).st_mode)))
"""


def test_the_instance_folder_and_every_file_are_private_under_umask_022(tmp_path):
    """0700 for the folder made for DATABASE, 0600 for the database, its
    -wal, -shm and -writers and a backup, though the umask would give 0644."""
    result = subprocess.run(
        [sys.executable, "-c", PRIVATE_FILES, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    modes = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert len(modes) == 6
    folder, *files = modes
    assert modes[folder] == "0o700" and folder.endswith("/instance")
    assert {path: modes[path] for path in files} == {path: "0o600" for path in files}


def test_a_backup_never_writes_into_a_file_it_found(db_path, tmp_path):
    """The copy goes to a new file of an unguessable name: one prepared beside
    the destination, with the old predictable name, stays untouched."""
    store = Store(db_path)
    store.get_or_create_dm(new_user(), new_user())
    decoy = tmp_path / f"backup.sqlite3.partial-{os.getpid()}"
    decoy.write_bytes(b"")
    decoy.chmod(0o666)
    store.backup(tmp_path / "backup.sqlite3")
    store.close()
    assert decoy.read_bytes() == b""
    assert stat.S_IMODE(os.stat(tmp_path / "backup.sqlite3").st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if "backup" in p.name) == [
        "backup.sqlite3", decoy.name
    ]


@pytest.fixture
def shared_folder():
    """A folder anyone may write to, as /tmp (1777)."""
    folder = Path(tempfile.mkdtemp(prefix="dm-shared-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


def a_database_and_its_files(folder):
    database = folder / "dm.sqlite3"
    with closing(Store(database)) as store:
        store.get_or_create_dm(new_user(), new_user())
    for end in ("-wal", "-shm", "-writers"):  # SQLite removes -wal and -shm at close
        Path(f"{database}{end}").touch(mode=0o600)
    return database


SPOILED = {
    "another user's": "belongs to uid 65534 (nobody), not to this service's user (uid 0 (root))",
    "writable by others": "is writable by others (mode 0666)",
    "a symbolic link": "is a symbolic link",
}


@pytest.mark.parametrize("how", SPOILED)
@pytest.mark.parametrize("end", ["", "-wal", "-shm", "-writers"])
def test_a_file_not_the_services_own_is_refused_at_start_and_at_first_use(shared_folder, end, how):
    """The database, -wal, -shm and -writers: another user could read or change the
    channels, or stop every create, through any of them (root runs no one's file)."""
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("needs root, to give a file to nobody")
    database = a_database_and_its_files(shared_folder)
    path = f"{database}{end}"
    if how == "another user's":
        os.chown(path, 65534, 65534)
    elif how == "writable by others":
        os.chmod(path, 0o666)
    else:
        os.rename(path, f"{path}-real")
        os.symlink(f"{path}-real", path)
    with pytest.raises(ValueError) as refused:
        create_app({"TESTING": True, "DATABASE": str(database)})
    assert str(refused.value).startswith(f"DATABASE: {path} {SPOILED[how]}: ")
    assert "\n" not in str(refused.value)
    with closing(Store(database)) as store, pytest.raises(StoreError, match=re.escape(f"{path} {SPOILED[how]}")):
        store.get_or_create_dm(new_user(), new_user())


def said_as_nobody(work, meanwhile=None):
    """What work() raised ("accepted" if nothing) run as nobody, in a forked child (nobody may
    not reach this Python to start a new one); meanwhile() runs here, as root, until it is done."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: says what it found on the pipe, never returns to pytest
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            work()
            said = "accepted"
        except BaseException as e:
            said = str(e)
        os.write(write_end, said.encode())
        os._exit(0)
    os.close(write_end)
    if meanwhile is not None:
        meanwhile()
    with open(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run as nobody")
def test_side_files_planted_between_the_check_and_sqlites_open_are_refused(shared_folder, monkeypatch):
    """The service runs as nobody; another user (root) creates -wal and -shm after the check,
    just as SQLite opens them: they are checked again once open."""
    database = shared_folder / "dm.sqlite3"
    asked, ask = os.pipe()
    planted, tell = os.pipe()
    connect = sqlite3.connect

    def connect_after_planting(*args, **kwargs):
        os.write(ask, b"x")
        os.read(planted, 1)  # the other user has planted them
        return connect(*args, **kwargs)

    def create():
        monkeypatch.setattr(sqlite3, "connect", connect_after_planting)
        with closing(Store(database)) as store:
            store.get_or_create_dm(new_user(), new_user())

    def plant():
        assert os.read(asked, 1) == b"x"
        for end in ("-wal", "-shm"):
            Path(f"{database}{end}").touch()
            os.chmod(f"{database}{end}", 0o666)
        os.write(tell, b"x")

    said = said_as_nobody(create, plant)
    for end in (asked, ask, planted, tell):
        os.close(end)
    assert re.match(rf"{database}-(wal|shm) belongs to uid 0 \(root\), not to this service's user", said), said


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a file to nobody")
def test_an_import_reads_a_source_of_another_users(shared_folder, tmp_path):
    """import-sqlite's SOURCE is the operator's file, not the service's: its owner is not refused."""
    source = shared_folder / "old.sqlite3"
    with closing(Store(source)) as old:
        old.get_or_create_dm(new_user(), new_user())
    os.chown(source, 65534, 65534)
    app = create_app({"TESTING": True, "DATABASE": str(tmp_path / "dm.sqlite3")})
    result = app.test_cli_runner().invoke(args=["import-sqlite", str(source)])
    app.extensions["dm_channels"].store.close()
    assert result.exit_code == 0 and "Read 1 channel from" in result.output, result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a file to nobody")
def test_the_writers_lock_is_checked_as_opened_not_by_name(shared_folder):
    """open_lock checks the file it holds, which no one can swap after the check."""
    path = shared_folder / "dm.sqlite3-writers"
    path.touch()
    os.chown(path, 65534, 65534)
    with pytest.raises(StoreError, match="-writers belongs to uid 65534 "):
        open_lock(str(path))


def test_the_services_own_files_in_a_shared_folder_pass(shared_folder):
    database = a_database_and_its_files(shared_folder)
    client = create_app({"TESTING": True, "DATABASE": str(database)}).test_client()
    assert client.get(dm_url(new_user(), new_user())).status_code == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run as nobody")
def test_a_plain_user_refuses_a_file_of_roots(shared_folder):
    """Run as nobody in its own folder: its own files pass, a -shm of root's is refused."""
    nobody = pwd.getpwnam("nobody")
    folder = shared_folder / "nobodys"
    folder.mkdir(mode=0o700)
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    (folder / "dm.sqlite3-shm").touch(mode=0o644)

    def check():
        with closing(Store(folder / "ours.sqlite3")) as ours:
            ours.get_or_create_dm(new_user(), new_user())
            ours.check_writable()
        Store(folder / "dm.sqlite3").check_writable()

    assert said_as_nobody(check).startswith(
        f"{folder}/dm.sqlite3-shm belongs to uid 0 (root), not to this service's user (uid 65534 (nobody)): ")


def test_a_writers_lock_left_open_to_others_is_made_private(db_path):
    """An earlier version made <database>-writers 0644: anyone could open it
    and hold its flock, which stops every create."""
    with open(db_path + "-writers", "w"):
        pass
    os.chmod(db_path + "-writers", 0o644)
    store = Store(db_path)
    store.get_or_create_dm(new_user(), new_user())
    store.close()
    assert stat.S_IMODE(os.stat(db_path + "-writers").st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to try the files as another user")
def test_another_user_can_neither_read_the_channels_nor_hold_the_writers_lock():
    """In a folder others may look into (not the instance folder, which is
    0700), as the user nobody: the database, its -wal and the writers' lock
    cannot be opened, so neither read nor flocked."""
    folder = Path(tempfile.mkdtemp(prefix="dm-private-"))
    try:
        folder.chmod(0o755)
        database = folder / "dm.sqlite3"
        store = Store(database)
        store.get_or_create_dm(new_user(), new_user())
        nobody = pwd.getpwnam("nobody")
        store.backup(folder / "backup.sqlite3")
        paths = [database] + [f"{database}{end}" for end in ("-wal", "-shm", "-writers")]
        for path in paths + [folder / "backup.sqlite3"]:
            tried = subprocess.run(
                ["cat", str(path)], user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                capture_output=True, text=True,
            )
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, path
        store.close()
    finally:
        shutil.rmtree(folder)


# -- the guard: every spelling of the API's prefix ----------------------------------------

SPELLINGS = [
    "/api//messaging/dm-channel",
    "//api/messaging/dm-channel",
    "/api/messaging//dm-channel",
    "///api///messaging///dm-channel",
    "/api//messaging/channels/{channel}",
    "//api//messaging/users/{user}/dm-channels",
]


def raw_get(port, path, headers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_every_spelling_of_the_prefix_wants_the_key_and_redirects_to_a_path(gunicorn, db_path):
    server = gunicorn(db_path, workers=1, env={"FLASK_API_KEY": KEY})
    a, b = new_user(), new_user()
    status, body, _ = server.get(dm_url(a, b), headers={"X-API-KEY": KEY})
    channel = body["data"]["channel"]["id"]
    for spelling in SPELLINGS:
        path = spelling.format(channel=channel, user=a) + f"?userId1={a}&userId2={b}"
        for key in ({}, {"X-API-KEY": "wrong"}):
            status, headers, raw = raw_get(server.port, path, {"Host": "evil.example", **key})
            assert (status, json.loads(raw)["error"]["code"]) == (401, "UNAUTHORIZED"), path
            assert "Location" not in headers
        status, headers, raw = raw_get(server.port, path, {"Host": "evil.example", "X-API-KEY": KEY})
        assert headers["Content-Type"] == "application/json", (path, raw)
        if status == 308:
            assert json.loads(raw)["error"]["code"] == "PERMANENT_REDIRECT"
            assert headers["Location"].startswith("/api/messaging/") and "//" not in headers["Location"]
            assert "evil" not in headers["Location"] and "evil" not in raw.decode()
        else:
            assert status == 200, (path, raw)  # routing merged the slashes itself


# -- forwarded headers: believed only when they parse ----------------------------------------


def probe(app):
    """The app with a route that says what it believes of the client."""
    app.add_url_rule("/probe", "probe", lambda: f"{request.remote_addr} {request.scheme}")
    return app.test_client()


@pytest.mark.parametrize(
    "forwarded, expected",
    [
        ({"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}, "203.0.113.7 https"),
        ({"X-Forwarded-For": "2001:db8::7", "X-Forwarded-Proto": "http"}, "2001:db8::7 http"),
        ({"X-Forwarded-For": '10.0.0.1 - - [01/Jan/2020] "GET /admin" 200 0'}, "192.0.2.1 http"),
        ({"X-Forwarded-For": "evil.example"}, "192.0.2.1 http"),
        ({"X-Forwarded-For": "203.0.113.7:443"}, "192.0.2.1 http"),
        ({"X-Forwarded-For": 'fe80::1%x - - [01-Jan-2020] "GET \\admin" 200 0'}, "192.0.2.1 http"),
        ({"X-Forwarded-Proto": "gopher"}, "192.0.2.1 http"),
        ({"X-Forwarded-Proto": "https://evil.example"}, "192.0.2.1 http"),
    ],
    ids=["ipv4", "ipv6", "log line", "name", "with port", "ipv6 zone", "gopher", "url"],
)
def test_a_trusted_proxys_headers_are_believed_only_when_they_parse(db_path, forwarded, expected):
    app = create_app({"TESTING": True, "DATABASE": db_path, "TRUSTED_PROXIES": 1})
    answer = probe(app).get("/probe", headers=forwarded, environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert answer.get_data(as_text=True) == expected
    app.extensions["dm_channels"].store.close()


def test_forged_forwarded_headers_reach_neither_the_log_nor_a_location(gunicorn, db_path):
    """Against gunicorn, reachable directly, believing one proxy."""
    server = gunicorn(db_path, workers=1, env={"FLASK_TRUSTED_PROXIES": "1"})
    forged = '10.0.0.1 - - [01/Jan/2020:00:00:00 +0000] "GET /admin HTTP/1.1" 200 0 forged'
    user = new_user()
    status, headers, _ = raw_get(
        server.port, f"{DOUBLED}?userId1={user}",
        {"X-Forwarded-For": forged, "X-Forwarded-Proto": "gopher"},
    )
    assert status == 308 and headers["Location"] == f"/api/messaging/dm-channel?userId1={user}"
    line = server.log_line(user)
    assert line.startswith("127.0.0.1 - - [") and "forged" not in line
    believed = new_user()
    raw_get(server.port, f"/healthz?{believed}", {"X-Forwarded-For": "203.0.113.7"})
    assert server.log_line(believed).startswith("203.0.113.7 - - [")


def test_the_text_access_line_escapes_backslashes_and_quotes(gunicorn, db_path):
    server = gunicorn(db_path, workers=1)
    marker = new_user()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f'GET /api/messaging/channels/{marker}\\"x HTTP/1.1\r\nHost: x\r\n'
                     "Connection: close\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    line = server.log_line(marker)
    assert f'"GET /api/messaging/channels/{marker}\\\\\\"x HTTP/1.1" 400 ' in line
    # Read back as the quoted field it is, the line gives the path as sent.
    uri = re.search(r'"GET ((?:[^"\\]|\\.)*) HTTP/1.1"', line).group(1)
    assert re.sub(r"\\(.)", r"\1", uri) == f'/api/messaging/channels/{marker}\\"x'


# -- keys: present means on ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["API_KEY", "METRICS_TOKEN"])
@pytest.mark.parametrize("value", ["null", '""', '"  "', ""], ids=["null", "empty", "blank", "unset-empty"])
def test_a_null_empty_or_blank_key_stops_gunicorn_with_one_line(gunicorn, db_path, name, value):
    env = {f"FLASK_{name}": value, "FLASK_METRICS": "true"}
    server = gunicorn(db_path, workers=1, env=env, wait=False)
    returncode = server.process.wait(60)
    log = server.log()
    server.stop()  # closes its log
    assert returncode == 1
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "unset it to turn the key off" in lines[0], log
    assert "Traceback" not in log


@pytest.mark.parametrize("name", ["API_KEY", "METRICS_TOKEN"])
def test_a_key_set_to_none_in_a_config_is_refused(db_path, name):
    with pytest.raises(ValueError, match=f"^{name} .*unset it to turn the key off"):
        create_app({"TESTING": True, "DATABASE": db_path, name: None})


@pytest.mark.parametrize(
    "env, said",
    [
        ({}, "the API is open to anyone who reaches it: API_KEY is not set"),
        ({"FLASK_API_KEY": KEY}, "the API wants an API key (X-API-KEY)"),
        ({"FLASK_METRICS": "true"}, "/metrics is open: METRICS_TOKEN is not set"),
        ({"FLASK_METRICS": "true", "FLASK_METRICS_TOKEN": KEY}, "/metrics wants METRICS_TOKEN"),
    ],
    ids=["open", "keyed", "metrics open", "metrics token"],
)
def test_gunicorn_says_once_at_start_whether_a_key_is_wanted(gunicorn, db_path, env, said):
    server = gunicorn(db_path, workers=2, env=env)
    lines = [line for line in server.log().splitlines() if "dm-channels: the API" in line]
    assert len(lines) == 1 and said in lines[0]
    assert KEY not in server.log()


# -- a body cannot hold a thread ------------------------------------------------------------


@pytest.mark.xdist_group("timing")
def test_a_request_announcing_a_body_is_answered_and_closed_not_waited_for(gunicorn, db_path):
    """2 workers of 4 threads, 40 keyless clients of each method announcing a body
    of 100000 bytes and sending it at a byte a second: each gets its answer with
    "Connection: close" at once, and keyed gets keep answering meanwhile."""
    server = gunicorn(db_path, workers=2, env={"FLASK_API_KEY": KEY})
    slow = []
    for method in ("GET", "POST", "OPTIONS") * 40:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(f"{method} {dm_url(new_user(), new_user())} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 100000\r\n\r\n".encode())
        slow.append(sock)
    for sock in slow:
        head = sock.recv(65536).decode()
        assert head.startswith("HTTP/1.1 401") and "\r\nConnection: close\r\n" in head, head
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            for sock in slow:
                try:
                    sock.send(b"x")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        for _ in range(8):
            began = time.monotonic()
            status, _, _ = server.get(dm_url(new_user(), new_user()), timeout=2, headers={"X-API-KEY": KEY})
            assert status == 200 and time.monotonic() - began < 0.5
            time.sleep(0.25)
    finally:
        stop.set()
        trickler.join()
        for sock in slow:
            sock.close()


def test_a_get_without_a_body_is_still_kept_alive(gunicorn, db_path):
    server = gunicorn(db_path, workers=1)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for headers in ({}, {"Content-Length": "0"}):
        connection.request("GET", "/healthz", headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200 and response.getheader("Connection") != "close"
    connection.close()


# -- gunicorn's control socket ----------------------------------------------------------------

BARE_APP = "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'']\n"


def test_no_instance_makes_or_removes_a_control_socket(gunicorn, db_path, tmp_path):
    """gunicorn 25.1+ bind every instance of a user to one control socket
    ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl), and stopping one removes
    it under the rest. gunicorn.conf.py turns it off: another gunicorn's socket
    outlives two of ours started and stopped."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": ""}
    (tmp_path / "bare.py").write_text(BARE_APP)
    other = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{free_port()}", "bare:app"],
        cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    control = home / ".gunicorn" / "gunicorn.ctl"
    try:
        deadline = time.monotonic() + 30
        while not control.exists():
            assert time.monotonic() < deadline and other.poll() is None, "no control socket"
            time.sleep(0.05)
        first, second = gunicorn(db_path, workers=1, env=env), gunicorn(db_path, workers=1, env=env)
        first.stop()
        assert second.get("/healthz")[0] == 200
        second.stop()
        assert control.exists()  # the other gunicorn's, still there
        assert [p.name for p in control.parent.iterdir()] == ["gunicorn.ctl"]
    finally:
        other.terminate()
        other.wait(30)
