"""One path for every request: the answers of existing pairs are kept inside
Flask's handling of the request (api.AnswerCache), so every hook of the app
runs for them, in create_app's app and in a host's alike."""

import logging
import sqlite3
from contextlib import closing

import pytest
from flask import Flask

from helpers import assert_envelope, dm_url, new_user

from dm_channels.app import create_app, init_app


class StoreCalls:
    """Counts the store's get_or_create_dm calls (and passes them on)."""

    def __init__(self, app, monkeypatch):
        self.count = 0
        store = app.extensions["dm_channels"].store
        real = store.get_or_create_dm

        def counted(*args):
            self.count += 1
            return real(*args)

        monkeypatch.setattr(store, "get_or_create_dm", counted)


def host_app(tmp_path):
    host = Flask("host")
    host.config.update(DATABASE=str(tmp_path / "host.sqlite3"))
    init_app(host)
    return host


@pytest.mark.parametrize("kind", ["create_app", "init_app"])
def test_every_hook_runs_for_every_warm_get(tmp_path, monkeypatch, kind):
    app = create_app({"DATABASE": str(tmp_path / "dm.sqlite3")}) if kind == "create_app" else host_app(tmp_path)
    calls = {"before": 0, "after": 0}

    @app.before_request
    def before():
        calls["before"] += 1

    @app.after_request
    def after(response):
        calls["after"] += 1
        return response

    client = app.test_client()
    a, b = new_user(), new_user()
    client.get(dm_url(a, b))  # made, then kept by the next
    client.get(dm_url(a, b))
    calls.update(before=0, after=0)
    store = StoreCalls(app, monkeypatch)
    answers = {client.get(dm_url(a, b)).get_data() for _ in range(1000)}
    assert calls == {"before": 1000, "after": 1000}
    assert store.count == 0  # every one of them a kept answer
    assert len(answers) == 1
    app.extensions["dm_channels"].store.close()


@pytest.mark.parametrize("kind", ["create_app", "init_app"])
def test_a_kept_answer_skips_the_store_and_is_the_same_bytes(tmp_path, monkeypatch, kind):
    app = create_app({"DATABASE": str(tmp_path / "dm.sqlite3")}) if kind == "create_app" else host_app(tmp_path)
    client = app.test_client()
    a, b = new_user(), new_user()
    assert client.get(dm_url(a, b)).json["data"]["created"] is True  # said once: not kept
    found = client.get(dm_url(a, b))
    calls = StoreCalls(app, monkeypatch)
    for url in (dm_url(a, b), dm_url(b, a), dm_url(b.upper(), a)):
        for _ in range(2):  # kept by the bytes of the query that asked
            kept = client.get(url)
            assert kept.get_data() == found.get_data()
            assert kept.headers["Content-Type"] == found.headers["Content-Type"] == "application/json"
    assert calls.count == 2  # the two other spellings, each asked of the store once
    app.extensions["dm_channels"].store.close()


@pytest.mark.pgbouncer
def test_the_cache_keeps_at_most_its_size_and_lets_the_least_recently_used_go(make_app, monkeypatch):
    app = make_app(CHANNEL_CACHE_SIZE=3)
    client = app.test_client()
    pairs = [(new_user(), new_user()) for _ in range(4)]
    for pair in pairs[:3]:
        client.get(dm_url(*pair))
        client.get(dm_url(*pair))  # kept
    client.get(dm_url(*pairs[0]))  # the oldest kept, used again: now the most recent
    client.get(dm_url(*pairs[3]))
    client.get(dm_url(*pairs[3]))  # kept: the least recently used goes, pairs[1]
    calls = StoreCalls(app, monkeypatch)
    for pair in (pairs[0], pairs[2], pairs[3]):
        client.get(dm_url(*pair))
    assert calls.count == 0
    client.get(dm_url(*pairs[1]))
    assert calls.count == 1


def test_a_cache_of_size_0_asks_the_store_every_time(make_app, monkeypatch):
    app = make_app(CHANNEL_CACHE_SIZE=0)
    calls = StoreCalls(app, monkeypatch)
    client = app.test_client()
    a, b = new_user(), new_user()
    for _ in range(3):
        assert client.get(dm_url(a, b)).status_code == 200
    assert calls.count == 3


def test_an_invalid_query_is_refused_even_for_a_kept_pair(make_app):
    app = make_app(API_KEY="k")
    client = app.test_client()
    key = {"X-API-KEY": "k"}
    a, b = new_user(), new_user()
    client.get(dm_url(a, b), headers=key)
    client.get(dm_url(a, b), headers=key)  # kept
    assert_envelope(client.get(dm_url(a, b)), 401, "UNAUTHORIZED")
    assert_envelope(client.get(dm_url(a, b) + f"&userId1={a}", headers=key), 400, "INVALID_USER_IDS")
    assert_envelope(client.post(dm_url(a, b), headers=key), 405, "METHOD_NOT_ALLOWED")


def test_a_store_error_on_a_miss_is_logged_and_answered_with_the_envelope(db_path, caplog):
    app = create_app({"TESTING": True, "DATABASE": db_path, "BUSY_TIMEOUT": 0.2})
    client = app.test_client()
    a, b = new_user(), new_user()
    client.get(dm_url(a, b))
    client.get(dm_url(a, b))
    with closing(sqlite3.connect(db_path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held outside the store
        with caplog.at_level(logging.ERROR):
            failed = client.get(dm_url(new_user(), new_user()))
        assert client.get(dm_url(a, b)).status_code == 200  # kept: no lock needed
        holder.execute("ROLLBACK")
    assert_envelope(failed, 500, "STORE_ERROR")
    assert "locked" not in failed.get_data(as_text=True)
    [logged] = caplog.records
    assert logged.getMessage().startswith("store failure on /api/messaging/dm-channel")
    app.extensions["dm_channels"].store.close()
