"""Hostile and malformed input, the API key and /healthz: a clear answer, nothing more."""

import http.client
import json
import logging
import runpy
from urllib.parse import quote, urlencode

import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

from dm_channels.app import MAX_QUERY_LENGTH, create_app, init_app
from helpers import ROOT, dm_url, new_user, query

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
    store = app.extensions["dm_channels"]
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
# Redirected (308) to the plain path, with the request's scheme and host.
DOUBLED = "/api//messaging/dm-channel"


@pytest.mark.parametrize("proxies, scheme", [(0, "http"), (1, "https")])
def test_the_forwarded_scheme_is_read_only_with_trusted_proxies(db_path, proxies, scheme):
    app = create_app({"TESTING": True, "DATABASE": db_path, "TRUSTED_PROXIES": proxies})
    response = app.test_client().get(DOUBLED, headers=SPOOFED)
    assert response.status_code == 308
    assert response.headers["Location"] == f"{scheme}://localhost/api/messaging/dm-channel"
    app.extensions["dm_channels"].close()


def test_a_client_of_gunicorn_alone_sets_neither_its_address_nor_its_scheme(gunicorn, db_path):
    """gunicorn.conf.py trusts no X-Forwarded-* header, even from 127.0.0.1."""
    server = gunicorn(db_path, workers=1)
    user = new_user()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", f"{DOUBLED}?userId1={user}", headers=SPOOFED)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 308
    assert response.getheader("Location").startswith(f"http://127.0.0.1:{server.port}/")
    line = server.log_line(user)
    assert line.startswith("127.0.0.1 ") and "203.0.113.7" not in line


# -- the API key ----------------------------------------------------------------------------

KEY = "k3y-Of-The-Test-0123456789"


@pytest.fixture
def keyed_app(db_path):
    app = create_app({"TESTING": True, "DATABASE": db_path, "API_KEY": KEY})
    yield app
    app.extensions["dm_channels"].close()


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
    host.extensions["dm_channels"].close()


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
    app.extensions["dm_channels"].close()
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
    app.extensions["dm_channels"].close()
