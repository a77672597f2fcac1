"""/openapi.json: generated from the code, and checked by an outside client."""

import re
import subprocess
import sys
from pathlib import Path

import json
import uuid

import pytest

from dm_channels import api, schemas
from dm_channels.api import bp
from dm_channels.app import create_app
from helpers import ROOT

# The document and the limits it states are the routes', whatever the store.
pytestmark = pytest.mark.sqlite_only


def test_document_is_openapi_3_with_the_seed_names(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json
    assert doc["openapi"].startswith("3.")
    assert set(doc["components"]["schemas"]["Error"]["properties"]) == {"success", "error"}
    assert set(doc["components"]["schemas"]["Channel"]["properties"]) == {
        "id", "name", "serverId", "type", "description", "metadata", "createdAt"
    }
    assert set(doc["components"]["schemas"]["ElizaOSChannel"]["properties"]) == {
        "id", "messageServerId", "name", "type", "metadata", "createdAt", "updatedAt"
    }
    operation = doc["paths"]["/api/messaging/dm-channel"]["get"]
    # The seed's form first, then the ElizaOS server's. Each is optional in
    # the document: what is required is one form's pair (an OpenAPI document
    # cannot say so; the parameters' descriptions do).
    assert [(p["name"], p["in"], p["required"]) for p in operation["parameters"]] == [
        ("userId1", "query", False),
        ("userId2", "query", False),
        ("currentUserId", "query", False),
        ("targetUserId", "query", False),
        ("dmServerId", "query", False),
    ]
    assert set(operation["responses"]) == {"200", "400", "414", "500"}
    answers = operation["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert answers == [
        {"$ref": "#/components/schemas/DMChannelSuccess"},
        {"$ref": "#/components/schemas/ElizaOSChannelSuccess"},
    ]


# Each route with every one of its parameters invalid (but those named last,
# sent valid so that the query's are checked: a path's are checked first),
# and what it answers; dm-channel once per form (a query mixing them is
# refused for that alone).
ALL_INVALID = {
    "/api/messaging/dm-channel": (
        (
            "/api/messaging/dm-channel?userId1=x&userId2=x",
            "/api/messaging/dm-channel?currentUserId=x&targetUserId=x&dmServerId=x",
        ),
        "INVALID_USER_IDS",
        set(),
    ),
    "/api/messaging/channels/{channelId}": ("/api/messaging/channels/x", "INVALID_CHANNEL_ID", set()),
    "/api/messaging/channels/{channelId}/participants": (
        "/api/messaging/channels/x/participants", "INVALID_CHANNEL_ID", set()
    ),
    "/api/messaging/users/{userId}/dm-channels": (
        f"/api/messaging/users/{uuid.uuid4()}/dm-channels?limit=x&cursor=x",
        "INVALID_PARAMETER",
        {"userId"},
    ),
    "/api/messaging/channels/{channelId}/details": (
        "/api/messaging/channels/x/details", "INVALID_CHANNEL_ID", set()
    ),
    "/api/messaging/message-servers/{serverId}/channels": (
        f"/api/messaging/message-servers/{uuid.uuid4()}/channels?limit=x&cursor=x",
        "INVALID_PARAMETER",
        {"serverId"},
    ),
}


def test_every_documented_parameter_is_one_the_route_reads(app, client):
    """Not the document against itself: each route is sent every documented
    parameter invalid, and its 400 names exactly the documented ones it read."""
    doc = client.get("/openapi.json").json
    routes = [rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith(bp.name + ".")]
    assert {rule.rule.replace("<", "{").replace(">", "}") for rule in routes} == set(ALL_INVALID)
    for path, (urls, code, sent_valid) in ALL_INVALID.items():
        parameters = doc["paths"][path]["get"]["parameters"]
        named = set()
        for url in urls if isinstance(urls, tuple) else (urls,):
            response = client.get(url)
            assert response.status_code == 400 and response.json["error"]["code"] == code
            named |= set(re.findall(r"(?:^|\. )(\w+): ", response.json["error"]["details"]))
        assert named == {p["name"] for p in parameters} - sent_valid, path
        for status, answer in doc["paths"][path]["get"]["responses"].items():
            schema = answer["content"]["application/json"]["schema"]
            refs = [choice["$ref"] for choice in schema.get("oneOf", [schema])]
            assert all(ref == "#/components/schemas/Error" for ref in refs) == (status != "200")


def resolve(node, components):
    if isinstance(node, dict):
        if "$ref" in node:
            return resolve(components[node["$ref"].rsplit("/", 1)[1]], components)
        return {key: resolve(value, components) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, components) for value in node]
    return node


def shapes(doc):
    """Each operation with every $ref resolved, so that component names do not
    count, and each error response's codes as a sorted list."""
    components = doc.get("components", {}).get("schemas", {})
    operations = {}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            operation = resolve(operation, components)
            for status, response in operation["responses"].items():
                codes = sorted(response["description"].split(" or "))
                response["description"] = "-" if status == "200" else codes
            operation.pop("summary")
            operation.pop("operationId")
            operations[f"{method.upper()} {path}"] = operation
    return operations


@pytest.mark.parametrize("key", [None, "k"], ids=["without API_KEY", "with API_KEY"])
def test_the_document_has_the_shapes_it_had_before_the_views_were_declared_once(db_path, key):
    """tests/openapi_shapes.json: the document as it was served before the
    views were declared with api.endpoint (paths, parameters, responses,
    schemas), written once by the code of that time."""
    before = json.loads((ROOT / "tests" / "openapi_shapes.json").read_text())
    before = before["with API_KEY" if key else "without API_KEY"]
    app = create_app({"TESTING": True, "DATABASE": db_path, **({"API_KEY": key} if key else {})})
    now = shapes(app.test_client().get("/openapi.json", headers={"X-API-KEY": "k"}).json)
    app.extensions["dm_channels"].store.close()
    # Since then, the ElizaOS server's form of dm-channel: its seed form is
    # what it was, but that either form's pair is now what is required.
    dm, dm_before = now.pop("GET /api/messaging/dm-channel"), before.pop("GET /api/messaging/dm-channel")
    seed = [{**p, "required": True} for p in dm["parameters"][:2]]
    assert [{k: v for k, v in p.items() if k != "description"} for p in seed] == dm_before["parameters"]
    assert dm["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"][0] == (
        dm_before["responses"]["200"]["content"]["application/json"]["schema"]
    )
    for status, answer in dm_before["responses"].items():
        if status != "200":
            assert set(answer["description"]) <= set(dm["responses"][status]["description"])
    # And the ElizaOS server's two reads.
    added = {
        "GET /api/messaging/channels/{channelId}/details",
        "GET /api/messaging/message-servers/{serverId}/channels",
    }
    assert {name: now[name] for name in now if name not in added} == before


@pytest.mark.parametrize(
    "path",
    ["/api/messaging/users/{userId}/dm-channels", "/api/messaging/message-servers/{serverId}/channels"],
)
def test_documented_limits_are_the_ones_enforced(client, path):
    doc = client.get("/openapi.json").json
    operation = doc["paths"][path]["get"]
    limit = next(p for p in operation["parameters"] if p["name"] == "limit")["schema"]
    field = schemas.PageQuery().fields["limit"]
    assert (limit["minimum"], limit["maximum"]) == (field.validators[0].min, field.validators[0].max)
    assert limit["default"] == field.load_default


def test_schemathesis_finds_nothing_against_the_served_document(gunicorn, db_path, tmp_path):
    """Every schemathesis check, all phases, against real gunicorn; bounded examples."""
    server = gunicorn(db_path, workers=2)
    schemathesis = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [
            str(schemathesis),
            "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
            "--no-color",
            "run", server.url + "/openapi.json",
            "--checks", "all",
            "--max-examples", "60",
            "--seed", "20261125",
            "--request-timeout", "10",
        ],
        cwd=tmp_path,  # its cache goes there, not into the repository
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout or "passed" in result.stdout


def test_every_operation_documents_the_errors_any_route_can_answer(client):
    doc = client.get("/openapi.json").json
    api = {name: path for name, path in doc["paths"].items() if name.startswith("/api/")}
    assert len(api) == 6
    for path in api.values():
        responses = path["get"]["responses"]
        assert "INVALID_QUERY_STRING" in responses["400"]["description"]
        assert responses["414"]["description"] == "REQUEST_URI_TOO_LONG"
        assert "STORE_ERROR" in responses["500"]["description"]
        assert "401" not in responses and "security" not in path["get"]


def test_with_an_api_key_the_document_requires_it(db_path):
    app = create_app({"TESTING": True, "DATABASE": db_path, "API_KEY": "s3cret-key"})
    response = app.test_client().get("/openapi.json")  # the document itself stays open
    assert response.status_code == 200
    doc = response.json
    assert doc["components"]["securitySchemes"] == {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}
    }
    for name, path in doc["paths"].items():
        if name == "/healthz":  # load balancers probe it without the key
            assert "security" not in path["get"] and "401" not in path["get"]["responses"]
            continue
        assert path["get"]["security"] == [{"ApiKey": []}]
        assert path["get"]["responses"]["401"]["description"] == "UNAUTHORIZED"
    assert "s3cret-key" not in response.get_data(as_text=True)


def test_healthz_is_documented(client):
    operation = client.get("/openapi.json").json["paths"]["/healthz"]["get"]
    assert set(operation["responses"]) == {"200", "503"}
    assert operation["responses"]["503"]["description"] == "STORE_UNAVAILABLE"


def test_every_error_code_is_declared_once_documented_and_in_the_api_reference(db_path):
    """The codes declared in api.py (api.ERRORS), the codes the
    served document lists, and docs/api.md's table: all three equal."""
    declared = set(api.ERRORS)
    app = create_app({"TESTING": True, "DATABASE": db_path, "API_KEY": "key"})
    doc = app.test_client().get("/openapi.json").json
    app.extensions["dm_channels"].store.close()
    documented = {
        code
        for path in doc["paths"].values()
        for status, response in path["get"]["responses"].items()
        if status != "200"
        for code in response["description"].split(" or ")
    }
    reference = (ROOT / "docs" / "api.md").read_text()
    table = set(re.findall(r"^\| \d{3} \| `([A-Z_]+)` \|", reference, flags=re.M))
    assert documented == declared - {"METHOD_NOT_ALLOWED"}  # 405: no route documents it
    assert table == declared
