"""How the API is declared and answers: its errors, their envelope, the
request id, and one decorator per view.

A view says once what it reads, what it answers and what can go wrong:

    @bp.get("/channels/<channelId>")
    @endpoint("The DM channel with this id", data=schemas.ChannelData,
              path=schemas.ChannelPath, errors=[InvalidChannelId, ChannelNotFound])
    def channel(channelId): ...

`endpoint` loads the path and the query into the view's arguments, dumps what
the view returns inside the success envelope, answers the errors with the
error envelope, and records the OpenAPI operation from those same objects;
openapi_document builds /openapi.json from the records.
"""

import functools
import hmac
import random
import re

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import current_app, g, request
from marshmallow import ValidationError
from werkzeug.wrappers import Response

from dm_channels import __version__, schemas

# The request's id in the WSGI environ (request_id), for gunicorn's access line too.
REQUEST_ID = "dm_channels.request_id"

# Room for any id scheme in use (UUIDs, W3C trace ids, prefixed ids), and
# still short in a log line.
MAX_REQUEST_ID = 200


def get_store():
    """The store of the app serving the request (init_app puts it there)."""
    return current_app.extensions["dm_channels"]


# -- errors: each one a class, with its status, code and message ---------------------


class APIError(Exception):
    """An error the API answers on purpose. `fields`: the inputs (path or query
    parameters) whose invalid values this error reports."""

    status = 500
    code = "INTERNAL_ERROR"
    message = "Internal server error"
    fields = ()

    def __init__(self, details=None, headers=()):
        super().__init__(details or self.message)
        self.details = details
        self.headers = dict(headers)

    def response(self):
        return envelope(self.status, self.code, self.message, self.details, self.headers)


def error(status, code, message, fields=()):
    """An APIError class (the code is its name in error messages and tests)."""
    return type(code, (APIError,), {"status": status, "code": code, "message": message, "fields": fields})


InvalidUserIds = error(
    400,
    "INVALID_USER_IDS",
    "Invalid user IDs.",
    ("userId1", "userId2", "currentUserId", "targetUserId", "dmServerId"),
)
SelfDMNotAllowed = error(400, "SELF_DM_NOT_ALLOWED", "A DM channel needs two different users.")
InvalidQueryString = error(400, "INVALID_QUERY_STRING", "The query string is not UTF-8.")
InvalidChannelId = error(400, "INVALID_CHANNEL_ID", "Invalid channel ID.", ("channelId",))
InvalidUserId = error(400, "INVALID_USER_ID", "Invalid user ID.", ("userId",))
InvalidServerId = error(400, "INVALID_SERVER_ID", "Invalid server ID.", ("serverId", "dmServerId"))
InvalidCursor = error(400, "INVALID_CURSOR", "Invalid parameter.", ("cursor",))
InvalidParameter = error(400, "INVALID_PARAMETER", "Invalid parameter.", ("limit", "cursor"))
Unauthorized = error(401, "UNAUTHORIZED", "Missing or wrong API key.")
ChannelNotFound = error(404, "CHANNEL_NOT_FOUND", "Channel not found.")
NotFound = error(404, "NOT_FOUND", "Not Found")
MethodNotAllowed = error(405, "METHOD_NOT_ALLOWED", "Method Not Allowed")
RequestURITooLong = error(414, "REQUEST_URI_TOO_LONG", "Request URI Too Long")
StoreFailure = error(500, "STORE_ERROR", "Error retrieving channel")
InternalError = error(500, "INTERNAL_ERROR", "Internal server error")
StoreUnavailable = error(503, "STORE_UNAVAILABLE", "Store unavailable")

# What any route under the API's prefix can answer, besides its own errors
# (and UNAUTHORIZED, when API_KEY is set).
COMMON_ERRORS = [InvalidQueryString, RequestURITooLong, StoreFailure, InternalError]

# The routing errors werkzeug raises, answered as the errors declared above.
ROUTING_ERRORS = {e.status: e for e in (NotFound, MethodNotAllowed, RequestURITooLong)}


def key_refused(key, given):
    """True when an API key (`key`, API_KEY) is set and `given`, the X-API-KEY
    header ("" when absent), is not it. Compared in constant time, so an
    answer's timing says nothing about the key."""
    return key is not None and not hmac.compare_digest(given.encode(), key.encode())


def request_id():
    """The id of the request being served, given on first use: its
    X-Request-ID if that is 1 to MAX_REQUEST_ID characters of visible ASCII
    (safe in a header and on one log line), else a new one."""
    environ = request.environ
    given = environ.get(REQUEST_ID)
    if given is None:
        given = environ.get("HTTP_X_REQUEST_ID", "")
        if not (0 < len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable()
                and " " not in given):
            # 32 hex digits from the random module: not a secret, only unique,
            # and about 3x cheaper than os.urandom (a system call) or uuid4.
            # Python reseeds the module's generator in every forked child.
            given = random.randbytes(16).hex()
        environ[REQUEST_ID] = given
    return given


def envelope(status, code, message, details=None, headers=()):
    """The error envelope, the one every error of the service is answered with.
    A 5xx quotes the request's id where the app gives answers one (ops)."""
    g.dm_channels_error_code = code  # for the metrics (ops.record)
    if status >= 500 and "dm_channels_request_ids" in current_app.extensions:
        quote = f"Quote request id {request_id()} when you report this."
        details = f"{details} {quote}" if details else quote
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = str(details)
    response = current_app.json.response(schemas.error_response.dump({"error": error}))
    response.status_code = status
    response.headers.update(headers)
    return response


def answer(data, result):
    """The success envelope around `result`, dumped by the `data` schema
    (serverId from SERVER_ID), as the app's JSON."""
    body = schemas.dump(success(data), {"data": result}, current_app.config["SERVER_ID"])
    return current_app.json.response(body)


def answer_again(body):
    """An answer made before, from its bytes (a cached one)."""
    return current_app.response_class(body, mimetype=current_app.json.mimetype)


# -- the declaration of a view ------------------------------------------------------------


# The success envelope's schema of each data schema (schemas.success).
SUCCESS = {}


def success(data):
    schema = SUCCESS.get(data)
    if schema is None:
        schema = SUCCESS[data] = schemas.success(data)()
    return schema


def endpoint(summary, data, path=None, query=None, errors=(), common_errors=True):
    """Declare a view: see the module's docstring. `errors` are the APIError
    classes the view (or loading its inputs) can answer; an invalid input is
    answered with the first of them whose `fields` cover every invalid one.
    A view returns its data, or a Response of its own making (answer()).
    `data` may be a tuple of data schemas: the view's data is dumped by the
    first, and the view answers the others itself with answer(). `query` may
    be a tuple of query schemas, forms of one request (schemas.EitherForm)."""
    choices = data if isinstance(data, tuple) else (data,)
    data = choices[0]
    inputs = [
        (where, schemas.EitherForm(*schema) if isinstance(schema, tuple) else schema())
        for where, schema in (("path", path), ("query", query))
        if schema
    ]
    declared = [*errors, *(COMMON_ERRORS if common_errors else ())]

    def declare(view):
        @functools.wraps(view)
        def run(**path_values):
            try:
                arguments = {}
                for where, schema in inputs:
                    values = path_values if where == "path" else request.args
                    arguments.update(load(schema, values, errors))
                result = view(**arguments)
            except APIError as e:
                return e.response()
            return result if isinstance(result, Response) else answer(data, result)

        run.openapi = {
            "summary": summary,
            "operationId": view.__name__,
            "parameters": [
                {"in": where, "schema": form}
                for where, schema in inputs
                for form in getattr(schema, "documented", [schema])
            ],
            "responses": {200: {"description": summary, "content": json_content(one_of(choices))}}
            | error_responses(declared),
        }
        return run

    return declare


def load(schema, values, errors):
    try:
        return schema.load(values)
    except ValidationError as e:
        invalid = set(e.messages)
        reported = next(err for err in errors if err.fields and invalid <= set(err.fields))
        raise reported(schemas.describe_errors(e.messages)) from e


def error_responses(errors):
    """OpenAPI responses for these APIError classes: one per status, naming its codes."""
    codes = {}
    for err in errors:
        codes.setdefault(err.status, []).append(err.code)
    return {
        status: {"description": " or ".join(names), "content": json_content("Error")}
        for status, names in sorted(codes.items())
    }


def json_content(schema):
    return {"application/json": {"schema": schema}}


def one_of(data_schemas):
    """The success envelope of one data schema, or a oneOf of several's."""
    envelopes = [success(data) for data in data_schemas]
    return envelopes[0] if len(envelopes) == 1 else {"oneOf": envelopes}


# -- the document -------------------------------------------------------------------------


def openapi_document(app, under_api):
    """OpenAPI 3 of every declared route of `app`; `under_api(path)` says which
    routes want the API key (when API_KEY is set)."""
    spec = APISpec(
        title="dm-channels",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Get or create the one DM channel of two users, and find it again."},
    )
    spec.components.schema("Channel", schema=schemas.ChannelSchema)
    spec.components.schema("ElizaOSChannel", schema=schemas.ElizaOSChannelSchema)
    spec.components.schema("Error", schema=schemas.ErrorResponse)
    keyed = app.config["API_KEY"] is not None
    if keyed:
        spec.components.security_scheme(
            "ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-KEY"}
        )
    for rule in app.url_map.iter_rules():
        operation = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if operation is None:
            continue
        if keyed and under_api(rule.rule):
            operation = {
                **operation,
                "security": [{"ApiKey": []}],
                "responses": operation["responses"] | error_responses([Unauthorized]),
            }
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        spec.path(path=path, operations={method.lower(): operation for method in methods})
    return spec.to_dict()
