"""dm-channels: which direct-message channel do these two users share?

One blueprint, `bp`, answers GET /api/messaging/dm-channel. `create_app()` is
the standalone service (gunicorn "app:create_app()", flask --app app run);
`init_app(host_app)` mounts the same service inside another Flask app.
"""

import hmac
import os
import re

import click
from flask import Blueprint, Flask, current_app, jsonify, request
from flask.cli import with_appcontext
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, RequestURITooLarge

import schemas
from store import Store, StoreError

NIL_UUID = "00000000-0000-0000-0000-000000000000"

# Every setting, with its default; each can also come from FLASK_<NAME>.
# DATABASE defaults to a file in the instance folder (see database_path).
DEFAULTS = {
    "SERVER_ID": NIL_UUID,
    "ALLOW_SELF_DM": False,
    "BUSY_TIMEOUT": 5.0,
    "SQLITE_SYNCHRONOUS": "FULL",
    "API_KEY": None,
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


def load_query(schema, code, message):
    try:
        return schema.load(request.args.to_dict(flat=False))
    except ValidationError as e:
        raise APIError(400, code, message, schemas.describe_errors(e.messages)) from e


def get_store():
    return current_app.extensions["dm_channels"]


@bp.before_request
def require_api_key():
    """With API_KEY set, every route of the blueprint wants it in X-API-KEY."""
    key = current_app.config["API_KEY"]
    if key is None:
        return
    given = request.headers.get("X-API-KEY", "")
    # Constant time, so the answer's timing says nothing about the key.
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(
            401, "UNAUTHORIZED", "Missing or wrong API key.", "Send it in the X-API-KEY header."
        )


@bp.before_request
def check_query_string():
    """Refuse a query string too long to read, or one that request.args would
    fail to decode (raw bytes that are not UTF-8; gunicorn refuses any raw
    non-ASCII, other servers pass it on)."""
    if len(request.query_string) > MAX_QUERY_LENGTH:
        raise RequestURITooLarge(f"The query string may be at most {MAX_QUERY_LENGTH} bytes.")
    try:
        request.query_string.decode()
    except UnicodeDecodeError as e:
        raise APIError(
            400,
            "INVALID_QUERY_STRING",
            "The query string is not UTF-8.",
            "Percent-encode anything beyond ASCII, as UTF-8.",
        ) from e


@bp.get("/dm-channel")
def dm_channel():
    query = load_query(
        schemas.dm_channel_query, "INVALID_USER_IDS", "Invalid user IDs."
    )
    user1, user2 = query["userId1"], query["userId2"]
    if user1 == user2 and not current_app.config["ALLOW_SELF_DM"]:
        raise APIError(
            400,
            "SELF_DM_NOT_ALLOWED",
            "A DM channel needs two different users.",
            f"userId1 and userId2 are the same user, {user1}.",
        )
    channel, created = get_store().get_or_create_dm(user1, user2)
    return schemas.dm_channel_response.dump(
        {"data": {"channel": channel, "created": created}}
    )


# Registered by init_app outside the blueprint, so API_KEY does not cover it.
def healthz():
    """For load balancers: 200 while the store answers a trivial query."""
    try:
        get_store().ping()
    except StoreError as e:
        current_app.logger.error("health check failed: %s", e)
        return envelope(
            503, "STORE_UNAVAILABLE", "Store unavailable", "The channel store did not answer."
        )
    return {"success": True, "data": {"status": "ok"}}


# -- errors: one JSON envelope for everything ----------------------------------


def handle_api_error(e):
    return envelope(e.status, e.code, e.message, e.details)


def handle_http_exception(e):
    if e.code is None or e.code < 400:  # e.g. a redirect raised by routing
        return e.get_response()
    code = re.sub(r"[^A-Z0-9]+", "_", e.name.upper()).strip("_")
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


def handle_routing_error(e):
    """For a host app: envelope the 404/405 that routing raises under our prefix.

    Routing errors happen before any blueprint is chosen, so the blueprint's
    own handlers never see them.
    """
    if request.path == bp.url_prefix or request.path.startswith(bp.url_prefix + "/"):
        return handle_http_exception(e)
    return e


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


# -- settings and wiring --------------------------------------------------------


def database_path(app):
    return os.path.join(app.instance_path, "dm-channels.sqlite3")


def check_settings(config):
    """Refuse a misspelt setting at start-up rather than misbehave later."""
    if not isinstance(config["ALLOW_SELF_DM"], bool):
        raise ValueError(
            f"ALLOW_SELF_DM must be true or false, not {config['ALLOW_SELF_DM']!r}"
        )
    if not isinstance(config["SERVER_ID"], str) or not schemas.UUID_FORM.fullmatch(
        config["SERVER_ID"]
    ):
        raise ValueError(f"SERVER_ID must be a UUID, not {config['SERVER_ID']!r}")
    config["SERVER_ID"] = config["SERVER_ID"].lower()
    timeout = config["BUSY_TIMEOUT"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"BUSY_TIMEOUT must be a number of seconds, not {timeout!r}")
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


def init_app(app):
    """Mount the service on `app`: blueprint, error envelope for its routes,
    the store (configured from app.config) and the `init-db` command.

    Settings missing from app.config get their defaults. Call it once the
    host's config is set: the store is built here (it opens nothing yet).
    """
    for name, value in DEFAULTS.items():
        app.config.setdefault(name, value)
    if "DATABASE" not in app.config:
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["DATABASE"] = database_path(app)
    check_settings(app.config)
    app.extensions["dm_channels"] = Store(
        app.config["DATABASE"],
        busy_timeout=app.config["BUSY_TIMEOUT"],
        synchronous=app.config["SQLITE_SYNCHRONOUS"],
    )
    # Say now, in one line, if the database cannot be written, rather than
    # fail every request that creates.
    app.extensions["dm_channels"].check_writable()
    app.register_blueprint(bp)
    app.add_url_rule("/healthz", view_func=healthz)
    if HTTPException not in app.error_handler_spec[None][None]:
        # The host has no handler of its own for HTTP errors: add one that
        # touches only our paths and leaves the host's answers as they were.
        app.register_error_handler(HTTPException, handle_routing_error)
    app.cli.add_command(init_db_command)
    app.cli.add_command(backup_command)


def create_app(test_config=None):
    """The standalone service: defaults, then FLASK_* environment, then test_config."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DEFAULTS, DATABASE=database_path(app))
    app.config.from_prefixed_env()
    if test_config is not None:
        app.config.from_mapping(test_config)
    os.makedirs(app.instance_path, exist_ok=True)
    register_error_handlers(app)
    init_app(app)
    return app
