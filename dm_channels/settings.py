"""Every setting of the service, its default and what it may be (FLASK_* values are JSON: "yes" is a string)."""

import difflib
import math
import os
import re

import click
from flask import Config, Flask
from flask.cli import cli as flask_cli

from dm_channels.store import NIL_UUID, SYNCHRONOUS_LEVELS, UUID_FORM

METRICS_PATH = "/metrics"


def _number(least, most=math.inf, kind=(int, float)):
    return lambda v: isinstance(v, kind) and not isinstance(v, bool) and least <= v <= most


def _boolean(v):
    return isinstance(v, bool)


def _path_or_none(v):
    return v is None or (isinstance(v, str) and (v == "" or v.startswith("/")))


def _header_safe(v):
    return isinstance(v, str) and v and v.isascii() and v.isprintable() and v == v.strip()


def _one_of(*choices):
    return lambda v: isinstance(v, str) and v.upper() in choices


# A URL, a SQLite URI, ":memory:" or libpq's key=value form: a DATABASE that is no postgresql:// URL is a path.
OTHER_FORMS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|(file|sqlite):|:memory:$|\s*\w+\s*=", re.I)


def is_postgres_url(database):
    return str(database).startswith(("postgresql://", "postgres://"))


def _database(v):
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        return False
    return is_postgres_url(v) or not OTHER_FORMS.match(os.fspath(v))


KEY = ("a non-empty string of printable ASCII with no surrounding spaces"
       " (in FLASK_{name}, quote one that reads as JSON: '\"1234\"')")

# name: (default, accepted, what it must be, normal form). With no default: DATABASE's
# is init_app's (a file in the instance folder), and a key is off while absent.
SETTINGS = {
    "DATABASE": (None, _database, "a SQLite file's path (e.g. /srv/dm-channels.sqlite3) or a postgresql:// URL", None),
    "SERVER_ID": (NIL_UUID, lambda v: isinstance(v, str) and bool(UUID_FORM.fullmatch(v)), "a UUID", str.lower),
    "ALLOW_SELF_DM": (False, _boolean, "true or false", None),
    "HEALTH_PATH": ("/healthz", _path_or_none, "a path starting with /, or null to mount none", None),
    "OPENAPI_PATH": ("/openapi.json", _path_or_none, "a path starting with /, or null to mount none", None),
    # SQLite counts it in milliseconds of a C int; a request should fail long before gunicorn's timeout.
    "BUSY_TIMEOUT": (5.0, _number(0, 60), "a number of seconds from 0 to 60", None),
    "SQLITE_SYNCHRONOUS": ("FULL", _one_of(*SYNCHRONOUS_LEVELS), f"one of {', '.join(SYNCHRONOUS_LEVELS)}", str.upper),
    "API_KEY": (None, _header_safe, KEY.format(name="API_KEY"), None),
    "CHANNEL_CACHE_SIZE": (10_000, _number(0, kind=int), "a whole number >= 0", None),  # ~640 bytes an answer
    "TRUSTED_PROXIES": (0, _number(0, kind=int), "a whole number >= 0", None),
    "ACCESS_LOG": (True, _boolean, "true or false", None),
    "METRICS": (False, _boolean, "true or false", None),
    "METRICS_TOKEN": (None, _header_safe, KEY.format(name="METRICS_TOKEN"), None),
    "LOG_FORMAT": ("text", _one_of("TEXT", "JSON"), "text or json", str.lower),
    "PG_POOL_MIN_SIZE": (1, _number(0, kind=int), "a whole number >= 0", None),
    "PG_POOL_MAX_SIZE": (4, _number(1, kind=int), "a whole number >= 1", None),
    "PG_POOL_TIMEOUT": (5.0, _number(1e-9), "a number of seconds", None),
    "PG_CONNECT_TIMEOUT": (5, _number(1, kind=int), "a whole number >= 1", None),
    "PG_TRANSACTION_POOLING": (False, _boolean, "true or false", None),
}
DEFAULTS = {name: s[0] for name, s in SETTINGS.items() if s[0] is not None}


QUOTED = re.compile(r'"[^"]*"')  # in libpq's messages: what it quotes of a URL may hold a password


def libpq_read(database):
    """DATABASE's parameters as libpq reads them (None if it cannot, or without psycopg), and what it misreads."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return None, None
    try:
        params = conninfo_to_dict(database)
    except ProgrammingError as e:
        return None, "libpq cannot read it: " + QUOTED.sub('"…"', str(e).strip())
    # libpq ends a URL's user info at its first @, or finds none before a /: a password holding
    # either is misread, and some of it lands in the host, port or database name.
    if any("@" in params.get(key, "") for key in ("host", "port", "dbname")):
        return params, "libpq misreads its user info (write an @, / or ? of the password as %40, %2F or %3F)"
    return params, None


def shown_database(value):
    """DATABASE as messages show it: read as libpq reads it, without its passwords."""
    if not isinstance(value, str) or not OTHER_FORMS.match(value):
        return value  # a file's path
    params, misread = libpq_read(value)
    if params is None or misread:
        password = re.compile(r"(?<=://)([^/@:]*):.*@|(?<=password=)[^&\s]*", re.I | re.S)
        value = password.sub(lambda m: f"{m[1]}:***@" if m[1] is not None else "***", value)
        # What libpq cannot read may hold a password in its query too.
        return value.partition("?")[0] if is_postgres_url(value) else value
    if not is_postgres_url(value):
        return " ".join(f"{key}={'***' if 'password' in key else v}" for key, v in params.items())
    hosts, ports = params.get("host", "").split(","), params.get("port", "").split(",")
    if len(ports) != len(hosts):  # one port serves every host; a list that does not pair is refused at start
        ports = ports * len(hosts) if len(ports) == 1 else [""] * len(hosts)
    where = ",".join((f"[{h}]" if ":" in h else h) + (f":{p}" if p else "") for h, p in zip(hosts, ports))
    user = f"{params['user']}@" if params.get("user") else ""
    return f"{value.partition('://')[0]}://{user}{where}/{params.get('dbname', '')}"


def load_settings(config):
    """The settings in `config` (such as app.config), checked and normalised; ValueError naming the first bad one."""
    loaded = {}
    for name, (default, accept, what, normal) in SETTINGS.items():
        if name not in config and default is None:
            loaded[name] = None
            continue
        value = config.get(name, default)
        if not accept(value):
            if name in ("API_KEY", "METRICS_TOKEN"):  # a key is never quoted: the message goes to logs
                raise ValueError(f"{name} must be {what}; unset it to turn the key off")
            shown = "null" if value is None else repr(shown_database(value))
            raise ValueError(f"{name} must be {what}, not {shown}")
        loaded[name] = normal(value) if normal else value
    if loaded["PG_POOL_MIN_SIZE"] > loaded["PG_POOL_MAX_SIZE"]:
        raise ValueError("PG_POOL_MIN_SIZE must not be more than PG_POOL_MAX_SIZE")
    for name in ("HEALTH_PATH", "OPENAPI_PATH"):
        if loaded["METRICS"] and loaded[name] == METRICS_PATH:
            raise ValueError(f"{name} must not be {METRICS_PATH}: METRICS are served there")
    return loaded


def from_environment():
    """The settings in FLASK_* variables, read as create_app reads them and checked."""
    config = Config(os.getcwd())
    config.from_prefixed_env()
    return load_settings(config)


def unread_variables(environ):
    """A warning line for each FLASK_* that no setting or flask command reads, and each setting without FLASK_."""
    known = set(SETTINGS) | set(Flask.default_config) | {"APP", "DEBUG", "ENV_FILE", "SKIP_DOTENV", "RUN_FROM_CLI"}
    for command in flask_cli.commands.values():
        known.update(f"{command.name}_{p.name}".upper() for p in command.params if isinstance(p, click.Option))
    lines = []
    for variable in sorted(environ):
        name = variable.removeprefix("FLASK_")
        if name == variable:
            if name in SETTINGS:
                lines.append(f"{variable}: not read; did you mean FLASK_{name}?")
        elif name.partition("__")[0] not in known:  # FLASK_A__B is A's key B
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hint = f"did you mean FLASK_{close[0]}?" if close else "the README lists the settings"
            lines.append(f"{variable}: not a setting; {hint}")
    return lines
