"""The ElizaOS server's dialect of the API, and its published client.

@elizaos/api-client (pinned in tests/elizaos/package.json) asks for a DM
channel with currentUserId, targetUserId and dmServerId and reads `data` as
the channel itself; it also reads a channel's details and a server's
channels. The first tests ask in that dialect through Flask's test client,
on every store; then the server's listing's query plans. The last drive a
real gunicorn, directly and behind the nginx front, through the client's own
classes (node tests/elizaos/calls.mjs). Without node or the client (npm ci
--prefix tests/elizaos) those are skipped, or fail when
DM_CHANNELS_REQUIRE_ELIZAOS_CLIENT=1 (as .ci/run sets it).
"""

import json
import re
import shutil
import sqlite3
import subprocess
from contextlib import closing
from datetime import datetime

import pytest

from dm_channels.store import NIL_UUID, UUID_FORM
from dm_channels.schemas import PageQuery
from dm_channels.store import ALL_CHANNELS, Store
from helpers import ROOT, assert_envelope, dm_url, new_user, postgres, unavailable

CLIENT = ROOT / "tests" / "elizaos"

# @elizaos/api-client's MessageChannel, as the ElizaOS server fills it for a DM.
MESSAGE_CHANNEL = {"id", "messageServerId", "name", "type", "metadata", "createdAt", "updatedAt"}


def elizaos_url(current, target, server=NIL_UUID):
    """The request the client's getOrCreateDmChannel sends."""
    return (
        f"/api/messaging/dm-channel?currentUserId={current}&targetUserId={target}"
        f"&dmServerId={server}"
    )


def servers_channels_url(server=NIL_UUID, query=""):
    return f"/api/messaging/message-servers/{server}/channels{query}"


def assert_message_channel(channel, pair, server_id=NIL_UUID):
    """`channel` is the channel of `pair` (two ids, any order and case) as the
    ElizaOS server answers it: every field of MessageChannel, of its type."""
    low, high = sorted(user.lower() for user in pair)
    assert set(channel) == MESSAGE_CHANNEL
    assert isinstance(channel["id"], str) and UUID_FORM.fullmatch(channel["id"])
    assert channel["id"] == channel["id"].lower()
    assert channel["messageServerId"] == server_id
    assert channel["name"] == f"DM-{low}-{high}"
    assert channel["type"] == "DM"
    assert channel["metadata"] == {"user1": low, "user2": high}
    assert channel["createdAt"].endswith("Z")
    datetime.fromisoformat(channel["createdAt"])
    assert channel["updatedAt"] == channel["createdAt"]  # channels never change


def named_in(details):
    """The parameters an error's details name ("userId1: ...")."""
    return set(re.findall(r"(?:^|\. )(\w+): ", details))


# -- the dialect, through the test client, on every store -----------------------


@pytest.mark.pgbouncer
def test_both_forms_give_one_channel_whichever_comes_first(client, app):
    a, b = new_user(), new_user()
    first = client.get(elizaos_url(b.upper(), a))
    assert first.status_code == 200 and first.json["success"] is True
    assert_message_channel(first.json["data"], (a, b))
    seed = client.get(dm_url(a, b)).json["data"]
    assert seed["created"] is False and seed["channel"]["id"] == first.json["data"]["id"]
    assert client.get(elizaos_url(a, b)).json == first.json  # swapped, and now kept

    c, d = new_user(), new_user()
    created = client.get(dm_url(c, d)).json["data"]
    assert created["created"] is True
    elizaos = client.get(elizaos_url(d, c)).json["data"]
    assert elizaos["id"] == created["channel"]["id"]
    # One cache, two answers: each form keeps its own shape.
    assert client.get(dm_url(d, c)).json["data"] == {"channel": created["channel"], "created": False}
    assert client.get(elizaos_url(c.upper(), d)).json["data"] == elizaos
    assert app.extensions["dm_channels"].store.count() == 2


def test_dm_server_id_is_checked_and_any_server_is_this_one(make_app):
    server = new_user()
    client = make_app(SERVER_ID=server.upper()).test_client()
    a, b = new_user(), new_user()
    answers = [client.get(elizaos_url(a, b, other)) for other in (NIL_UUID, server, new_user())]
    answers.append(client.get(f"/api/messaging/dm-channel?currentUserId={a}&targetUserId={b}"))
    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.json["data"]["id"] for answer in answers}) == 1
    for answer in answers:
        assert_message_channel(answer.json["data"], (a, b), server_id=server)

    error = assert_envelope(client.get(elizaos_url(a, b, "not-a-server")), 400, "INVALID_SERVER_ID")
    assert named_in(error["details"]) == {"dmServerId"}


@pytest.mark.parametrize(
    "query, named",
    [
        ("currentUserId={a}&currentUserId={a}&targetUserId={b}", {"currentUserId"}),
        ("currentUserId={a}&targetUserId={b}&targetUserId={a}", {"targetUserId"}),
        ("currentUserId={a}&dmServerId={s}", {"targetUserId"}),
        ("targetUserId={b}", {"currentUserId"}),
        ("dmServerId={s}", {"currentUserId", "targetUserId"}),
        ("currentUserId=x&targetUserId={b}", {"currentUserId"}),
        ("currentUserId={a}&targetUserId={{{b}}}", {"targetUserId"}),
    ],
    ids=["repeated current", "repeated target", "no target", "no current", "server only", "malformed", "braces"],
)
def test_a_query_repeating_or_missing_a_parameter_is_refused_naming_it(
    client, app, query, named
):
    a, b = new_user(), new_user()
    url = "/api/messaging/dm-channel?" + query.format(a=a, b=b, s=NIL_UUID)
    error = assert_envelope(client.get(url), 400, "INVALID_USER_IDS")
    assert named_in(error["details"]) == named
    assert app.extensions["dm_channels"].store.count() == 0


@pytest.mark.parametrize(
    "query", ["userId1={a}&currentUserId={b}", "userId1={a}&userId2={b}&targetUserId={a}",
              "userId1={a}&userId2={b}&dmServerId={s}"],
    ids=["mixed", "mixed3", "dmServerId with seed"],
)
@pytest.mark.sqlite_only
def test_mixing_the_forms_says_how_to_ask_in_one_sentence(client, app, query):
    url = "/api/messaging/dm-channel?" + query.format(a=new_user(), b=new_user(), s=NIL_UUID)
    error = assert_envelope(client.get(url), 400, "INVALID_USER_IDS")
    assert error["details"] == "Give userId1 and userId2, or currentUserId and targetUserId: one form, not two."
    assert app.extensions["dm_channels"].store.count() == 0


def test_a_self_dm_in_the_elizaos_form_is_refused_naming_its_parameters(client, app):
    user = new_user()
    error = assert_envelope(client.get(elizaos_url(user, user.upper())), 400, "SELF_DM_NOT_ALLOWED")
    assert error["details"] == f"currentUserId and targetUserId are the same user, {user}."
    assert app.extensions["dm_channels"].store.count() == 0


def test_channel_details_answer_as_the_elizaos_server_does(client):
    a, b = new_user(), new_user()
    channel_id = client.get(dm_url(a, b)).json["data"]["channel"]["id"]
    found = client.get(f"/api/messaging/channels/{channel_id.upper()}/details")
    assert found.status_code == 200 and found.json["success"] is True
    assert_message_channel(found.json["data"], (a, b))
    assert found.json["data"]["id"] == channel_id
    assert_envelope(client.get(f"/api/messaging/channels/{new_user()}/details"), 404, "CHANNEL_NOT_FOUND")
    error = assert_envelope(client.get("/api/messaging/channels/x/details"), 400, "INVALID_CHANNEL_ID")
    assert named_in(error["details"]) == {"channelId"}


@pytest.mark.pgbouncer
def test_the_servers_channels_come_in_bounded_pages_newest_first(client, app):
    """The client's getMessageServerChannels reads `channels`; nextCursor and
    ?cursor= (and ?limit=) page on, as a user's listing does."""
    default = PageQuery().fields["limit"].load_default
    made = [client.get(dm_url(new_user(), new_user())).json["data"]["channel"]["id"]
            for _ in range(default + 3)]
    first = client.get(servers_channels_url()).json["data"]
    assert [channel["id"] for channel in first["channels"]] == made[::-1][:default]
    assert first["nextCursor"] is not None
    # A channel made between pages neither shifts nor repeats the next one.
    client.get(dm_url(new_user(), new_user()))
    rest = client.get(servers_channels_url(query=f"?cursor={first['nextCursor']}")).json["data"]
    assert [channel["id"] for channel in rest["channels"]] == made[::-1][default:]
    assert rest["nextCursor"] is None
    for channel in first["channels"] + rest["channels"]:
        assert set(channel) == MESSAGE_CHANNEL and channel["messageServerId"] == NIL_UUID

    pages, cursor = [], ""
    while True:
        page = client.get(servers_channels_url(query=f"?limit=7{cursor}")).json["data"]
        pages.append(len(page["channels"]))
        if page["nextCursor"] is None:
            break
        cursor = f"&cursor={page['nextCursor']}"
    assert sum(pages) == app.extensions["dm_channels"].store.count() and max(pages) == 7

    too_many = client.get(servers_channels_url(query="?limit=201"))
    assert named_in(assert_envelope(too_many, 400, "INVALID_PARAMETER")["details"]) == {"limit"}
    forged = client.get(servers_channels_url(query="?cursor=" + "A" * 31 + "B"))
    assert_envelope(forged, 400, "INVALID_CURSOR")


@pytest.mark.pgbouncer
def test_another_server_has_no_channels_nor_cursors_and_a_malformed_one_is_refused(client):
    client.get(dm_url(new_user(), new_user()))
    server = new_user()
    other = client.get(servers_channels_url(server))
    assert other.status_code == 200
    assert other.json == {"success": True, "data": {"channels": [], "nextCursor": None}}
    cursor = client.get(servers_channels_url(query="?limit=1")).json["data"]["nextCursor"]
    assert cursor is None  # one channel: one page
    client.get(dm_url(new_user(), new_user()))
    cursor = client.get(servers_channels_url(query="?limit=1")).json["data"]["nextCursor"]
    assert_envelope(client.get(servers_channels_url(server, f"?cursor={cursor}")), 400, "INVALID_CURSOR")
    error = assert_envelope(client.get(servers_channels_url("x")), 400, "INVALID_SERVER_ID")
    assert named_in(error["details"]) == {"serverId"}


# -- the server's listing, on each database ----------------------------------------


def test_the_servers_listing_walks_the_primary_key_newest_first(db_path):
    """A page of every channel is a walk down seq, whatever the store's size:
    no scan of the table, no sort."""
    Store(db_path).init_schema()
    with closing(sqlite3.connect(db_path)) as conn:
        page = {"before": 10, "n": 51}
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + ALL_CHANNELS, page)]
    assert plan == ["SEARCH dm_channel USING INTEGER PRIMARY KEY (rowid<?)"]


@pytest.mark.parametrize("postgres_database", ["postgresql"], indirect=True)  # a plan: no pooler changes it
def test_postgres_servers_listing_reads_the_primary_key_backward(postgres_database, store_settings):
    from dm_channels.pgstore import ALL_CHANNELS as PG_ALL_CHANNELS, PostgresStore

    store = PostgresStore(postgres_database, **store_settings)
    store.init_schema()
    store.close()
    with postgres(postgres_database) as conn:
        conn.execute("SET enable_seqscan = off")
        page = {"before": 10, "n": 51}
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + PG_ALL_CHANNELS, page))
    assert "Index Scan Backward using dm_channel_pkey" in plan
    assert "Sort" not in plan and "Seq Scan" not in plan


# -- the published client, against real gunicorn --------------------------------


def client_calls(base_url, calls, api_key=None):
    """Make `calls`, (method, *args) each, through @elizaos/api-client's
    ElizaClient against base_url; each call's {"value": ...} or {"error": ...}."""
    node = shutil.which("node")
    required_by = "DM_CHANNELS_REQUIRE_ELIZAOS_CLIENT"
    if node is None:
        unavailable("node is not installed (.ci/run installs it)", required_by)
    if not (CLIENT / "node_modules" / "@elizaos" / "api-client").is_dir():
        unavailable("@elizaos/api-client is not installed: npm ci --prefix tests/elizaos", required_by)
    given = [
        {"baseUrl": base_url, "apiKey": api_key, "method": method, "args": list(args)}
        for method, *args in calls
    ]
    result = subprocess.run(
        [node, str(CLIENT / "calls.mjs")],
        input=json.dumps(given), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def api_error(result, status, code):
    """The ApiError the client threw, with our status and code."""
    error = result["error"]
    assert error["isApiError"] and error["name"] == "ApiError"
    assert (error["status"], error["code"]) == (status, code)
    return error


def check_the_client_against(base_url, api_key=None):
    a, b, c = new_user(), new_user(), new_user()
    made = client_calls(
        base_url,
        [
            ("getOrCreateDmChannel", {"participantIds": [a, b]}),
            ("getOrCreateDmChannel", {"participantIds": [b, a]}),
            ("getOrCreateDmChannel", {"participantIds": [c.upper(), a]}),
        ],
        api_key,
    )
    first, swapped, other = (result["value"] for result in made)
    assert_message_channel(first, (a, b))
    assert swapped == first
    assert_message_channel(other, (a, c))
    assert other["id"] != first["id"]

    reads = client_calls(
        base_url,
        [
            ("getChannelDetails", first["id"]),
            ("getMessageServerChannels", NIL_UUID),
            ("getChannelParticipants", first["id"]),
            ("getOrCreateDmChannel", {"participantIds": ["not-a-uuid", a]}),
            ("getOrCreateDmChannel", {"participantIds": [a, a.upper()]}),
            ("getChannelDetails", "not-a-uuid"),
            ("getChannelDetails", new_user()),
            ("getMessageServerChannels", "not-a-uuid"),
            ("deleteChannel", first["id"]),
            ("submitMessage", {"channel_id": first["id"], "content": "hi"}),
        ],
        api_key,
    )
    details, listed, participants, *errors, delete, submit = reads
    assert details["value"] == first
    assert {channel["id"] for channel in listed["value"]["channels"]} >= {first["id"], other["id"]}
    for channel in listed["value"]["channels"]:
        assert set(channel) == MESSAGE_CHANNEL
    assert participants["value"] == {"participants": sorted((a, b))}
    invalid_ids, self_dm, invalid_channel, unknown_channel, invalid_server = errors
    assert "currentUserId" in api_error(invalid_ids, 400, "INVALID_USER_IDS")["details"]
    api_error(self_dm, 400, "SELF_DM_NOT_ALLOWED")
    api_error(invalid_channel, 400, "INVALID_CHANNEL_ID")
    api_error(unknown_channel, 404, "CHANNEL_NOT_FOUND")
    api_error(invalid_server, 400, "INVALID_SERVER_ID")
    # What the service does not implement (docs/api.md) is an ApiError too.
    api_error(delete, 405, "METHOD_NOT_ALLOWED")
    api_error(submit, 404, "NOT_FOUND")

    # The next page, through the client's own get (docs/api.md).
    listing = f"/api/messaging/message-servers/{NIL_UUID}/channels"
    page = client_calls(base_url, [("get", listing, {"params": {"limit": 1}})], api_key)[0]["value"]
    assert [channel["id"] for channel in page["channels"]] == [other["id"]]
    following = {"params": {"limit": 1, "cursor": page["nextCursor"]}}
    page = client_calls(base_url, [("get", listing, following)], api_key)[0]["value"]
    assert [channel["id"] for channel in page["channels"]] == [first["id"]]

    if api_key is not None:
        calls = [("getOrCreateDmChannel", {"participantIds": [a, b]}), ("getChannelDetails", first["id"])]
        for key in ("wrong-" + api_key, None):
            for result in client_calls(base_url, calls, key):
                api_error(result, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("api_key", [None, "s3cret-key"], ids=["open", "with API_KEY"])
def test_the_published_client_works_against_gunicorn(gunicorn, db_path, api_key):
    env = {"FLASK_API_KEY": api_key} if api_key else {}
    check_the_client_against(gunicorn(db_path, workers=2, env=env).url, api_key)


def test_the_published_client_works_through_the_nginx_front(gunicorn, nginx, db_path):
    front = nginx(gunicorn(db_path, workers=2, env={"FLASK_API_KEY": "s3cret-key"}).port)
    check_the_client_against(front.url, "s3cret-key")
