"""dm-channels: which direct-message channel do these two users share?

One blueprint, `bp`, holds the API under /api/messaging: get-or-create of a
pair's channel (dm-channel) and the read side (a channel, its participants, a
user's channels); /openapi.json describes them all. `create_app()` is
the standalone service (gunicorn "app:create_app()", flask --app app run);
`init_app(host_app)` mounts the same service inside another Flask app.
"""

import hmac
import importlib.util
import os
import re
import sys
from itertools import islice

if not __package__ and "dm_channels" not in sys.modules:
    # Run from the repository root (gunicorn "app:create_app()", flask --app
    # app), this file is the top-level module "app". Its folder is the package
    # dm_channels, as pyproject.toml installs it: register it under that name,
    # so that the imports below are the same in a checkout and installed, and
    # no other module of ours lands at the top level.
    _root = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location(
        "dm_channels", os.path.join(_root, "__init__.py"), submodule_search_locations=[_root]
    )
    sys.modules["dm_channels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["dm_channels"])

import click
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, jsonify, request
from flask.cli import with_appcontext
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, RequestURITooLarge
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import RequestRedirect

from dm_channels import __version__, schemas
from dm_channels.schemas import NIL_UUID
from dm_channels.store import (
    SYNCHRONOUS_LEVELS,
    UUID_FORM,
    SelfDMError,
    Store,
    StoreError,
    UnknownPosition,
    open_existing,
)

# Every setting, with its default; each can also come from FLASK_<NAME>.
# DATABASE defaults to a file in the instance folder (see database_path); a
# postgresql:// URL there selects PostgreSQL, and the PG_* settings apply.
# HEALTH_PATH and OPENAPI_PATH say where init_app mounts /healthz and
# /openapi.json; None (FLASK_HEALTH_PATH=null) or "" mounts none.
# TRUSTED_PROXIES is how many proxies in front of create_app's service append
# to X-Forwarded-For (nginx alone: 1); 0 trusts no X-Forwarded-* header.
DEFAULTS = {
    "SERVER_ID": NIL_UUID,
    "ALLOW_SELF_DM": False,
    "HEALTH_PATH": "/healthz",
    "OPENAPI_PATH": "/openapi.json",
    "BUSY_TIMEOUT": 5.0,
    "SQLITE_SYNCHRONOUS": "FULL",
    "API_KEY": None,
    "PG_POOL_MIN_SIZE": 1,
    "PG_POOL_MAX_SIZE": 4,
    "PG_POOL_TIMEOUT": 5.0,
    "PG_CONNECT_TIMEOUT": 5,
    "PG_TRANSACTION_POOLING": False,
    "TRUSTED_PROXIES": 0,
}

# The longest query string (raw, as sent) the API reads; a longer one gets a
# 414 envelope. gunicorn.conf.py's limit_request_line leaves room for it.
MAX_QUERY_LENGTH = 2048

bp = Blueprint("messaging", __name__, url_prefix="/api/messaging")


class APIError(Exception):
    """An error the API answers on purpose, with its own status and code."""

    def __init__(self, status, code, message, details=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def envelope(status, code, message, details=None):
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = str(details)
    response = jsonify(schemas.error_response.dump({"error": error}))
    response.status_code = status
    return response


def load(schema, data, code, message):
    try:
        return schema.load(data)
    except ValidationError as e:
        raise APIError(400, code, message, schemas.describe_errors(e.messages)) from e


def load_query(schema, code, message):
    return load(schema, request.args.to_dict(flat=False), code, message)


def get_store():
    return current_app.extensions["dm_channels"]


def dump(schema, data):
    """schema.dump(data), with this app's SERVER_ID in every channel."""
    return schemas.dump(schema, data, current_app.config["SERVER_ID"])


def documented(summary, response, errors, path=None, query=None, common_errors=True):
    """Attach the OpenAPI operation to a view: the schemas named here are the
    ones the view loads and dumps, so /openapi.json follows the code.
    `errors` maps a status to the codes the view can answer with."""

    def attach(view):
        parameters = [
            {"in": where, "schema": schema}
            for where, schema in (("path", path), ("query", query))
            if schema is not None
        ]
        responses = {200: {"description": summary, "content": json_content(response)}}
        for status, codes in (error_codes(errors) if common_errors else errors).items():
            responses[status] = {
                "description": " or ".join(codes),
                "content": json_content("Error"),
            }
        view.openapi = {
            "summary": summary,
            "operationId": view.__name__,
            "parameters": parameters,
            "responses": responses,
        }
        return view

    return attach


# What any route of the blueprint can answer, besides its own errors.
COMMON_ERRORS = {
    400: ["INVALID_QUERY_STRING"],
    414: ["REQUEST_URI_TOO_LONG"],
    500: ["STORE_ERROR", "INTERNAL_ERROR"],
}


def error_codes(errors):
    merged = {status: list(codes) for status, codes in errors.items()}
    for status, codes in COMMON_ERRORS.items():
        merged.setdefault(status, []).extend(codes)
    return dict(sorted(merged.items()))


def json_content(schema):
    return {"application/json": {"schema": schema}}


@bp.get("/dm-channel")
@documented(
    "DM channel retrieved or created",
    schemas.DMChannelResponse,
    {400: ["INVALID_USER_IDS", "SELF_DM_NOT_ALLOWED"]},
    query=schemas.DMChannelQuery,
)
def dm_channel():
    query = load_query(
        schemas.dm_channel_query, "INVALID_USER_IDS", "Invalid user IDs."
    )
    user1, user2 = query["userId1"], query["userId2"]
    try:
        # The store keeps the rule (its allow_self_dm is ALLOW_SELF_DM).
        channel, created = get_store().get_or_create_dm(user1, user2)
    except SelfDMError as e:
        raise APIError(
            400,
            "SELF_DM_NOT_ALLOWED",
            "A DM channel needs two different users.",
            f"userId1 and userId2 are the same user, {user1}.",
        ) from e
    return dump(schemas.dm_channel_response, {"data": {"channel": channel, "created": created}})


def find_channel(channel_id):
    path = load(
        schemas.channel_path, {"channelId": channel_id}, "INVALID_CHANNEL_ID", "Invalid channel ID."
    )
    channel = get_store().get_channel(path["channelId"])
    if channel is None:
        raise APIError(
            404, "CHANNEL_NOT_FOUND", "Channel not found.", f"No DM channel has id {path['channelId']}."
        )
    return channel


@bp.get("/channels/<channelId>")
@documented(
    "The DM channel with this id",
    schemas.ChannelResponse,
    {400: ["INVALID_CHANNEL_ID"], 404: ["CHANNEL_NOT_FOUND", "NOT_FOUND"]},
    path=schemas.ChannelPath,
)
def channel(channelId):
    return dump(schemas.channel_response, {"data": {"channel": find_channel(channelId)}})


@bp.get("/channels/<channelId>/participants")
@documented(
    "The two users of the DM channel, sorted",
    schemas.ParticipantsResponse,
    {400: ["INVALID_CHANNEL_ID"], 404: ["CHANNEL_NOT_FOUND", "NOT_FOUND"]},
    path=schemas.ChannelPath,
)
def participants(channelId):
    channel = find_channel(channelId)
    return dump(
        schemas.participants_response,
        {"data": {"participants": [channel.user_low, channel.user_high]}},
    )


@bp.get("/users/<userId>/dm-channels")
@documented(
    "A page of the user's DM channels, newest first",
    schemas.UserChannelsResponse,
    {
        400: ["INVALID_USER_ID", "INVALID_PARAMETER", "INVALID_CURSOR"],
        404: ["NOT_FOUND"],
    },
    path=schemas.UserPath,
    query=schemas.UserChannelsQuery,
)
def user_channels(userId):
    user = load(schemas.user_path, {"userId": userId}, "INVALID_USER_ID", "Invalid user ID.")
    try:
        query = schemas.user_channels_query.load(request.args.to_dict(flat=False))
    except ValidationError as e:
        code = "INVALID_CURSOR" if set(e.messages) == {"cursor"} else "INVALID_PARAMETER"
        raise APIError(400, code, "Invalid parameter.", schemas.describe_errors(e.messages)) from e
    try:
        channels, position = get_store().user_channels(
            user["userId"], query["limit"], query.get("cursor")
        )
    except UnknownPosition as e:
        # Well formed, but not one of this user's channels: the same answer
        # as a malformed cursor.
        details = f"cursor: {schemas.Cursor.default_error_messages['invalid']}"
        raise APIError(400, "INVALID_CURSOR", "Invalid parameter.", details) from e
    return dump(
        schemas.user_channels_response, {"data": {"channels": channels, "nextCursor": position}}
    )


# -- the contract, from the code ------------------------------------------------


def openapi_document(app):
    """OpenAPI 3 of every documented route of `app`, from the views' schemas."""
    spec = APISpec(
        title="dm-channels",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Get or create the one DM channel of two users, and find it again."},
    )
    spec.components.schema("Channel", schema=schemas.ChannelSchema)
    spec.components.schema("Error", schema=schemas.ErrorResponse)
    if app.config["API_KEY"] is not None:
        spec.components.security_scheme(
            "ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-KEY"}
        )
    for rule in app.url_map.iter_rules():
        operation = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if operation is None:
            continue
        if app.config["API_KEY"] is not None and under_api(rule.rule):
            unauthorized = {"description": "UNAUTHORIZED", "content": json_content("Error")}
            operation = {
                **operation,
                "security": [{"ApiKey": []}],
                "responses": {**operation["responses"], 401: unauthorized},
            }
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        spec.path(path=path, operations={"get": operation})
    return spec.to_dict()


def openapi_json():
    return jsonify(openapi_document(current_app))


# Registered by init_app outside the blueprint's prefix: open even with API_KEY.
@documented(
    "The store answers",
    schemas.HealthResponse,
    {503: ["STORE_UNAVAILABLE"]},
    common_errors=False,
)
def healthz():
    """For load balancers: 200 while the store answers a trivial query."""
    try:
        get_store().ping()
    except StoreError as e:
        current_app.logger.error("health check failed: %s", e)
        return envelope(
            503, "STORE_UNAVAILABLE", "Store unavailable", "The channel store did not answer."
        )
    return schemas.health_response.dump({"data": {"status": "ok"}})


# -- errors: one JSON envelope for everything ----------------------------------


def handle_api_error(e):
    return envelope(e.status, e.code, e.message, e.details)


def handle_http_exception(e):
    code = re.sub(r"[^A-Z0-9]+", "_", e.name.upper()).strip("_")
    if isinstance(e, RequestRedirect):  # routing's 308, e.g. for doubled slashes
        response = envelope(e.code, code, e.name, f"The resource is at {e.new_url}.")
        response.headers["Location"] = e.new_url
        return response
    response = envelope(e.code, code, e.name, e.description)
    # Keep what the exception says beyond its HTML body, e.g. 405's Allow.
    for name, value in e.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def handle_store_error(e):
    current_app.logger.error("store failure on %s: %s", request.path, e, exc_info=e)
    return envelope(
        500,
        "STORE_ERROR",
        "Error retrieving channel",
        "The channel store did not answer in time; try again.",
    )


def handle_unexpected_error(e):
    current_app.logger.exception("unexpected error on %s", request.path)
    return envelope(500, "INTERNAL_ERROR", "Internal server error", "The cause was logged.")


def register_error_handlers(target):
    """Answer errors with the envelope, on an app (everything) or a blueprint (its routes)."""
    target.register_error_handler(APIError, handle_api_error)
    target.register_error_handler(HTTPException, handle_http_exception)
    target.register_error_handler(StoreError, handle_store_error)
    target.register_error_handler(Exception, handle_unexpected_error)


register_error_handlers(bp)


def under_api(path):
    return path == bp.url_prefix or path.startswith(bp.url_prefix + "/")


def guard_api():
    """Before every request of the app, for paths under the API's prefix: the
    API key, then the query string, then any routing error (404, 405), each
    answered with the envelope.

    An app-level hook, because routing errors happen before any blueprint is
    chosen (the blueprint's own hooks and handlers never see them), and it
    answers rather than raises, so a host app's own error handlers cannot
    change the answer.
    """
    if not under_api(request.path):
        return None
    key = current_app.config["API_KEY"]
    given = request.headers.get("X-API-KEY", "")
    # Constant time, so the answer's timing says nothing about the key.
    if key is not None and not hmac.compare_digest(given.encode(), key.encode()):
        return envelope(
            401, "UNAUTHORIZED", "Missing or wrong API key.", "Send it in the X-API-KEY header."
        )
    if len(request.query_string) > MAX_QUERY_LENGTH:
        return handle_http_exception(
            RequestURITooLarge(f"The query string may be at most {MAX_QUERY_LENGTH} bytes.")
        )
    try:
        # request.args would fail on raw bytes that are not UTF-8 (gunicorn
        # refuses any raw non-ASCII; other servers pass it on).
        request.query_string.decode()
    except UnicodeDecodeError:
        return envelope(
            400,
            "INVALID_QUERY_STRING",
            "The query string is not UTF-8.",
            "Percent-encode anything beyond ASCII, as UTF-8.",
        )
    if request.routing_exception is not None:
        return handle_http_exception(request.routing_exception)
    if request.method == "OPTIONS":
        # Flask's own answer has the Allow header and an empty text/html body.
        response = current_app.make_default_options_response()
        body = {"success": True, "data": {"methods": sorted(response.allow)}}
        response.set_data(current_app.json.dumps(body))
        response.mimetype = "application/json"
        return response
    return None


# -- command line ---------------------------------------------------------------


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Create the channel table (and its indexes) if it does not exist."""
    store = get_store()
    store.init_schema()
    click.echo(f"Initialized {store.path} (schema version {store.schema_version()}).")


@click.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False))
@with_appcontext
def backup_command(dest):
    """Copy the live database to DEST, a new file, while the service runs."""
    store = get_store()
    try:
        store.backup(dest)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Backed up {store.path} to {dest}.")


@click.command("import-sqlite")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@with_appcontext
def import_sqlite_command(source):
    """Copy every channel of the SQLite file SOURCE into the configured store.

    Ids and createdAt are kept; a pair that already has a channel keeps its
    own, so running it again adds nothing.
    """
    store, copied, added = get_store(), 0, 0
    try:
        open_existing(source).close()  # not a misspelt path or another file
        origin = Store(source)
        try:
            channels = origin.channels()
            while batch := list(islice(channels, 10_000)):
                added += store.add_channels(batch)  # each batch its own transaction
                copied += len(batch)
        finally:
            origin.close()
    except StoreError as e:
        raise click.ClickException(f"{e} (after {added} channels added)") from e
    click.echo(f"Read {copied} channels from {source}; added {added} to {store.path}.")


# -- settings and wiring --------------------------------------------------------


def database_path(app):
    return os.path.join(app.instance_path, "dm-channels.sqlite3")


def check_settings(config):
    """Refuse a misspelt setting at start-up rather than misbehave later."""
    for name in ("ALLOW_SELF_DM", "PG_TRANSACTION_POOLING"):
        if not isinstance(config[name], bool):
            raise ValueError(f"{name} must be true or false, not {config[name]!r}")
    if not isinstance(config["SERVER_ID"], str) or not UUID_FORM.fullmatch(
        config["SERVER_ID"]
    ):
        raise ValueError(f"SERVER_ID must be a UUID, not {config['SERVER_ID']!r}")
    config["SERVER_ID"] = config["SERVER_ID"].lower()
    timeout = config["BUSY_TIMEOUT"]
    # SQLite counts the wait in whole milliseconds of a C int; and a request
    # should fail long before gunicorn's worker timeout kills it.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 60:
        raise ValueError(f"BUSY_TIMEOUT must be a number of seconds from 0 to 60, not {timeout!r}")
    database = config["DATABASE"]
    if not isinstance(database, (str, os.PathLike)) or not os.fspath(database):
        raise ValueError(f"DATABASE must be a file path or a postgresql:// URL, not {database!r}")
    synchronous = config["SQLITE_SYNCHRONOUS"]
    if not isinstance(synchronous, str) or synchronous.upper() not in SYNCHRONOUS_LEVELS:
        raise ValueError(
            f"SQLITE_SYNCHRONOUS must be one of {', '.join(SYNCHRONOUS_LEVELS)}, not {synchronous!r}"
        )
    key = config["API_KEY"]
    # A header can carry only such a key. Never quote the key: this ends up in logs.
    if key is not None and not (
        isinstance(key, str) and key and key.isascii() and key.isprintable()
        and key == key.strip()
    ):
        raise ValueError(
            "API_KEY must be a non-empty string of printable ASCII with no surrounding"
            " spaces (in FLASK_API_KEY, quote one that reads as JSON: '\"1234\"')"
        )
    for name, least in [
        ("PG_POOL_MIN_SIZE", 0),
        ("PG_POOL_MAX_SIZE", 1),
        ("PG_CONNECT_TIMEOUT", 1),
        ("TRUSTED_PROXIES", 0),
    ]:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")
    for name in ("HEALTH_PATH", "OPENAPI_PATH"):
        path = config[name]
        if path is not None and not (isinstance(path, str) and (path == "" or path.startswith("/"))):
            raise ValueError(f"{name} must be a path starting with /, or null to mount none, not {path!r}")
    if config["PG_POOL_MIN_SIZE"] > config["PG_POOL_MAX_SIZE"]:
        raise ValueError("PG_POOL_MIN_SIZE must not be more than PG_POOL_MAX_SIZE")
    timeout = config["PG_POOL_TIMEOUT"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"PG_POOL_TIMEOUT must be a number of seconds, not {timeout!r}")


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
            raise RuntimeError(
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


OWN_ENDPOINTS = ("dm_channels_openapi", "dm_channels_healthz")


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
    for name, value in DEFAULTS.items():
        app.config.setdefault(name, value)
    if "DATABASE" not in app.config:
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["DATABASE"] = database_path(app)
    check_settings(app.config)
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
    # Say now, in one line, if the database cannot be written, rather than
    # fail every request that creates.
    app.extensions["dm_channels"].check_writable()
    app.register_blueprint(bp)
    app.before_request(guard_api)
    # Outside the API's prefix by default (load balancers and clients expect
    # them at the root), under endpoint names of their own.
    for path, endpoint, view in [
        (app.config["OPENAPI_PATH"], "dm_channels_openapi", openapi_json),
        (app.config["HEALTH_PATH"], "dm_channels_healthz", healthz),
    ]:
        if path:
            app.add_url_rule(path, endpoint, view)
    refuse_clashes(app)
    app.cli.add_command(init_db_command)
    app.cli.add_command(backup_command)
    app.cli.add_command(import_sqlite_command)


def create_app(test_config=None):
    """The standalone service: defaults, then FLASK_* environment, then test_config.

    Every error of the app, on any path, is answered with the envelope.
    """
    app = Flask(__name__, instance_relative_config=True)
    app.json.sort_keys = False  # keys in the schemas' order: success, then data or error
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env()
    if test_config is not None:
        app.config.from_mapping(test_config)
    register_error_handlers(app)
    try:
        init_app(app)
    except (ValueError, RuntimeError, StoreError) as e:
        if click.get_current_context(silent=True) is not None:
            # Loaded by a `flask` command: one line and exit status 1, as
            # gunicorn's on_starting gives, rather than Flask's traceback.
            raise click.ClickException(str(e)) from e
        raise
    proxies = app.config["TRUSTED_PROXIES"]
    if proxies:
        # The client's address is the entry the outermost trusted proxy
        # appended to X-Forwarded-For: anything a client wrote before it is
        # ignored. REMOTE_ADDR is rewritten in the environ gunicorn's access log
        # reads after the request, so the log shows that address too. The
        # nearest proxy sets X-Forwarded-Proto (never appends), so one value.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=1)
    return app
