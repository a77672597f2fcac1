"""dm-channels: which direct-message channel do these two users share?

One blueprint, `bp`, holds the API under /api/messaging: get-or-create of a
pair's channel (dm-channel) and the read side (a channel, its participants, a
user's channels); /openapi.json describes them all. `create_app()` is
the standalone service (gunicorn "app:create_app()", flask --app app run);
`init_app(host_app)` mounts the same service inside another Flask app.
"""

import ipaddress
import os
import re
import threading
from collections import OrderedDict
from urllib.parse import quote, urlsplit

import click
from flask import Blueprint, Flask, current_app, jsonify, request
from flask.cli import ScriptInfo
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import RequestRedirect
from werkzeug.serving import is_running_from_reloader

from dm_channels import api, logs, ops, schemas, settings
from dm_channels.api import endpoint, get_store
from dm_channels.channels import SelfDMError, StoreError, UnknownPosition
from dm_channels.cli import COMMANDS
from dm_channels.store import Store

# The longest query string (raw, as sent) the API reads; a longer one gets a
# 414 envelope. gunicorn.conf.py's limit_request_line leaves room for it.
MAX_QUERY_LENGTH = 2048

bp = Blueprint("messaging", __name__, url_prefix="/api/messaging")


@bp.get("/dm-channel")
@endpoint(
    "DM channel retrieved or created",
    data=(schemas.DMChannelData, schemas.ElizaOSChannelSchema),
    query=(schemas.DMChannelQuery, schemas.ElizaOSDMChannelQuery),
    errors=[api.InvalidServerId, api.InvalidUserIds, api.SelfDMNotAllowed],
)
def dm_channel(userId1=None, userId2=None, currentUserId=None, targetUserId=None, dmServerId=None):
    # The ElizaOS server's form is answered in its shape: data is the channel.
    # Its dmServerId, once checked, stands for SERVER_ID, as that server
    # takes its own for a server it does not know.
    elizaos = currentUserId is not None
    if elizaos:
        userId1, userId2 = currentUserId, targetUserId
    # A channel never changes, so neither does the answer for a pair that has
    # one: it is kept, and a later request skips the store, the dump and the JSON.
    pair = min(userId1, userId2), max(userId1, userId2), elizaos
    answers = current_app.extensions["dm_channels_answers"]
    kept = answers.get(pair)
    if kept is not None:
        return api.answer_again(kept)
    try:
        # The store keeps the rule (its allow_self_dm is ALLOW_SELF_DM).
        channel, created = get_store().get_or_create_dm(userId1, userId2)
    except SelfDMError as e:
        names = "currentUserId and targetUserId" if elizaos else "userId1 and userId2"
        raise api.SelfDMNotAllowed(f"{names} are the same user, {userId1}.") from e
    if elizaos:
        answer = api.answer(schemas.ElizaOSChannelSchema, channel)
    else:
        answer = api.answer(schemas.DMChannelData, {"channel": channel, "created": created})
    if elizaos or not created:  # "created": true is said once
        answers.put(pair, answer.get_data())
    return answer


class AnswerCache:
    """The answers of existing pairs (their bytes), at most `size`, the least
    recently used out first; size 0 keeps none. Each worker has its own."""

    def __init__(self, size):
        self.size = size
        self._answers = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pair):
        with self._lock:
            answer = self._answers.get(pair)
            if answer is not None:
                self._answers.move_to_end(pair)
            return answer

    def put(self, pair, answer):
        with self._lock:
            self._answers[pair] = answer
            if len(self._answers) > self.size:
                self._answers.popitem(last=False)


def find_channel(channel_id):
    channel = get_store().get_channel(channel_id)
    if channel is None:
        raise api.ChannelNotFound(f"No DM channel has id {channel_id}.")
    return channel


@bp.get("/channels/<channelId>")
@endpoint(
    "The DM channel with this id",
    data=schemas.ChannelData,
    path=schemas.ChannelPath,
    errors=[api.InvalidChannelId, api.ChannelNotFound, api.NotFound],
)
def channel(channelId):
    return {"channel": find_channel(channelId)}


@bp.get("/channels/<channelId>/participants")
@endpoint(
    "The two users of the DM channel, sorted",
    data=schemas.ParticipantsData,
    path=schemas.ChannelPath,
    errors=[api.InvalidChannelId, api.ChannelNotFound, api.NotFound],
)
def participants(channelId):
    channel = find_channel(channelId)
    return {"participants": [channel.user_low, channel.user_high]}


@bp.get("/users/<userId>/dm-channels")
@endpoint(
    "A page of the user's DM channels, newest first",
    data=schemas.UserChannelsData,
    path=schemas.UserPath,
    query=schemas.PageQuery,
    errors=[api.InvalidUserId, api.InvalidCursor, api.InvalidParameter, api.NotFound],
)
def user_channels(userId, limit, cursor=None):
    return page(get_store().user_channels, userId, limit, cursor)


# -- the read side of ElizaOS clients: the ElizaOS server's shapes ---------------


@bp.get("/channels/<channelId>/details")
@endpoint(
    "The DM channel with this id, as the ElizaOS server answers it",
    data=schemas.ElizaOSChannelSchema,
    path=schemas.ChannelPath,
    errors=[api.InvalidChannelId, api.ChannelNotFound, api.NotFound],
)
def channel_details(channelId):
    return find_channel(channelId)


@bp.get("/message-servers/<serverId>/channels")
@endpoint(
    "A page of the server's DM channels, newest first, as the ElizaOS server answers it",
    data=schemas.ServerChannelsData,
    path=schemas.ServerPath,
    query=schemas.PageQuery,
    errors=[api.InvalidServerId, api.InvalidCursor, api.InvalidParameter, api.NotFound],
)
def server_channels(serverId, limit, cursor=None):
    if serverId != current_app.config["SERVER_ID"]:
        # Every channel is on SERVER_ID: the ElizaOS server lists no
        # channels for a server that has none, and no cursor names a place there.
        if cursor is not None:
            raise api.InvalidCursor(CURSOR_REFUSED)
        return {"channels": [], "nextCursor": None}
    return page(get_store().all_channels, limit, cursor)


# A cursor well formed but naming no place in its listing: said as a malformed one is.
CURSOR_REFUSED = f"cursor: {schemas.Cursor.default_error_messages['invalid']}"


def page(listing, *arguments):
    """The page listing(*arguments) gives, as the API answers it."""
    try:
        channels, position = listing(*arguments)
    except UnknownPosition as e:
        # Well formed, but not a position of this listing: the same answer
        # as a malformed cursor.
        raise api.InvalidCursor(CURSOR_REFUSED) from e
    return {"channels": channels, "nextCursor": position}


# Both registered by init_app outside the blueprint's prefix: open even with API_KEY.


def openapi_json():
    # Built once per app, on first request: every route is registered by then.
    document = current_app.extensions.get("dm_channels_openapi")
    if document is None:
        document = api.openapi_document(current_app, under_api)
        current_app.extensions["dm_channels_openapi"] = document
    return jsonify(document)


@endpoint(
    "The store answers",
    data=schemas.HealthData,
    errors=[api.StoreUnavailable],
    common_errors=False,
)
def healthz():
    """For load balancers: 200 while the store answers a trivial query."""
    try:
        get_store().ping()
    except StoreError as e:
        ops.count_store_error(e)
        current_app.logger.error("health check failed: %s", e, extra={"status": 503})
        raise api.StoreUnavailable("The channel store did not answer.") from e
    return {"status": "ok"}


# -- errors: one JSON envelope for everything ----------------------------------


def handle_http_exception(e):
    # A code made from the name, e.g. "Permanent Redirect": PERMANENT_REDIRECT.
    code = re.sub(r"[^A-Z0-9]+", "_", e.name.upper()).strip("_")
    if isinstance(e, RequestRedirect):  # routing's 308, e.g. for doubled slashes
        # A path: routing builds new_url from the request's Host and scheme,
        # which a client can write; the redirect stays on this host anyway.
        _, _, path, query, _ = urlsplit(e.new_url)
        location = path + (f"?{query}" if query else "")
        return api.envelope(
            e.code, code, e.name, f"The resource is at {location}.", {"Location": location}
        )
    # Keep what the exception says beyond its HTML body, e.g. 405's Allow.
    headers = [(name, value) for name, value in e.get_headers() if name.lower() != "content-type"]
    declared = api.ROUTING_ERRORS.get(e.code)
    if declared is not None:
        return declared(e.description, headers).response()
    return api.envelope(e.code, code, e.name, e.description, headers)


def handle_store_error(e):
    ops.count_store_error(e)
    current_app.logger.error(
        "store failure on %s: %s", request.path, e, exc_info=e, extra={"status": 500}
    )
    return api.StoreFailure("The channel store did not answer in time; try again.").response()


def handle_unexpected_error(e):
    current_app.logger.exception("unexpected error on %s", request.path, extra={"status": 500})
    return api.InternalError("The cause was logged.").response()


def register_error_handlers(target):
    """Answer errors with the envelope, on an app (everything) or a blueprint (its routes)."""
    target.register_error_handler(HTTPException, handle_http_exception)
    target.register_error_handler(StoreError, handle_store_error)
    target.register_error_handler(Exception, handle_unexpected_error)


register_error_handlers(bp)


def under_api(path):
    """Whether `path` is the API's, however its slashes are doubled: routing
    merges them (and redirects), so the API key must be asked for all of them."""
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    return path == bp.url_prefix or path.startswith(bp.url_prefix + "/")


def guard_api():
    """Before every request of the app, for paths under the API's prefix (and,
    in the standalone service, every path): the API key, then the query
    string, then any routing error (404, 405) or leading doubled slashes, each
    answered with the envelope; and OPTIONS, answered in JSON.

    An app-level hook, because routing errors happen before any blueprint is
    chosen (the blueprint's own hooks and handlers never see them), and it
    answers rather than raises, so a host app's own error handlers cannot
    change the answer.
    """
    this = request._get_current_object()  # read six times: the proxy's lookup once
    if not under_api(this.path):
        # A host's other paths are its own; the standalone service's (its
        # health check, its OpenAPI document, any other) are answered alike.
        return answer_routing(this) if current_app.extensions.get("dm_channels_standalone") else None
    key = current_app.config["API_KEY"]
    if key is not None and api.key_refused(key, this.headers.get("X-API-KEY", "")):
        return api.Unauthorized("Send it in the X-API-KEY header.").response()
    query = this.query_string
    if len(query) > MAX_QUERY_LENGTH:
        details = f"The query string may be at most {MAX_QUERY_LENGTH} bytes."
        return api.RequestURITooLong(details).response()
    if not query.isascii():
        try:
            # request.args would fail on raw bytes that are not UTF-8 (gunicorn
            # refuses any raw non-ASCII; other servers pass it on).
            query.decode()
        except UnicodeDecodeError:
            return api.InvalidQueryString("Percent-encode anything beyond ASCII, as UTF-8.").response()
    return answer_routing(this)


def answer_routing(this):
    """A routing error, a path with leading doubled slashes, and OPTIONS,
    answered in JSON; None for a request its view answers."""
    if this.routing_exception is not None:
        return handle_http_exception(this.routing_exception)
    raw_path = this.environ.get("PATH_INFO", "")  # request.path drops leading slashes
    if raw_path.startswith("//"):
        # Routing ignores leading slashes (and redirects doubled ones further
        # on): the same redirect to the path's own form, for both.
        path = quote(re.sub("/{2,}", "/", raw_path).encode("latin-1"), safe="/:@!$&'()*+,;=~")
        query = this.query_string.decode("latin-1")
        return handle_http_exception(RequestRedirect(path + (f"?{query}" if query else "")))
    if this.method == "OPTIONS":
        # Flask's own answer has the Allow header and an empty text/html body.
        response = current_app.make_default_options_response()
        body = {"success": True, "data": {"methods": sorted(response.allow)}}
        response.set_data(current_app.json.dumps(body))
        response.mimetype = "application/json"
        return response
    return None


# -- settings and wiring --------------------------------------------------------


def database_path(app):
    return os.path.join(app.instance_path, "dm-channels.sqlite3")


def is_postgres_url(database):
    return str(database).startswith(("postgresql://", "postgres://"))


def open_store(database, busy_timeout=5.0, synchronous="FULL", allow_self_dm=False, **pool_settings):
    """The store DATABASE names: a PostgresStore for a postgresql:// (or
    postgres://) URL, given busy_timeout and the pool_settings; else a SQLite
    Store of that file, given busy_timeout and synchronous."""
    if is_postgres_url(database):
        try:
            from dm_channels.pgstore import PostgresStore  # psycopg is an optional install
        except ImportError as e:
            raise StoreError(
                f"DATABASE is a PostgreSQL URL but {e.name} is not installed: "
                'pip install "dm-channels[postgres]" (or -r requirements-postgres.txt)'
            ) from e
        return PostgresStore(
            database, busy_timeout=busy_timeout, allow_self_dm=allow_self_dm, **pool_settings
        )
    return Store(
        database, busy_timeout=busy_timeout, synchronous=synchronous, allow_self_dm=allow_self_dm
    )


def route_pattern(rule):
    """A rule's path with its variables' names and converters left out, so
    that /channels/<id> and /channels/<int:channelId> compare equal."""
    return re.sub(r"<[^<>]+>", "<>", rule)


OWN_ENDPOINTS = ("dm_channels_openapi", "dm_channels_healthz", "dm_channels_metrics")


def refuse_clashes(app):
    """Raise ValueError naming the route if one of ours has the same path and a
    method in common with one of the host's: Flask would serve one of the two
    and drop the other without a word."""
    ours, theirs = [], []
    for rule in app.url_map.iter_rules():
        mine = rule.endpoint in OWN_ENDPOINTS or rule.endpoint.startswith(bp.name + ".")
        (ours if mine else theirs).append(rule)
    for rule in theirs:
        for own in ours:
            shared = rule.methods & own.methods - {"OPTIONS"}  # Flask adds OPTIONS to all
            if route_pattern(rule.rule) == route_pattern(own.rule) and shared:
                raise ValueError(
                    f"dm-channels cannot mount {own.rule}: the app already routes "
                    f"{rule.rule} to {rule.endpoint!r} (move or turn off ours with "
                    "HEALTH_PATH or OPENAPI_PATH, or move yours)"
                )


def init_app(app):
    """Mount the service on `app`: blueprint, error envelope for its routes,
    /healthz and /openapi.json (at HEALTH_PATH and OPENAPI_PATH, or nowhere),
    the store (configured from app.config) and the CLI commands.

    Settings missing from app.config get their defaults. Call it once the
    host's config is set and its own routes are registered: the store is built
    here (it opens nothing yet), and a route of the host's that one of ours
    would shadow is a ValueError naming it.
    """
    for name, value in settings.DEFAULTS.items():
        app.config.setdefault(name, value)
    if "DATABASE" not in app.config:
        try:
            os.makedirs(app.instance_path, mode=0o700, exist_ok=True)  # its owner's alone
        except OSError as e:
            raise StoreError(
                f"cannot make the instance folder {app.instance_path}, DATABASE's "
                f"default home: {e.strerror}; set DATABASE"
            ) from e
        app.config["DATABASE"] = database_path(app)
    app.config.update(settings.load_settings(app.config))  # checked and normalised
    app.extensions["dm_channels"] = open_store(
        app.config["DATABASE"],
        busy_timeout=app.config["BUSY_TIMEOUT"],
        synchronous=app.config["SQLITE_SYNCHRONOUS"],
        allow_self_dm=app.config["ALLOW_SELF_DM"],
        pool_min_size=app.config["PG_POOL_MIN_SIZE"],
        pool_max_size=app.config["PG_POOL_MAX_SIZE"],
        pool_timeout=app.config["PG_POOL_TIMEOUT"],
        connect_timeout=app.config["PG_CONNECT_TIMEOUT"],
        transaction_pooling=app.config["PG_TRANSACTION_POOLING"],
    )
    # Say now, in one line naming the setting, if the database cannot be
    # used, rather than fail every request.
    try:
        app.extensions["dm_channels"].check_writable()
    except StoreError as e:
        raise StoreError(f"DATABASE: {e}", e.cause) from e
    app.extensions["dm_channels_answers"] = AnswerCache(app.config["CHANNEL_CACHE_SIZE"])
    app.register_blueprint(bp)
    app.before_request(guard_api)
    # Outside the API's prefix by default (load balancers and clients expect
    # them at the root), under endpoint names of their own.
    for path, name, view in [
        (app.config["OPENAPI_PATH"], "dm_channels_openapi", openapi_json),
        (app.config["HEALTH_PATH"], "dm_channels_healthz", healthz),
    ]:
        if path:
            app.add_url_rule(path, name, view)
    refuse_clashes(app)
    for command in COMMANDS:
        app.cli.add_command(command)


def checked_forwarding(wsgi_app):
    """Between ProxyFix and the app: a forwarded address that is not an IP
    address, or a forwarded scheme other than http or https, is not believed;
    the peer's own stands (ProxyFix keeps it in werkzeug.proxy_fix.orig)."""

    def checked(environ, start_response):
        peer = environ.get("werkzeug.proxy_fix.orig")
        if peer is not None:
            if not is_ip_address(environ.get("REMOTE_ADDR")):
                environ.pop("REMOTE_ADDR", None)
                if peer["REMOTE_ADDR"] is not None:
                    environ["REMOTE_ADDR"] = peer["REMOTE_ADDR"]
            if environ["wsgi.url_scheme"] not in ("http", "https"):
                environ["wsgi.url_scheme"] = peer["wsgi.url_scheme"]
        return wsgi_app(environ, start_response)

    return checked


def is_ip_address(value):
    """An IPv4 or IPv6 address, without an IPv6 zone (`fe80::1%eth0`: the
    zone may hold any text, spaces and quotes too)."""
    try:
        address = ipaddress.ip_address(value)
    except (TypeError, ValueError):
        return False
    return getattr(address, "scope_id", None) is None  # IPv4 has none


def create_app(test_config=None):
    """The standalone service: defaults, then FLASK_* environment, then test_config.

    Every error of the app, on any path, is answered with the envelope.
    """
    # Named for the package, so that its instance folder (DATABASE's default
    # home) is Flask's for it: <checkout>/instance in a checkout, and
    # <venv>/var/dm_channels-instance once pip-installed.
    app = Flask("dm_channels", instance_relative_config=True, static_folder=None)
    app.json.sort_keys = False  # keys in the schemas' order: success, then data or error
    app.config.from_mapping(settings.DEFAULTS)
    app.config.from_prefixed_env()
    if test_config is not None:
        app.config.from_mapping(test_config)
    register_error_handlers(app)
    # Loaded by a `flask` command, not by its reloader's child (which loads it again).
    context = click.get_current_context(silent=True)
    in_flask_command = context is not None and context.find_object(ScriptInfo) is not None
    in_flask_command &= not is_running_from_reloader()
    if in_flask_command:  # gunicorn.conf.py's on_starting warns under gunicorn
        for line in settings.unread_variables(os.environ):
            click.echo(f"Warning: {line}", err=True)
    app.extensions["dm_channels_standalone"] = True  # every path is the service's (guard_api)
    try:
        init_app(app)
        ops.init_app(app)  # request ids; metrics with METRICS on
    except (ValueError, StoreError) as e:
        if in_flask_command:
            # Loaded by a `flask` command: one line and exit status 1, as
            # gunicorn's on_starting gives, rather than Flask's traceback
            # (which `flask --help` prints for any Exception, ClickException too).
            click.echo(f"Error: {e}", err=True)
            raise SystemExit(1) from e
        raise
    proxies = app.config["TRUSTED_PROXIES"]
    if proxies:
        # The client's address is the entry the outermost trusted proxy
        # appended to X-Forwarded-For: anything a client wrote before it is
        # ignored. REMOTE_ADDR is rewritten in the environ gunicorn's access log
        # reads after the request, so the log shows that address too. The
        # nearest proxy sets X-Forwarded-Proto (never appends), so one value.
        app.wsgi_app = ProxyFix(checked_forwarding(app.wsgi_app), x_for=proxies, x_proto=1)
    logs.configure_logging(app)
    return app
