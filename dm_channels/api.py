"""The API: one blueprint under /api/messaging, its errors and their envelope.

get-or-create of a pair's channel (dm-channel), in both dialects, and the
read side (a channel, its participants, a user's channels, and the ElizaOS
server's reads). Every error is an HTTPException answered with the envelope
{"success": false, "error": {"code", "message", "details"}}.
"""

import hmac
import random
import re
import threading
from collections import OrderedDict
from urllib.parse import quote, urlsplit

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app, g, request
from marshmallow import ValidationError
from marshmallow.experimental.context import Context
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from dm_channels import __version__, schemas
from dm_channels.store import SelfDMError, StoreError, UnknownPosition

bp = Blueprint("messaging", __name__, url_prefix="/api/messaging")

# The longest query string (raw, as sent) the API reads; gunicorn.conf.py's
# limit_request_line leaves room for it.
MAX_QUERY_LENGTH = 2048

# Every code the API answers with on purpose: its status and message. When
# several inputs are invalid, the first code of theirs in this order is given.
ERRORS = {
    "INVALID_USER_IDS": (400, "Invalid user IDs."),
    "INVALID_PARAMETER": (400, "Invalid parameter."),
    "INVALID_CURSOR": (400, "Invalid parameter."),
    "INVALID_SERVER_ID": (400, "Invalid server ID."),
    "INVALID_CHANNEL_ID": (400, "Invalid channel ID."),
    "INVALID_USER_ID": (400, "Invalid user ID."),
    "SELF_DM_NOT_ALLOWED": (400, "A DM channel needs two different users."),
    "INVALID_QUERY_STRING": (400, "The query string is not UTF-8."),
    "UNAUTHORIZED": (401, "Missing or wrong API key."),
    "CHANNEL_NOT_FOUND": (404, "Channel not found."),
    "NOT_FOUND": (404, "Not Found"),
    "METHOD_NOT_ALLOWED": (405, "Method Not Allowed"),
    "REQUEST_URI_TOO_LONG": (414, "Request URI Too Long"),
    "STORE_ERROR": (500, "Error retrieving channel"),
    "INTERNAL_ERROR": (500, "Internal server error"),
    "STORE_UNAVAILABLE": (503, "Store unavailable"),
}

# The code of an invalid input, by its name.
INPUT_ERRORS = {
    **dict.fromkeys(("userId1", "userId2", "currentUserId", "targetUserId"), "INVALID_USER_IDS"),
    **dict.fromkeys(("dmServerId", "serverId"), "INVALID_SERVER_ID"),
    "channelId": "INVALID_CHANNEL_ID",
    "userId": "INVALID_USER_ID",
    "limit": "INVALID_PARAMETER",
    "cursor": "INVALID_CURSOR",
}

# What any route under the prefix can answer besides its own errors.
COMMON_ERRORS = ["INVALID_QUERY_STRING", "REQUEST_URI_TOO_LONG", "STORE_ERROR", "INTERNAL_ERROR"]

# The request's id in the WSGI environ, where gunicorn's access line reads it.
REQUEST_ID = "dm_channels.request_id"
MAX_REQUEST_ID = 200


class APIError(HTTPException):
    """An error the API answers on purpose: `error` is a code of ERRORS."""

    def __init__(self, error, details=None, headers=()):
        super().__init__(details)
        self.code, self.message = ERRORS[error]
        self.error = error
        self.headers = headers


def handle_http_exception(e):
    """The envelope of an HTTPException, keeping its headers (405's Allow);
    a redirect's Location is a path, never the Host a client wrote."""
    if isinstance(e, APIError):
        return envelope(e.code, e.error, e.message, e.description, e.headers)
    code = re.sub(r"[^A-Z0-9]+", "_", e.name.upper()).strip("_")
    if isinstance(e, RequestRedirect):
        _, _, path, query, _ = urlsplit(e.new_url)
        location = path + (f"?{query}" if query else "")
        return envelope(e.code, code, e.name, f"The resource is at {location}.", {"Location": location})
    headers = [(name, value) for name, value in e.get_headers() if name.lower() != "content-type"]
    return envelope(e.code, code, e.name, e.description, headers)


def handle_validation_error(e):
    codes = {INPUT_ERRORS.get(name, "INVALID_PARAMETER") for name in e.messages}
    error = next(code for code in ERRORS if code in codes)
    return handle_http_exception(APIError(error, schemas.describe_errors(e.messages)))


def count_store_error(e):
    metrics = current_app.extensions["dm_channels"].metrics
    if metrics is not None:
        metrics.store_errors.labels(e.cause).inc()


def handle_store_error(e):
    count_store_error(e)
    current_app.logger.error("store failure on %s: %s", request.path, e, exc_info=e, extra={"status": 500})
    return handle_http_exception(APIError("STORE_ERROR", "The channel store did not answer in time; try again."))


def handle_unexpected_error(e):
    current_app.logger.exception("unexpected error on %s", request.path, extra={"status": 500})
    return handle_http_exception(APIError("INTERNAL_ERROR", "The cause was logged."))


def register_error_handlers(target):
    """The envelope for every error of `target`: an app, or the blueprint's routes."""
    target.register_error_handler(HTTPException, handle_http_exception)
    target.register_error_handler(ValidationError, handle_validation_error)
    target.register_error_handler(StoreError, handle_store_error)
    target.register_error_handler(Exception, handle_unexpected_error)


register_error_handlers(bp)


def envelope(status, code, message, details=None, headers=()):
    """The error envelope; a 5xx quotes the request's id where the app gives one."""
    g.dm_channels_error_code = code  # for the metrics
    if status >= 500 and current_app.extensions["dm_channels"].request_ids:
        quote = f"Quote request id {request_id()} when you report this."
        details = f"{details} {quote}" if details else quote
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = str(details)
    response = current_app.json.response({"success": False, "error": error})
    response.status_code = status
    response.headers.update(headers)
    return response


def request_id():
    """The request's id: its X-Request-ID if that is 1 to 200 visible ASCII
    characters (safe in a header and a log line), else a new one."""
    environ = request.environ
    given = environ.get(REQUEST_ID)
    if given is None:
        given = environ.get("HTTP_X_REQUEST_ID", "")
        if not (0 < len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable()
                and " " not in given):
            given = random.randbytes(16).hex()  # unique, not secret: no system call
        environ[REQUEST_ID] = given
    return given


@bp.before_app_request
def guard():
    """Every request to a path under the API's prefix, however its slashes are
    doubled: the API key, then the query string, then any routing error,
    answered (not raised, so a host app's own handlers cannot change it)."""
    path = request.path
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    if not (path == bp.url_prefix or path.startswith(bp.url_prefix + "/")):
        return None
    key = current_app.config["API_KEY"]
    if key is not None and not hmac.compare_digest(request.headers.get("X-API-KEY", "").encode(), key.encode()):
        return handle_http_exception(APIError("UNAUTHORIZED", "Send it in the X-API-KEY header."))
    query = request.query_string
    if len(query) > MAX_QUERY_LENGTH:
        details = f"The query string may be at most {MAX_QUERY_LENGTH} bytes."
        return handle_http_exception(APIError("REQUEST_URI_TOO_LONG", details))
    if not query.isascii():
        try:
            query.decode()  # request.args would fail on bytes that are not UTF-8
        except UnicodeDecodeError:
            details = "Percent-encode anything beyond ASCII, as UTF-8."
            return handle_http_exception(APIError("INVALID_QUERY_STRING", details))
    if request.routing_exception is not None:
        return handle_http_exception(request.routing_exception)
    return None


def redirect_leading_slashes():
    """The standalone service's paths with leading doubled slashes, which
    routing would serve as they are, redirected to their own form."""
    raw = request.environ.get("PATH_INFO", "")
    if raw.startswith("//"):
        path = quote(re.sub("/{2,}", "/", raw).encode("latin-1"), safe="/:@!$&'()*+,;=~")
        query = request.query_string.decode("latin-1")
        return handle_http_exception(RequestRedirect(path + (f"?{query}" if query else "")))
    return None


class AnswerCache:
    """Answers that never change (a pair's channel, once it exists), by the raw
    query string that asked: at most `size`, the least recently used out first."""

    def __init__(self, size):
        self.size = size
        self._answers = OrderedDict()
        self._lock = threading.Lock()

    def get(self, query):
        with self._lock:
            answer = self._answers.get(query)
            if answer is not None:
                self._answers.move_to_end(query)
            return answer

    def put(self, query, answer):
        with self._lock:
            self._answers[query] = answer
            if len(self._answers) > self.size:
                self._answers.popitem(last=False)


def answer(data):
    """The success envelope around dumped data, as the app's JSON."""
    return current_app.json.response({"success": True, "data": data})


def dump(schema, data):
    """schema.dump(data), every channel on this app's SERVER_ID."""
    with Context({"server_id": current_app.config["SERVER_ID"]}):
        return schema.dump(data)


def document(summary, data, errors=(), path=None, query=None, common_errors=True):
    """Record a view's OpenAPI operation (openapi_document reads it): `data`
    is its data schema, or a tuple of them; `query` a schema or a tuple of forms."""

    def record(view):
        forms = query if isinstance(query, tuple) else (query,) if query else ()
        view.openapi = {
            "summary": summary,
            "operationId": view.__name__,
            "parameters": [{"in": "path", "schema": path}] * bool(path)
            + [{"in": "query", "schema": form(partial=True)} for form in forms],
            "data": data if isinstance(data, tuple) else (data,),
            "errors": [*errors, *(COMMON_ERRORS if common_errors else ())],
        }
        return view

    return record


DM_CHANNEL_QUERY = schemas.DMChannelQuery()
ELIZAOS_QUERY = schemas.ElizaOSDMChannelQuery()
ELIZAOS_NAMES = frozenset(ELIZAOS_QUERY.fields)
FORM_NAMES = frozenset(DM_CHANNEL_QUERY.fields)
MIXED = "Give userId1 and userId2, or currentUserId and targetUserId: one form, not two."
DM_CHANNEL_DATA = schemas.DMChannelData()
ELIZAOS_CHANNEL = schemas.ElizaOSChannelSchema()


@bp.get("/dm-channel")
@document(
    "DM channel retrieved or created",
    data=(schemas.DMChannelData, schemas.ElizaOSChannelSchema),
    query=(schemas.DMChannelQuery, schemas.ElizaOSDMChannelQuery),
    errors=["INVALID_SERVER_ID", "INVALID_USER_IDS", "SELF_DM_NOT_ALLOWED"],
)
def dm_channel():
    # A pair's answer never changes once its channel exists: the same bytes
    # of query always load to the same pair and get the same answer.
    dm_channels = current_app.extensions["dm_channels"]
    kept = dm_channels.answers.get(request.query_string)
    if kept is not None:
        return current_app.response_class(kept, mimetype="application/json")
    args = request.args
    # The ElizaOS server's form is answered in its shape: data is the channel.
    # Its dmServerId, once checked, stands for SERVER_ID.
    elizaos = not ELIZAOS_NAMES.isdisjoint(args)
    if elizaos and not FORM_NAMES.isdisjoint(args):
        given = (ELIZAOS_NAMES | FORM_NAMES).intersection(args)
        raise ValidationError({name: [MIXED] for name in given})
    if elizaos:
        pair = ELIZAOS_QUERY.load(args)
        user1, user2 = pair["currentUserId"], pair["targetUserId"]
    else:
        pair = DM_CHANNEL_QUERY.load(args)
        user1, user2 = pair["userId1"], pair["userId2"]
    try:
        channel, created = dm_channels.store.get_or_create_dm(user1, user2)
    except SelfDMError as e:
        names = "currentUserId and targetUserId" if elizaos else "userId1 and userId2"
        raise APIError("SELF_DM_NOT_ALLOWED", f"{names} are the same user, {user1}.") from e
    if elizaos:
        response = answer(dump(ELIZAOS_CHANNEL, channel))
    else:
        response = answer(dump(DM_CHANNEL_DATA, {"channel": channel, "created": created}))
    if elizaos or not created:  # "created": true is said once
        dm_channels.answers.put(request.query_string, response.get_data())
    return response


CHANNEL_PATH, USER_PATH, SERVER_PATH = schemas.ChannelPath(), schemas.UserPath(), schemas.ServerPath()
PAGE_QUERY = schemas.PageQuery()
CHANNEL_DATA, USER_CHANNELS_DATA = schemas.ChannelData(), schemas.UserChannelsData()
SERVER_CHANNELS_DATA = schemas.ServerChannelsData()
CHANNEL_ERRORS = ["INVALID_CHANNEL_ID", "CHANNEL_NOT_FOUND", "NOT_FOUND"]
CURSOR_REFUSED = f"cursor: {schemas.Cursor.default_error_messages['invalid']}"


def find_channel(channel_id):
    channel_id = CHANNEL_PATH.load({"channelId": channel_id})["channelId"]
    channel = current_app.extensions["dm_channels"].store.get_channel(channel_id)
    if channel is None:
        raise APIError("CHANNEL_NOT_FOUND", f"No DM channel has id {channel_id}.")
    return channel


@bp.get("/channels/<channelId>")
@document("The DM channel with this id", schemas.ChannelData, CHANNEL_ERRORS, path=schemas.ChannelPath)
def channel(channelId):
    return answer(dump(CHANNEL_DATA, {"channel": find_channel(channelId)}))


@bp.get("/channels/<channelId>/participants")
@document("The two users of the DM channel, sorted", schemas.ParticipantsData, CHANNEL_ERRORS,
          path=schemas.ChannelPath)
def participants(channelId):
    channel = find_channel(channelId)
    return answer({"participants": [channel.user_low, channel.user_high]})


@bp.get("/channels/<channelId>/details")
@document("The DM channel with this id, as the ElizaOS server answers it", schemas.ElizaOSChannelSchema,
          CHANNEL_ERRORS, path=schemas.ChannelPath)
def channel_details(channelId):
    return answer(dump(ELIZAOS_CHANNEL, find_channel(channelId)))


PAGE_ERRORS = ["INVALID_CURSOR", "INVALID_PARAMETER", "NOT_FOUND"]


@bp.get("/users/<userId>/dm-channels")
@document("A page of the user's DM channels, newest first", schemas.UserChannelsData,
          ["INVALID_USER_ID", *PAGE_ERRORS], path=schemas.UserPath, query=schemas.PageQuery)
def user_channels(userId):
    user = USER_PATH.load({"userId": userId})["userId"]
    page = PAGE_QUERY.load(request.args)
    store = current_app.extensions["dm_channels"].store
    return answer(dump(USER_CHANNELS_DATA, listing(store.user_channels, user, **page)))


@bp.get("/message-servers/<serverId>/channels")
@document("A page of the server's DM channels, newest first, as the ElizaOS server answers it",
          schemas.ServerChannelsData, ["INVALID_SERVER_ID", *PAGE_ERRORS], path=schemas.ServerPath,
          query=schemas.PageQuery)
def server_channels(serverId):
    server = SERVER_PATH.load({"serverId": serverId})["serverId"]
    page = PAGE_QUERY.load(request.args)
    if server != current_app.config["SERVER_ID"]:
        # Every channel is on SERVER_ID: none is on another, nor is any cursor's place.
        if page.get("cursor") is not None:
            raise APIError("INVALID_CURSOR", CURSOR_REFUSED)
        return answer({"channels": [], "nextCursor": None})
    store = current_app.extensions["dm_channels"].store
    return answer(dump(SERVER_CHANNELS_DATA, listing(store.all_channels, **page)))


def listing(read, *arguments, limit, cursor=None):
    """A page of `read` as the API answers it; a cursor of no place there is refused."""
    try:
        channels, position = read(*arguments, limit, cursor)
    except UnknownPosition as e:
        raise APIError("INVALID_CURSOR", CURSOR_REFUSED) from e
    return {"channels": channels, "nextCursor": position}


@document("The store answers", schemas.HealthData, ["STORE_UNAVAILABLE"], common_errors=False)
def healthz():
    """For load balancers: 200 while the store answers a trivial query."""
    try:
        current_app.extensions["dm_channels"].store.ping()
    except StoreError as e:
        count_store_error(e)
        current_app.logger.error("health check failed: %s", e, extra={"status": 503})
        raise APIError("STORE_UNAVAILABLE", "The channel store did not answer.") from e
    return answer({"status": "ok"})


def openapi_json():
    dm_channels = current_app.extensions["dm_channels"]
    if dm_channels.openapi is None:  # on first request: every route is registered by then
        dm_channels.openapi = openapi_document(current_app)
    return current_app.json.response(dm_channels.openapi)


def openapi_document(app):
    """OpenAPI 3 of every documented route of `app`."""
    spec = APISpec(
        title="dm-channels", version=__version__, openapi_version="3.0.3", plugins=[MarshmallowPlugin()],
        info={"description": "Get or create the one DM channel of two users, and find it again."},
    )
    spec.components.schema("Channel", schema=schemas.ChannelSchema)
    spec.components.schema("ElizaOSChannel", schema=schemas.ElizaOSChannelSchema)
    spec.components.schema("Error", schema=schemas.ErrorResponse)
    keyed = app.config["API_KEY"] is not None
    if keyed:
        spec.components.security_scheme("ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-KEY"})
    for rule in app.url_map.iter_rules():
        doc = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if doc is None:
            continue
        errors = doc["errors"]
        operation = {key: doc[key] for key in ("summary", "operationId", "parameters")}
        if keyed and rule.endpoint.startswith(bp.name + "."):
            operation["security"] = [{"ApiKey": []}]
            errors = [*errors, "UNAUTHORIZED"]
        envelopes = [schemas.success(data) for data in doc["data"]]
        operation["responses"] = {200: {
            "description": doc["summary"],
            "content": {"application/json": {"schema": envelopes[0] if len(envelopes) == 1 else {"oneOf": envelopes}}},
        }}
        for status in sorted({ERRORS[code][0] for code in errors}):
            operation["responses"][status] = {
                "description": " or ".join(code for code in errors if ERRORS[code][0] == status),
                "content": {"application/json": {"schema": "Error"}},
            }
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        spec.path(path=path, operations={method.lower(): operation for method in methods})
    return spec.to_dict()
