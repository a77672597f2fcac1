"""/openapi.json: generated from the code, and checked by an outside client."""

import re
import subprocess
import sys
from pathlib import Path

from dm_channels.app import bp, create_app
from conftest import ROOT

from dm_channels import schemas


def test_document_is_openapi_3_with_the_seed_names(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json
    assert doc["openapi"].startswith("3.")
    assert set(doc["components"]["schemas"]["Error"]["properties"]) == {"success", "error"}
    assert set(doc["components"]["schemas"]["Channel"]["properties"]) == {
        "id", "name", "serverId", "type", "description", "metadata", "createdAt"
    }
    operation = doc["paths"]["/api/messaging/dm-channel"]["get"]
    assert {(p["name"], p["in"], p["required"]) for p in operation["parameters"]} == {
        ("userId1", "query", True),
        ("userId2", "query", True),
    }
    assert set(operation["responses"]) == {"200", "400", "414", "500"}


def test_every_route_of_the_blueprint_is_documented_with_its_own_schemas(app, client):
    doc = client.get("/openapi.json").json
    routes = [rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith(bp.name + ".")]
    assert len(routes) == 4
    for rule in routes:
        path = rule.rule.replace("<", "{").replace(">", "}")
        operation = doc["paths"][path]["get"]
        documented = {(p["name"], p["in"]) for p in operation["parameters"]}
        view = app.view_functions[rule.endpoint]
        declared = {
            (name, item["in"])
            for item in view.openapi["parameters"]
            for name in item["schema"]._declared_fields
        }
        assert documented == declared
        assert {name for name, where in documented if where == "path"} == set(rule.arguments)
        for status, response in operation["responses"].items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/Error" if status != "200" else ref.endswith("Response")


def test_documented_limits_are_the_ones_enforced(client):
    doc = client.get("/openapi.json").json
    operation = doc["paths"]["/api/messaging/users/{userId}/dm-channels"]["get"]
    limit = next(p for p in operation["parameters"] if p["name"] == "limit")["schema"]
    field = schemas.UserChannelsQuery._declared_fields["limit"]
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
    assert len(api) == 4
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


def test_every_error_code_is_documented_in_the_openapi_document_and_the_api_reference(db_path):
    """The codes the views raise are written in app.py; the document lists them
    by hand in documented(...), docs/api.md in its table. Keep all three equal."""
    from dm_channels import app as service

    source = (ROOT / "app.py").read_text()
    settings = set(service.DEFAULTS) | {"DATABASE"} | set(service.DEFAULTS.values())
    settings |= {"OPTIONS"}  # a method's name, not a code
    raised = set(re.findall(r'"([A-Z][A-Z_]{2,})"', source)) - settings
    # Codes made from werkzeug's names by handle_http_exception.
    routing = {"NOT_FOUND", "METHOD_NOT_ALLOWED", "REQUEST_URI_TOO_LONG"}

    app = create_app({"TESTING": True, "DATABASE": db_path, "API_KEY": "key"})
    doc = app.test_client().get("/openapi.json").json
    descriptions = " ".join(
        response["description"]
        for path in doc["paths"].values()
        for status, response in path["get"]["responses"].items()
        if status != "200"
    )
    documented = set(re.findall(r"[A-Z][A-Z_]{2,}", descriptions))
    reference = (ROOT / "docs" / "api.md").read_text()
    table = set(re.findall(r"^\| \d{3} \| `([A-Z_]+)` \|", reference, flags=re.M))

    assert raised - documented == set()
    assert documented - raised - routing == set()
    assert table == raised | routing
    app.extensions["dm_channels"].close()
