"""Every setting of the service: its default, what it may be, and how it is read.

Settings come from the app's config (create_app reads FLASK_* into it with
Flask's own Config.from_prefixed_env); gunicorn.conf.py reads the few it
needs (ACCESS_LOG, LOG_FORMAT, METRICS) with from_environment, the same way.
"""

import difflib
import math
import os
import re

import click
from flask import Config, Flask
from flask.cli import cli as flask_cli
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates_schema

from dm_channels.channels import NIL_UUID, UUID_FORM
from dm_channels.ops import METRICS_PATH
from dm_channels.store import SYNCHRONOUS_LEVELS


class Setting(fields.Field):
    """A setting's value, accepted as it is or refused with "must be <what>".

    Nothing is coerced: FLASK_* values arrive already parsed from JSON, so
    "yes" or "2.5" in the environment is a string, not a boolean or a number.
    A secret is refused without being quoted (the message goes to logs).
    """

    def __init__(self, what, accept, *, secret=False, normal=None, shown=repr, **kwargs):
        message = f"must be {what}" + ("" if secret else ", not {input}")
        null = f"must be {what}" + ("" if secret else ", not null")  # said without an input
        if secret:  # a key: absent, it is off; present, it must be one
            message += "; unset it to turn the key off"
            null += "; unset it to turn the key off"
        super().__init__(error_messages={"invalid": message, "null": null}, **kwargs)
        self.accept = accept
        self.normal = normal
        self.shown = shown

    def _deserialize(self, value, attr, data, **kwargs):
        if not self.accept(value):
            raise self.make_error("invalid", input=self.shown(value))
        return self.normal(value) if self.normal else value


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# A URL's scheme, or libpq's key=value form: DATABASE is a path unless it is a
# postgresql:// URL, and a path that reads as another URL (sqlite:///x,
# mysql://...) or as "host=db dbname=dm" is a mistake.
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|(file|sqlite):|\s*\w+\s*=", re.I)


def _database(value):
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        return False
    value = os.fspath(value)
    return not URL_SCHEME.match(value) or value.startswith(("postgresql://", "postgres://"))


# What messages never show of DATABASE: a URL's password, before its host (up
# to the last @: more hidden rather than any shown) or as a parameter
# (postgresql://u:secret@h/db, ?password=secret, sslpassword=secret).
PASSWORD = re.compile(r"(?<=://)([^/@:]*):.*@|(?<=password=)[^&\s]*", re.I | re.S)


def shown_database(value):
    """DATABASE as messages show it: any password in a URL as ***."""
    if not isinstance(value, str):
        return value
    return PASSWORD.sub(lambda m: f"{m[1]}:***@" if m[1] is not None else "***", value)


def _whole(least):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _path_or_none(value):
    return value is None or (isinstance(value, str) and (value == "" or value.startswith("/")))


def _header_safe(key):
    # What a header can carry.
    return isinstance(key, str) and key and key.isascii() and key.isprintable() and key == key.strip()


class Settings(Schema):
    """Every setting of the service, its default, and what it may be: DEFAULTS
    is read from here, and init_app loads app.config through it. DATABASE's
    default is a file in the app's instance folder (app.database_path)."""

    class Meta:
        unknown = EXCLUDE  # app.config holds Flask's own settings too

    DATABASE = Setting(
        "a SQLite file's path (e.g. /srv/dm-channels.sqlite3) or a postgresql:// URL",
        _database, shown=lambda v: repr(shown_database(v)), required=True,
    )
    SERVER_ID = Setting(
        "a UUID", lambda v: isinstance(v, str) and bool(UUID_FORM.fullmatch(v)),
        normal=str.lower, load_default=NIL_UUID,
    )
    ALLOW_SELF_DM = Setting("true or false", lambda v: isinstance(v, bool), load_default=False)
    HEALTH_PATH = Setting(
        "a path starting with /, or null to mount none", _path_or_none,
        allow_none=True, load_default="/healthz",
    )
    OPENAPI_PATH = Setting(
        "a path starting with /, or null to mount none", _path_or_none,
        allow_none=True, load_default="/openapi.json",
    )
    # SQLite counts the wait in whole milliseconds of a C int; and a request
    # should fail long before gunicorn's worker timeout kills it.
    BUSY_TIMEOUT = Setting(
        "a number of seconds from 0 to 60", lambda v: _number(v) and 0 <= v <= 60,
        load_default=5.0,
    )
    SQLITE_SYNCHRONOUS = Setting(
        f"one of {', '.join(SYNCHRONOUS_LEVELS)}",
        lambda v: isinstance(v, str) and v.upper() in SYNCHRONOUS_LEVELS,
        normal=str.upper, load_default="FULL",
    )
    API_KEY = Setting(
        "a non-empty string of printable ASCII with no surrounding spaces"
        " (in FLASK_API_KEY, quote one that reads as JSON: '\"1234\"')",
        _header_safe, secret=True, allow_none=False, load_default=None,
    )
    # Answers of existing pairs each worker keeps (app.AnswerCache), about 600 bytes each.
    CHANNEL_CACHE_SIZE = Setting("a whole number >= 0", _whole(0), load_default=10_000)
    TRUSTED_PROXIES = Setting("a whole number >= 0", _whole(0), load_default=0)
    # Read by gunicorn.conf.py (gunicorn's access log), checked here with the rest.
    ACCESS_LOG = Setting("true or false", lambda v: isinstance(v, bool), load_default=True)
    METRICS = Setting("true or false", lambda v: isinstance(v, bool), load_default=False)
    METRICS_TOKEN = Setting(
        "a non-empty string of printable ASCII with no surrounding spaces"
        " (in FLASK_METRICS_TOKEN, quote one that reads as JSON: '\"1234\"')",
        _header_safe, secret=True, allow_none=False, load_default=None,
    )
    LOG_FORMAT = Setting(
        "text or json", lambda v: isinstance(v, str) and v.lower() in ("text", "json"),
        normal=str.lower, load_default="text",
    )
    PG_POOL_MIN_SIZE = Setting("a whole number >= 0", _whole(0), load_default=1)
    PG_POOL_MAX_SIZE = Setting("a whole number >= 1", _whole(1), load_default=4)
    PG_POOL_TIMEOUT = Setting(
        "a number of seconds", lambda v: _number(v) and v > 0, load_default=5.0
    )
    PG_CONNECT_TIMEOUT = Setting("a whole number >= 1", _whole(1), load_default=5)
    PG_TRANSACTION_POOLING = Setting(
        "true or false", lambda v: isinstance(v, bool), load_default=False
    )

    @validates_schema
    def pool_sizes_in_order(self, data, **kwargs):
        if data["PG_POOL_MIN_SIZE"] > data["PG_POOL_MAX_SIZE"]:
            raise ValidationError("must not be more than PG_POOL_MAX_SIZE", "PG_POOL_MIN_SIZE")

    @validates_schema
    def metrics_path_free(self, data, **kwargs):
        for name in ("HEALTH_PATH", "OPENAPI_PATH"):
            if data["METRICS"] and data[name] == METRICS_PATH:
                raise ValidationError(f"must not be {METRICS_PATH}: METRICS are served there", name)


settings_schema = Settings()


def load_settings(config, partial=()):
    """The settings in `config` (a mapping, such as app.config), checked and
    normalised, as a new dict; ValueError naming the first bad one."""
    try:
        return settings_schema.load(config, partial=partial)
    except ValidationError as e:
        name = next(n for n in settings_schema.fields if n in e.messages)
        raise ValueError(f"{name} {e.messages[name][0]}") from e


# Off while absent: present, a key must be one (null, "" or blanks are refused).
KEYS = ("API_KEY", "METRICS_TOKEN")

# Every setting with its default; DATABASE's is a file in the app's instance
# folder (app.database_path), and KEYS are absent by default, so these have none here.
DEFAULTS = {
    name: field.load_default
    for name, field in settings_schema.fields.items()
    if not field.required and name not in KEYS
}


def from_environment():
    """The settings in FLASK_* variables, read as create_app reads them and
    checked (DATABASE may be absent); ValueError naming the first bad one."""
    config = Config(os.getcwd())
    config.from_prefixed_env()
    return load_settings({**DEFAULTS, **config}, partial=("DATABASE",))


def flask_names():
    """What Flask reads from FLASK_* itself: its config's keys (from_prefixed_env),
    and its command line's (FLASK_APP, FLASK_DEBUG, FLASK_RUN_PORT ...)."""
    names = set(Flask.default_config) | {"APP", "DEBUG", "ENV_FILE", "SKIP_DOTENV", "RUN_FROM_CLI"}
    for command in flask_cli.commands.values():
        names.update(
            f"{command.name}_{param.name}".upper()
            for param in command.params
            if isinstance(param, click.Option)
        )
    return names


def unread_variables(environ):
    """A warning line for each variable of `environ` that looks meant for the
    service but that nothing reads: a FLASK_* that is no setting of the
    service's or Flask's (gunicorn.conf.py reads the service's), and a
    setting's name without its FLASK_ prefix. Each names the closest setting."""
    ours = set(settings_schema.fields)
    known = ours | flask_names()
    lines = []
    for variable in sorted(environ):
        name = variable.removeprefix("FLASK_")
        if name == variable:
            if name in ours:
                lines.append(f"{variable}: not read; did you mean FLASK_{name}?")
            continue
        if name.partition("__")[0] in known:  # FLASK_A__B is A's key B
            continue
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f"did you mean FLASK_{close[0]}?" if close else "the README lists the settings"
        lines.append(f"{variable}: not a setting; {hint}")
    return lines
