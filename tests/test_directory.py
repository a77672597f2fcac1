"""The read side: find a channel again, its participants, and a user's channels."""

import base64
import sqlite3
from contextlib import closing
import uuid
from urllib.parse import quote

import pytest

from helpers import dm_url, new_user, postgres
from dm_channels.store import USER_CHANNELS, Store

from helpers import BAD_IDS, assert_envelope


def make_channel(client, a, b):
    response = client.get(dm_url(a, b))
    assert response.status_code == 200
    return response.json["data"]["channel"]


def list_channels(client, user, **query):
    response = client.get(f"/api/messaging/users/{user}/dm-channels", query_string=query)
    assert response.status_code == 200, response.json
    assert response.json["success"] is True
    return response.json["data"]


def all_pages(client, user, limit, between_pages=lambda: None):
    seen, cursor = [], None
    while True:
        query = {"limit": limit} if cursor is None else {"limit": limit, "cursor": cursor}
        data = list_channels(client, user, **query)
        assert len(data["channels"]) <= limit
        seen += data["channels"]
        cursor = data["nextCursor"]
        if cursor is None:
            return seen
        between_pages()


# -- one channel -------------------------------------------------------------------


@pytest.mark.pgbouncer
def test_channel_by_id_is_the_dm_channel_object(client):
    channel = make_channel(client, new_user(), new_user())
    for spelling in (channel["id"], channel["id"].upper()):
        response = client.get(f"/api/messaging/channels/{spelling}")
        assert response.status_code == 200
        assert response.json == {"success": True, "data": {"channel": channel}}


def test_participants_are_the_two_users_sorted_and_canonical(client):
    a, b = new_user(), new_user()
    channel = make_channel(client, a.upper(), b)
    response = client.get(f"/api/messaging/channels/{channel['id']}/participants")
    assert response.status_code == 200
    assert response.json == {"success": True, "data": {"participants": sorted([a, b])}}


@pytest.mark.parametrize("suffix", ["", "/participants"])
@pytest.mark.pgbouncer
def test_unknown_channel_is_404(client, suffix):
    make_channel(client, new_user(), new_user())
    missing = new_user()
    error = assert_envelope(client.get(f"/api/messaging/channels/{missing}{suffix}"), 404, "CHANNEL_NOT_FOUND")
    assert missing in error["details"]


NONEMPTY_BAD_IDS = {name: bad for name, bad in BAD_IDS.items() if bad}


@pytest.mark.parametrize("bad", NONEMPTY_BAD_IDS.values(), ids=NONEMPTY_BAD_IDS.keys())
@pytest.mark.parametrize("suffix", ["", "/participants"])
@pytest.mark.sqlite_only
def test_malformed_channel_id_is_400(client, suffix, bad):
    path = f"/api/messaging/channels/{quote(bad, safe='')}{suffix}"
    error = assert_envelope(client.get(path), 400, "INVALID_CHANNEL_ID")
    assert error["details"].startswith("channelId: Not a UUID")


# -- a user's channels -------------------------------------------------------------


@pytest.mark.pgbouncer
def test_user_with_no_channels_gets_an_empty_list(client):
    assert list_channels(client, new_user()) == {"channels": [], "nextCursor": None}


@pytest.mark.pgbouncer
def test_users_channels_are_listed_newest_first(client):
    user = new_user()
    made = [make_channel(client, user, new_user()) for _ in range(5)]
    make_channel(client, new_user(), new_user())  # someone else's
    data = list_channels(client, user.upper())
    assert data["channels"] == made[::-1]
    assert data["nextCursor"] is None


@pytest.mark.pgbouncer
def test_user_is_found_on_either_side_of_the_pair(client):
    user = "80000000-0000-4000-8000-000000000000"
    lower = make_channel(client, user, "00000000-0000-4000-8000-000000000001")
    higher = make_channel(client, user, "ffffffff-0000-4000-8000-000000000001")
    assert list_channels(client, user)["channels"] == [higher, lower]


@pytest.mark.pgbouncer
def test_notes_to_self_channel_is_listed_once(make_app):
    client = make_app(ALLOW_SELF_DM=True).test_client()
    user = new_user()
    notes = make_channel(client, user, user)
    other = make_channel(client, user, new_user())
    assert list_channels(client, user)["channels"] == [other, notes]


@pytest.mark.pgbouncer
def test_pages_hold_every_channel_once_while_channels_are_created(client):
    user = new_user()
    existing = [make_channel(client, user, new_user())["id"] for _ in range(23)]
    created_meanwhile = []

    def create_more():
        created_meanwhile.append(make_channel(client, new_user(), user)["id"])

    seen = [channel["id"] for channel in all_pages(client, user, 5, create_more)]
    assert len(created_meanwhile) == 4
    assert seen == existing[::-1]
    # A fresh listing has the new ones first.
    everything = [channel["id"] for channel in all_pages(client, user, 200)]
    assert everything == (existing + created_meanwhile)[::-1]


@pytest.mark.pgbouncer
def test_limit_defaults_to_50(client):
    user = new_user()
    for _ in range(51):
        make_channel(client, user, new_user())
    data = list_channels(client, user)
    assert len(data["channels"]) == 50 and data["nextCursor"] is not None
    assert len(list_channels(client, user, cursor=data["nextCursor"])["channels"]) == 1


@pytest.mark.pgbouncer
def test_a_full_last_page_has_no_next_cursor(client):
    user = new_user()
    for _ in range(4):
        make_channel(client, user, new_user())
    assert list_channels(client, user, limit=4)["nextCursor"] is None


@pytest.mark.parametrize("limit", ["0", "201", "-1", "abc", "5.0", " 5", "+5", "\u0665", "", "99999999999999999999"])
@pytest.mark.sqlite_only
def test_limit_out_of_range_or_not_a_number_is_400(client, limit):
    response = client.get(f"/api/messaging/users/{new_user()}/dm-channels", query_string={"limit": limit})
    error = assert_envelope(response, 400, "INVALID_PARAMETER")
    assert error["details"].startswith("limit:")


@pytest.mark.sqlite_only
def test_limit_given_twice_is_400(client):
    response = client.get(f"/api/messaging/users/{new_user()}/dm-channels?limit=5&limit=5")
    assert_envelope(response, 400, "INVALID_PARAMETER")


@pytest.mark.sqlite_only
def test_malformed_user_id_is_400(client):
    assert_envelope(client.get("/api/messaging/users/not-a-uuid/dm-channels"), 400, "INVALID_USER_ID")


def forged(seq, channel_id):
    return base64.urlsafe_b64encode(seq.to_bytes(8, "big") + uuid.UUID(channel_id).bytes).decode()


@pytest.mark.pgbouncer
def test_malformed_and_forged_cursors_are_400(client):
    user, other = new_user(), new_user()
    for _ in range(3):
        make_channel(client, user, new_user())
    theirs = make_channel(client, other, new_user())
    real = list_channels(client, user, limit=1)["nextCursor"]
    seq = int.from_bytes(base64.urlsafe_b64decode(real)[:8], "big")
    bad_cursors = [
        "", "x", real[:-1], real + "A", real.replace(real[0], "+"),  # malformed
        "A" * 32,  # well formed, position 0
        base64.urlsafe_b64encode(b"\xff" * 24).decode(),  # seq out of range
        forged(seq, new_user()),  # a real position with an invented id
        forged(seq + 1, theirs["id"]),  # another user's channel
    ]
    for cursor in bad_cursors:
        response = client.get(f"/api/messaging/users/{user}/dm-channels", query_string={"cursor": cursor})
        error = assert_envelope(response, 400, "INVALID_CURSOR")
        assert error["details"] == "cursor: Not a cursor returned by this API."


@pytest.mark.pgbouncer
def test_another_users_cursor_is_refused(client):
    a, b = new_user(), new_user()
    for _ in range(3):
        make_channel(client, a, new_user())
    cursor = list_channels(client, a, limit=1)["nextCursor"]
    response = client.get(f"/api/messaging/users/{b}/dm-channels", query_string={"cursor": cursor})
    assert_envelope(response, 400, "INVALID_CURSOR")


def test_listing_uses_the_indexes_not_a_scan_or_a_sort(db_path):
    """On SQLite, a page costs two index searches merged in seq order, whatever
    the store's size."""
    Store(db_path).init_schema()
    with closing(sqlite3.connect(db_path)) as conn:
        page = {"user": b"u" * 16, "before": 10, "n": 51}
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + USER_CHANNELS, page)]
    assert "MERGE (UNION ALL)" in plan
    searches = [step for step in plan if step.startswith("SEARCH")]
    assert searches == [
        "SEARCH dm_channel USING INDEX dm_channel_by_low (user_low=? AND rowid<?)",
        "SEARCH dm_channel USING INDEX dm_channel_by_high (user_high=? AND rowid<?)",
    ]
    assert not any(step.startswith("SCAN") or "TEMP B-TREE" in step for step in plan)


@pytest.mark.parametrize("postgres_database", ["postgresql"], indirect=True)  # a plan: no pooler changes it
def test_postgres_listing_reads_each_users_index_newest_first(postgres_database, store_settings):
    """On PostgreSQL, each arm of the page is a backward scan of a (user, seq)
    index that stops after n rows. (seqscan is off: on an empty table the
    planner would rightly prefer it; this shows the index fits the query.)"""
    from dm_channels.pgstore import USER_CHANNELS as PG_USER_CHANNELS, PostgresStore

    store = PostgresStore(postgres_database, **store_settings)
    store.init_schema()
    store.close()
    user = uuid.uuid4()
    with postgres(postgres_database) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN " + PG_USER_CHANNELS, {"user": user, "before": 10, "n": 51}
            )
        )
    assert "Index Scan Backward using dm_channel_by_low" in plan
    assert "Index Scan Backward using dm_channel_by_high" in plan
    assert "Seq Scan" not in plan
