"""The fast path (fastpath.py) answers exactly as Flask would, from a bounded cache."""

import logging
import sqlite3
from contextlib import closing

from flask import Flask
from hypothesis import example, given, settings, strategies as st
from werkzeug.test import Client

from helpers import assert_envelope, dm_url, new_user

from dm_channels import ops
from dm_channels.app import create_app, init_app

A, B = "3c90c3cc-0d44-4b50-8888-8dd25736052a", "0b1e2c4d-9f1a-4c2e-8d7b-1a2b3c4d5e6f"


def both_paths(app):
    """Clients of the app as served (fast path first) and of Flask alone,
    each inside the request layer (request ids)."""
    flask_alone = ops.RequestLayer(fast_path(app).wsgi_app, app)
    return Client(app), Client(flask_alone)


def fast_path(app):
    return app.extensions["dm_channels_fastpath"]


def answer(client, url, headers=None):
    # One request id for all, so that answers can be the same bytes.
    response = client.get(url, headers={"X-Request-ID": "test", **(headers or {})})
    return response.status, sorted(response.headers.items()), response.get_data()


class StoreCalls:
    """Counts the store's get_or_create_dm calls (and passes them on)."""

    def __init__(self, app, monkeypatch):
        self.count = 0
        store = app.extensions["dm_channels"]
        real = store.get_or_create_dm

        def counted(*args):
            self.count += 1
            return real(*args)

        monkeypatch.setattr(store, "get_or_create_dm", counted)


def test_a_warm_get_is_answered_byte_for_byte_as_flask_answers_it(make_app):
    app = make_app()
    fast, flask = both_paths(app)
    a, b = new_user(), new_user()
    created = fast.get(dm_url(a, b))
    assert created.json["data"]["created"] is True
    for url in (dm_url(a, b), dm_url(b, a), dm_url(a.upper(), b)):
        first, cached, by_flask = answer(fast, url), answer(fast, url), answer(flask, url)
        assert first == cached == by_flask
        assert first[0] == "200 OK"
    # A create answered by each path: the same shape and size.
    by_fast = fast.get(dm_url(new_user(), new_user()))
    by_flask = flask.get(dm_url(new_user(), new_user()))
    assert by_fast.json["data"]["created"] is by_flask.json["data"]["created"] is True
    assert list(by_fast.json["data"]["channel"]) == list(by_flask.json["data"]["channel"])
    assert [name for name, _ in sorted(by_fast.headers.items())] == [
        name for name, _ in sorted(by_flask.headers.items())
    ]


PARTS = st.sampled_from([
    f"userId1={A}", f"userId2={B}", f"userId1={B}", f"userId2={A}", f"userId2={A.upper()}",
    f"userId1={A.replace('-', '%2D', 1)}", f"userId2={B}%20", "userId1=", "userId2=x",
    f"userid1={A}", "limit=3", f"userId1={A}&userId1={A}", "", "userId2",
])


@settings(max_examples=150, deadline=None)
@example(parts=[f"userId1={A}", f"userId2={A.upper()}"], key="k")  # one user twice
@example(parts=[f"userId2={A}", f"userId1={B}"], key="k")
@given(parts=st.lists(PARTS, min_size=0, max_size=4), key=st.sampled_from([None, "k", "wrong"]))
def test_any_query_is_answered_by_the_fast_path_as_by_flask(tmp_path_factory, parts, key):
    database = tmp_path_factory.mktemp("fast") / "dm.sqlite3"
    app = create_app({"TESTING": True, "DATABASE": str(database), "API_KEY": "k"})
    try:
        fast, flask = both_paths(app)
        url = "/api/messaging/dm-channel?" + "&".join(parts)
        headers = {} if key is None else {"X-API-KEY": key}
        flask.get(dm_url(A, B), headers={"X-API-KEY": "k"})  # the pair's channel exists
        assert answer(fast, url, headers) == answer(fast, url, headers) == answer(flask, url, headers)
    finally:
        app.extensions["dm_channels"].close()


def test_a_cached_pair_is_answered_without_the_store(make_app, monkeypatch):
    app = make_app()
    calls = StoreCalls(app, monkeypatch)
    client = app.test_client()
    a, b = new_user(), new_user()
    client.get(dm_url(a, b))  # creates: the answer says created, so it is not kept
    client.get(dm_url(a, b))  # finds, and keeps the answer
    assert calls.count == 2
    for url in (dm_url(a, b), dm_url(b, a), dm_url(b.upper(), a)):
        assert client.get(url).status_code == 200
    assert calls.count == 2


def test_the_cache_keeps_at_most_its_size_and_lets_the_oldest_go(make_app, monkeypatch):
    app = make_app(CHANNEL_CACHE_SIZE=3)
    client = app.test_client()
    pairs = [(new_user(), new_user()) for _ in range(4)]
    for pair in pairs:
        client.get(dm_url(*pair))
        client.get(dm_url(*pair))
    calls = StoreCalls(app, monkeypatch)
    for pair in pairs[1:]:
        client.get(dm_url(*pair))
    assert calls.count == 0
    client.get(dm_url(*pairs[0]))  # the oldest went when the fourth came
    assert calls.count == 1
    assert len(fast_path(app).cache) == 3


def test_a_cache_of_size_0_asks_the_store_every_time(make_app, monkeypatch):
    app = make_app(CHANNEL_CACHE_SIZE=0)
    calls = StoreCalls(app, monkeypatch)
    client = app.test_client()
    a, b = new_user(), new_user()
    for _ in range(3):
        assert client.get(dm_url(a, b)).status_code == 200
    assert calls.count == 3


def test_a_store_error_on_the_fast_path_is_logged_and_answered_with_the_envelope(
    db_path, caplog
):
    app = create_app({"TESTING": True, "DATABASE": db_path, "BUSY_TIMEOUT": 0.2})
    client = app.test_client()
    a, b = new_user(), new_user()
    client.get(dm_url(a, b))
    client.get(dm_url(a, b))
    with closing(sqlite3.connect(db_path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held outside the store
        with caplog.at_level(logging.ERROR):
            failed = client.get(dm_url(new_user(), new_user()))
        assert client.get(dm_url(a, b)).status_code == 200  # cached: no lock needed
        holder.execute("ROLLBACK")
    assert_envelope(failed, 500, "STORE_ERROR")
    assert "locked" not in failed.get_data(as_text=True)
    [logged] = caplog.records
    assert logged.getMessage().startswith("store failure on /api/messaging/dm-channel")
    app.extensions["dm_channels"].close()


def test_a_host_app_keeps_its_hooks_for_every_request(tmp_path):
    """init_app installs no fast path: it would skip the host's hooks."""
    host = Flask("host")
    host.config.update(DATABASE=str(tmp_path / "dm.sqlite3"))
    seen = []
    host.before_request(lambda: seen.append(1))
    init_app(host)
    client = host.test_client()
    a, b = new_user(), new_user()
    for _ in range(3):
        assert client.get(dm_url(a, b)).status_code == 200
    assert len(seen) == 3
    host.extensions["dm_channels"].close()
