"""dm-channels: which direct-message channel do these two users share?

One blueprint, `bp`, answers GET /api/messaging/dm-channel. `create_app()` is
the standalone service (gunicorn "app:create_app()", flask --app app run);
`init_app(host_app)` mounts the same service inside another Flask app.
"""

import os
import re
from itertools import islice

import click
from flask import Blueprint, Flask, current_app, jsonify, request
from flask.cli import with_appcontext
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

import schemas
from store import Store, StoreError, open_store

NIL_UUID = "00000000-0000-0000-0000-000000000000"

# Every setting, with its default; each can also come from FLASK_<NAME>.
# DATABASE defaults to a file in the instance folder (see database_path); a
# postgresql:// URL there selects PostgreSQL, and the PG_* settings apply.
DEFAULTS = {
    "SERVER_ID": NIL_UUID,
    "ALLOW_SELF_DM": False,
    "BUSY_TIMEOUT": 5.0,
    "SQLITE_SYNCHRONOUS": "FULL",
    "PG_POOL_MIN_SIZE": 1,
    "PG_POOL_MAX_SIZE": 4,
    "PG_POOL_TIMEOUT": 5.0,
    "PG_CONNECT_TIMEOUT": 5,
}

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


@click.command("import-sqlite")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@with_appcontext
def import_sqlite_command(source):
    """Copy every channel of the SQLite file SOURCE into the configured store.

    Ids and createdAt are kept; a pair that already has a channel keeps its
    own, so running it again adds nothing.
    """
    store, origin, copied, added = get_store(), Store(source), 0, 0
    try:
        channels = origin.channels()
        while batch := list(islice(channels, 10_000)):
            added += store.add_channels(batch)  # each batch its own transaction
            copied += len(batch)
    except StoreError as e:
        raise click.ClickException(f"{e} (after {added} channels added)") from e
    finally:
        origin.close()
    click.echo(f"Read {copied} channels from {source}; added {added} to {store.path}.")


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
    for name, least in [("PG_POOL_MIN_SIZE", 0), ("PG_POOL_MAX_SIZE", 1), ("PG_CONNECT_TIMEOUT", 1)]:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")
    if config["PG_POOL_MIN_SIZE"] > config["PG_POOL_MAX_SIZE"]:
        raise ValueError("PG_POOL_MIN_SIZE must not be more than PG_POOL_MAX_SIZE")
    timeout = config["PG_POOL_TIMEOUT"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"PG_POOL_TIMEOUT must be a number of seconds, not {timeout!r}")


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
    app.extensions["dm_channels"] = open_store(
        app.config["DATABASE"],
        busy_timeout=app.config["BUSY_TIMEOUT"],
        synchronous=app.config["SQLITE_SYNCHRONOUS"],
        pool_min_size=app.config["PG_POOL_MIN_SIZE"],
        pool_max_size=app.config["PG_POOL_MAX_SIZE"],
        pool_timeout=app.config["PG_POOL_TIMEOUT"],
        connect_timeout=app.config["PG_CONNECT_TIMEOUT"],
    )
    app.register_blueprint(bp)
    if HTTPException not in app.error_handler_spec[None][None]:
        # The host has no handler of its own for HTTP errors: add one that
        # touches only our paths and leaves the host's answers as they were.
        app.register_error_handler(HTTPException, handle_routing_error)
    app.cli.add_command(init_db_command)
    app.cli.add_command(import_sqlite_command)


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
