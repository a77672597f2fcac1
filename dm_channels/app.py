"""The service: `create_app()` is the standalone service, `init_app(app)` mounts it in another Flask app."""

import ipaddress
import os

import click
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import is_running_from_reloader

from dm_channels import api, cli, logs, ops, settings
from dm_channels.settings import is_postgres_url
from dm_channels.store import Store, StoreError


class DMChannels:
    """app.extensions["dm_channels"]: the store, the answer cache, and what ops.init_app adds."""

    def __init__(self, store, answers):
        self.store = store
        self.answers = answers
        self.metrics = None  # with METRICS on
        self.request_ids = False
        self.openapi = None  # the document, built on first request
        self.routes_checked = False  # by api.guard, for routes added after init_app


class CannotStart(click.ClickException, ValueError):
    """A setting or a database the service cannot start with: under flask, one "Error:" line."""


def open_store(database, busy_timeout=5.0, synchronous="FULL", allow_self_dm=False, **pool_settings):
    """A PostgresStore for a postgresql:// URL, else a SQLite Store of that file."""
    if is_postgres_url(database):
        try:
            from dm_channels.pgstore import PostgresStore  # psycopg is an optional install
        except ImportError as e:
            install = 'pip install "dm-channels[postgres]" (or -r requirements-postgres.txt)'
            raise StoreError(f"DATABASE is a PostgreSQL URL but {e.name} is not installed: {install}") from e
        return PostgresStore(database, busy_timeout=busy_timeout, allow_self_dm=allow_self_dm, **pool_settings)
    return Store(database, busy_timeout=busy_timeout, synchronous=synchronous, allow_self_dm=allow_self_dm)


def init_app(app):
    """Mount the API, HEALTH_PATH, OPENAPI_PATH, the store and the commands on `app` once its config and routes are
    set: ValueError for a bad setting or a clash with one of its routes, StoreError for an unusable database."""
    for name, value in settings.DEFAULTS.items():
        app.config.setdefault(name, value)
    if "DATABASE" not in app.config:
        try:
            os.makedirs(app.instance_path, mode=0o700, exist_ok=True)
        except OSError as e:
            why = f"cannot make the instance folder {app.instance_path}, DATABASE's default home: {e.strerror}"
            raise StoreError(f"{why}; set DATABASE") from e
        app.config["DATABASE"] = os.path.join(app.instance_path, "dm-channels.sqlite3")
    config = app.config
    config.update(settings.load_settings(config))
    store = open_store(
        config["DATABASE"], busy_timeout=config["BUSY_TIMEOUT"], synchronous=config["SQLITE_SYNCHRONOUS"],
        allow_self_dm=config["ALLOW_SELF_DM"], pool_min_size=config["PG_POOL_MIN_SIZE"],
        pool_max_size=config["PG_POOL_MAX_SIZE"], pool_timeout=config["PG_POOL_TIMEOUT"],
        connect_timeout=config["PG_CONNECT_TIMEOUT"], transaction_pooling=config["PG_TRANSACTION_POOLING"],
    )
    try:
        store.check_writable()  # now, in one line, not on every request
    except StoreError as e:
        raise StoreError(f"DATABASE: {e}", e.cause) from e
    app.extensions["dm_channels"] = DMChannels(store, api.AnswerCache(config["CHANNEL_CACHE_SIZE"]))
    app.register_blueprint(api.bp)
    if config["OPENAPI_PATH"]:
        app.add_url_rule(config["OPENAPI_PATH"], "dm_channels_openapi", api.openapi_json)
    if config["HEALTH_PATH"]:
        app.add_url_rule(config["HEALTH_PATH"], "dm_channels_healthz", api.healthz)
    api.refuse_clashes(app)
    for command in cli.COMMANDS:
        app.cli.add_command(command)


def checked_forwarding(wsgi_app):
    """Between ProxyFix and the app: the peer's own address and scheme in place of a forwarded address that is not
    an IP address (an IPv6 zone may hold any text) or a scheme other than http or https."""

    def checked(environ, start_response):
        peer = environ.get("werkzeug.proxy_fix.orig")
        if peer is not None:
            try:
                believed = getattr(ipaddress.ip_address(environ.get("REMOTE_ADDR")), "scope_id", None) is None
            except (TypeError, ValueError):
                believed = False
            if not believed:
                environ.pop("REMOTE_ADDR", None)
                if peer["REMOTE_ADDR"] is not None:
                    environ["REMOTE_ADDR"] = peer["REMOTE_ADDR"]
            if environ["wsgi.url_scheme"] not in ("http", "https"):
                environ["wsgi.url_scheme"] = peer["wsgi.url_scheme"]
        return wsgi_app(environ, start_response)

    return checked


def create_app(test_config=None):
    """The standalone service: defaults, then FLASK_* variables, then test_config; every answer with a body is JSON."""
    # Named for the package: its instance folder is <checkout>/instance, or <venv>/var/dm_channels-instance.
    app = Flask("dm_channels", instance_relative_config=True, static_folder=None)
    app.json.sort_keys = False  # keys in the schemas' order: success, then data or error
    app.config.from_prefixed_env()
    app.config.from_mapping(test_config)  # init_app fills in the defaults
    api.register_error_handlers(app)
    # Under a flask command; under gunicorn, on_starting says them.
    if click.get_current_context(silent=True) is not None and not is_running_from_reloader():
        for line in settings.unread_variables(os.environ):
            click.echo(f"Warning: {line}", err=True)
    try:
        init_app(app)
        app.before_request(api.redirect_leading_slashes)  # after the API's guard
        ops.init_app(app)
    except (ValueError, StoreError) as e:
        raise CannotStart(str(e)) from e
    if app.config["TRUSTED_PROXIES"]:
        # The client is the address the outermost trusted proxy appended; the nearest sets the scheme.
        app.wsgi_app = ProxyFix(checked_forwarding(app.wsgi_app), x_for=app.config["TRUSTED_PROXIES"], x_proto=1)
    logs.configure_logging(app)
    return app
