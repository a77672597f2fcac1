"""The API: one blueprint under /api/messaging, the envelope of its errors, and its OpenAPI document."""

import difflib
import hmac
import random
import re
import threading
from collections import OrderedDict
from urllib.parse import quote, urlsplit

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app, g, request
from marshmallow import ValidationError, fields
from marshmallow.experimental.context import Context
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import RequestRedirect

from dm_channels import __version__, schemas
from dm_channels.store import SelfDMError, StoreError, UnknownPosition

bp = Blueprint("messaging", __name__, url_prefix="/api/messaging")

MAX_QUERY_LENGTH = 2048  # bytes as sent; gunicorn_conf.py's limit_request_line leaves room for it

# Every code the API answers with on purpose; of several invalid inputs, the first in this order is given.
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

# The code of an invalid input, by its name; any other is INVALID_PARAMETER.
INPUT_ERRORS = {
    **dict.fromkeys(("userId1", "userId2", "currentUserId", "targetUserId"), "INVALID_USER_IDS"),
    **dict.fromkeys(("dmServerId", "serverId"), "INVALID_SERVER_ID"),
    "channelId": "INVALID_CHANNEL_ID",
    "userId": "INVALID_USER_ID",
    "cursor": "INVALID_CURSOR",
}

REQUEST_ID = "dm_channels.request_id"  # in the WSGI environ, where gunicorn's access line reads it
MAX_REQUEST_ID = 200


class APIError(HTTPException):
    """An error the API answers on purpose: `error` is a code of ERRORS."""

    def __init__(self, error, details=None, headers=()):
        super().__init__(details)
        self.code, self.message = ERRORS[error]
        self.error = error
        self.headers = headers


def handle_http_exception(e):
    """The envelope of an HTTPException, with its headers (405's Allow); a redirect's Location is a path alone."""
    if isinstance(e, APIError):
        return envelope(e.code, e.error, e.message, e.description, e.headers)
    code = re.sub(r"[^A-Z0-9]+", "_", e.name.upper()).strip("_")
    if isinstance(e, RequestRedirect):
        _, _, path, query, _ = urlsplit(e.new_url)
        location = path + (f"?{query}" if query else "")
        return envelope(e.code, code, e.name, f"The resource is at {location}.", {"Location": location})
    headers = [(name, value) for name, value in e.get_headers() if name.lower() != "content-type"]
    details = e.description
    if isinstance(e, NotFound):  # not werkzeug's "check your spelling"
        described = current_app.config["OPENAPI_PATH"]
        details = f"No such route; {described} describes the API." if described else "No such route."
    return envelope(e.code, code, e.name, details, headers)


def handle_validation_error(e):
    """The envelope of an invalid input; each query parameter its route does not read is named too."""
    codes = {INPUT_ERRORS.get(name, "INVALID_PARAMETER") for name in e.messages}
    error = next(code for code in ERRORS if code in codes)
    _, queries, _ = OPERATIONS.get(current_app.view_functions.get(request.endpoint), ((), (), ()))
    known = sorted(name for query in queries for name in query().fields)
    messages = dict(e.messages)
    for name in request.args.keys() - known:
        close = difflib.get_close_matches(name, known, n=1)
        messages.setdefault(name, [f"not a parameter; did you mean {close[0]}?" if close else "not a parameter."])
        if close and messages.get(close[0]) == [fields.Field.default_error_messages["required"]]:
            del messages[close[0]]  # the hint says it
    return handle_http_exception(APIError(error, schemas.describe_errors(messages)))


def count_store_error(e):
    metrics = current_app.extensions["dm_channels"].metrics
    if metrics is not None:
        metrics.store_errors.labels(e.cause).inc()


def handle_unexpected_error(e):
    if isinstance(e, StoreError):
        count_store_error(e)
        current_app.logger.error("store failure on %s: %s", request.path, e, exc_info=e, extra={"status": 500})
        return handle_http_exception(APIError("STORE_ERROR", "The channel store did not answer in time; try again."))
    current_app.logger.exception("unexpected error on %s", request.path, extra={"status": 500})
    return handle_http_exception(APIError("INTERNAL_ERROR", "The cause was logged."))


def register_error_handlers(target):
    """The envelope for every error of `target`: an app, or the blueprint's routes."""
    target.register_error_handler(HTTPException, handle_http_exception)
    target.register_error_handler(ValidationError, handle_validation_error)
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
    """The request's X-Request-ID if it is 1 to 200 visible ASCII characters, else a new one."""
    environ = request.environ
    given = environ.get(REQUEST_ID)
    if given is None:
        given = environ.get("HTTP_X_REQUEST_ID", "")
        if not (0 < len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable() and " " not in given):
            given = random.randbytes(16).hex()  # unique, not secret: no system call
        environ[REQUEST_ID] = given
    return given


@bp.before_app_request
def guard():
    """The API key, query string and routing error of a request under the prefix (slashes doubled or not), answered."""
    app, req = current_app._get_current_object(), request._get_current_object()  # each proxy use costs ~1 µs
    if not app.extensions["dm_channels"].routes_checked:
        refuse_clashes(app)  # raised, so answered 500 until fixed
        app.extensions["dm_channels"].routes_checked = True
    path = req.path
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    if not (path == bp.url_prefix or path.startswith(bp.url_prefix + "/")):
        return None
    key = app.config["API_KEY"]
    if key is not None and not hmac.compare_digest(req.headers.get("X-API-KEY", "").encode(), key.encode()):
        return handle_http_exception(APIError("UNAUTHORIZED", "Send it in the X-API-KEY header."))
    query = req.query_string
    if len(query) > MAX_QUERY_LENGTH:
        details = f"The query string may be at most {MAX_QUERY_LENGTH} bytes."
        return handle_http_exception(APIError("REQUEST_URI_TOO_LONG", details))
    if not query.isascii():
        try:
            query.decode()  # request.args would fail on bytes that are not UTF-8
        except UnicodeDecodeError:
            details = "Percent-encode anything beyond ASCII, as UTF-8."
            return handle_http_exception(APIError("INVALID_QUERY_STRING", details))
    if req.routing_exception is not None:
        return handle_http_exception(req.routing_exception)
    return None


def refuse_clashes(app):
    """ValueError if a route of ours has the path and a method of one of the app's: Flask would drop one silently."""
    def shape(rule):
        return re.sub(r"<[^<>]+>", "<>", rule.rule)  # /channels/<id> is /channels/<int:x>

    rules = list(app.url_map.iter_rules())
    mine = [r for r in rules if r.endpoint.startswith((bp.name + ".", "dm_channels_"))]
    for rule in rules:
        for own in mine:
            if rule.endpoint != own.endpoint and shape(rule) == shape(own) and rule.methods & own.methods - {"OPTIONS"}:
                raise ValueError(f"dm-channels cannot mount {own.rule}: the app already routes {rule.rule} to "
                                 f"{rule.endpoint!r} (move or turn off ours with HEALTH_PATH or OPENAPI_PATH, "
                                 "or move yours)")


def redirect_leading_slashes():
    """Redirect the standalone service's paths with leading doubled slashes, which routing would serve."""
    raw = request.environ.get("PATH_INFO", "")
    if raw.startswith("//"):
        path = quote(re.sub("/{2,}", "/", raw).encode("latin-1"), safe="/:@!$&'()*+,;=~")
        query = request.query_string.decode("latin-1")
        return handle_http_exception(RequestRedirect(path + (f"?{query}" if query else "")))
    return None


class AnswerCache:
    """Answers that never change, by the raw query string that asked: at most `size`, least recently used out first."""

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


def answer(schema, data, app=current_app):
    """The success envelope around schema.dump(data), every channel on this app's SERVER_ID."""
    with Context({"server_id": app.config["SERVER_ID"]}):
        return app.json.response({"success": True, "data": schema.dump(data)})


DM_CHANNEL_QUERY, ELIZAOS_QUERY = schemas.DMChannelQuery(), schemas.ElizaOSDMChannelQuery()
FORM_NAMES, ELIZAOS_NAMES = frozenset(DM_CHANNEL_QUERY.fields), frozenset(ELIZAOS_QUERY.fields)
DM_CHANNEL_DATA, ELIZAOS_CHANNEL = schemas.DMChannelData(), schemas.ElizaOSChannelSchema()


@bp.get("/dm-channel")
def dm_channel():
    """The DM channel of two users, created if need be."""
    app, req = current_app._get_current_object(), request._get_current_object()
    dm_channels = app.extensions["dm_channels"]
    kept = dm_channels.answers.get(req.query_string)
    if kept is not None:
        return app.response_class(kept, mimetype="application/json")
    args = req.args
    elizaos = not ELIZAOS_NAMES.isdisjoint(args)  # the ElizaOS server's form, answered in its shape
    if elizaos and not FORM_NAMES.isdisjoint(args):
        raise APIError("INVALID_USER_IDS",
                       "Give userId1 and userId2, or currentUserId and targetUserId: one form, not two.")
    if elizaos:
        pair = ELIZAOS_QUERY.load(args)  # its dmServerId, once checked, stands for SERVER_ID
        user1, user2 = pair["currentUserId"], pair["targetUserId"]
    else:
        pair = DM_CHANNEL_QUERY.load(args)
        user1, user2 = pair["userId1"], pair["userId2"]
    try:
        channel, created = dm_channels.store.get_or_create_dm(user1, user2)
    except SelfDMError as e:
        names = "currentUserId and targetUserId" if elizaos else "userId1 and userId2"
        raise APIError("SELF_DM_NOT_ALLOWED", f"{names} are the same user, {user1}.") from e
    data = channel if elizaos else {"channel": channel, "created": created}
    response = answer(ELIZAOS_CHANNEL if elizaos else DM_CHANNEL_DATA, data, app)
    if elizaos or not created:  # "created": true is said once
        dm_channels.answers.put(req.query_string, response.get_data())
    return response


PATH_IDS, PAGE_QUERY = schemas.PathIds(), schemas.PageQuery()
CHANNEL_DATA, PARTICIPANTS_DATA = schemas.ChannelData(), schemas.ParticipantsData()
USER_CHANNELS_DATA, SERVER_CHANNELS_DATA = schemas.UserChannelsData(), schemas.ServerChannelsData()
HEALTH_DATA = schemas.HealthData()
CURSOR_REFUSED = f"cursor: {schemas.Cursor.default_error_messages['invalid']}"


def find_channel(channel_id):
    channel_id = PATH_IDS.load({"channelId": channel_id})["channelId"]
    channel = current_app.extensions["dm_channels"].store.get_channel(channel_id)
    if channel is None:
        raise APIError("CHANNEL_NOT_FOUND", f"No DM channel has id {channel_id}.")
    return channel


@bp.get("/channels/<channelId>")
def channel(channelId):
    """The DM channel with this id."""
    return answer(CHANNEL_DATA, {"channel": find_channel(channelId)})


@bp.get("/channels/<channelId>/participants")
def participants(channelId):
    """The two users of the DM channel, sorted."""
    channel = find_channel(channelId)
    return answer(PARTICIPANTS_DATA, {"participants": [channel.user_low, channel.user_high]})


@bp.get("/channels/<channelId>/details")
def channel_details(channelId):
    """The DM channel with this id, as the ElizaOS server answers it."""
    return answer(ELIZAOS_CHANNEL, find_channel(channelId))


@bp.get("/users/<userId>/dm-channels")
def user_channels(userId):
    """A page of the user's DM channels, newest first."""
    user = PATH_IDS.load({"userId": userId})["userId"]
    page = PAGE_QUERY.load(request.args)
    return answer(USER_CHANNELS_DATA, listing(current_app.extensions["dm_channels"].store.user_channels, user, **page))


@bp.get("/message-servers/<serverId>/channels")
def server_channels(serverId):
    """A page of the server's DM channels, newest first, as the ElizaOS server answers it."""
    server = PATH_IDS.load({"serverId": serverId})["serverId"]
    page = PAGE_QUERY.load(request.args)
    if server != current_app.config["SERVER_ID"]:
        # Every channel is on SERVER_ID: none is on another, nor is any cursor's place.
        if page.get("cursor") is not None:
            raise APIError("INVALID_CURSOR", CURSOR_REFUSED)
        return answer(SERVER_CHANNELS_DATA, {"channels": [], "nextCursor": None})
    return answer(SERVER_CHANNELS_DATA, listing(current_app.extensions["dm_channels"].store.all_channels, **page))


def listing(read, *arguments, limit, cursor=None):
    """A page of `read` as the API answers it; a cursor of no place there is refused."""
    try:
        channels, position = read(*arguments, limit, cursor)
    except UnknownPosition as e:
        raise APIError("INVALID_CURSOR", CURSOR_REFUSED) from e
    return {"channels": channels, "nextCursor": position}


def healthz():
    """For load balancers: 200 while the store answers a trivial query."""
    try:
        current_app.extensions["dm_channels"].store.ping()
    except StoreError as e:
        count_store_error(e)
        current_app.logger.error("health check failed: %s", e, extra={"status": 503})
        raise APIError("STORE_UNAVAILABLE", "The channel store did not answer.") from e
    return answer(HEALTH_DATA, {})


# /openapi.json's data schemas, query schemas and codes of each view, besides its docstring and INPUT_ERRORS.
OPERATIONS = {
    dm_channel: ([schemas.DMChannelData, schemas.ElizaOSChannelSchema],
                 [schemas.DMChannelQuery, schemas.ElizaOSDMChannelQuery], ["SELF_DM_NOT_ALLOWED"]),
    channel: ([schemas.ChannelData], [], ["CHANNEL_NOT_FOUND", "NOT_FOUND"]),
    participants: ([schemas.ParticipantsData], [], ["CHANNEL_NOT_FOUND", "NOT_FOUND"]),
    channel_details: ([schemas.ElizaOSChannelSchema], [], ["CHANNEL_NOT_FOUND", "NOT_FOUND"]),
    user_channels: ([schemas.UserChannelsData], [schemas.PageQuery], ["NOT_FOUND"]),
    server_channels: ([schemas.ServerChannelsData], [schemas.PageQuery], ["NOT_FOUND"]),
    healthz: ([schemas.HealthData], [], ["STORE_UNAVAILABLE"]),
}
COMMON_ERRORS = ["INVALID_QUERY_STRING", "REQUEST_URI_TOO_LONG", "STORE_ERROR", "INTERNAL_ERROR"]


def openapi_json():
    dm_channels = current_app.extensions["dm_channels"]
    if dm_channels.openapi is None:  # on first request: every route is registered by then
        dm_channels.openapi = openapi_document(current_app)
    return current_app.json.response(dm_channels.openapi)


def openapi_document(app):
    """OpenAPI 3 of the routes of `app` whose views OPERATIONS describes."""
    spec = APISpec("dm-channels", __version__, "3.0.3", plugins=[MarshmallowPlugin()],
                   info={"description": "Get or create the one DM channel of two users, and find it again."})
    spec.components.schema("Error", schema=schemas.ErrorResponse)
    keyed = app.config["API_KEY"] is not None
    if keyed:
        spec.components.security_scheme("ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-KEY"})
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        if view not in OPERATIONS:
            continue
        data, queries, errors = OPERATIONS[view]
        summary, queries = view.__doc__, [query(partial=True) for query in queries]
        inputs = [*rule.arguments, *(name for query in queries for name in query.fields)]
        errors = [*(INPUT_ERRORS.get(name, "INVALID_PARAMETER") for name in inputs), *errors]
        parameters = [{"in": "query", "schema": query} for query in queries]
        if rule.arguments:
            parameters.insert(0, {"in": "path", "schema": schemas.PathIds(only=rule.arguments)})
        operation = {"summary": summary, "operationId": view.__name__, "parameters": parameters}
        if rule.endpoint.startswith(bp.name + "."):
            errors += COMMON_ERRORS
            if keyed:
                operation["security"] = [{"ApiKey": []}]
                errors.append("UNAUTHORIZED")
        envelopes = [schemas.success(schema) for schema in data]
        ok = envelopes[0] if len(envelopes) == 1 else {"oneOf": envelopes}
        operation["responses"] = {200: {"description": summary, "content": {"application/json": {"schema": ok}}}}
        for status in sorted({ERRORS[code][0] for code in errors}):
            codes = " or ".join(code for code in ERRORS if code in errors and ERRORS[code][0] == status)
            error = {"application/json": {"schema": "Error"}}
            operation["responses"][status] = {"description": codes, "content": error}
        spec.path(path=re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), operations={"get": operation})
    return spec.to_dict()
