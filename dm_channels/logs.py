"""The service's log lines and gunicorn's, in LOG_FORMAT (text or json), with the request's id."""

import json
import logging
from datetime import datetime, timezone

from flask import has_request_context, request
from gunicorn import glogging

from dm_channels.api import REQUEST_ID, request_id

# As gunicorn's error log writes its lines, with the request id after the level.
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] [%(request_id)s] %(message)s"
TEXT_DATES = "[%Y-%m-%d %H:%M:%S %z]"

# gunicorn's usual access line without header values (referer, user agent, user), with the request id.
ACCESS_LOG_FORMAT = '%(h)s - - %(t)s "%(r)s" %(s)s %(b)s %({dm_channels.request_id}e)s'

# What GunicornJsonLogger adds to an access line, shown when present.
JSON_EXTRA = ("method", "client", "bytes", "duration_seconds")


def with_request(record):
    """A handler's filter giving `record` the id and path of the request being served, if any."""
    if has_request_context():
        vars(record).setdefault("request_id", request_id())
        vars(record).setdefault("path", request.path)
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line; request_id, path and status are null when a record has none."""

    def format(self, record):
        time = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        entry = {"time": time.replace("+00:00", "Z"), "level": record.levelname, "logger": record.name,
                 "pid": record.process, "message": record.getMessage()}
        entry.update({name: getattr(record, name, None) for name in ("request_id", "path", "status")})
        entry.update({name: getattr(record, name) for name in JSON_EXTRA if hasattr(record, name)})
        exception = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        if exception:
            entry["exception"] = exception
        return json.dumps(entry, default=str)


def configure_logging(app):
    """Write the app's log lines in its LOG_FORMAT, in place of Flask's default handler."""
    from flask.logging import default_handler, wsgi_errors_stream

    for handler in [default_handler, *(h for h in app.logger.handlers if with_request in h.filters)]:
        app.logger.removeHandler(handler)  # Flask's, and an earlier app's of the same name
    handler = logging.StreamHandler(wsgi_errors_stream)
    text = logging.Formatter(TEXT_FORMAT, TEXT_DATES, defaults={"request_id": "-"})
    handler.setFormatter(JsonFormatter() if app.config["LOG_FORMAT"] == "json" else text)
    handler.addFilter(with_request)
    app.logger.addHandler(handler)


class GunicornLogger(glogging.Logger):
    """gunicorn's text logger, writing ACCESS_LOG_FORMAT's line itself: gunicorn's way copies every header first."""

    def access(self, resp, req, environ, request_time):
        if self.cfg.access_log_format != ACCESS_LOG_FORMAT or not self.access_log_enabled:
            return super().access(resp, req, environ, request_time)
        sent = getattr(resp, "sent", None)
        self.access_log.info(
            '%s - - %s "%s %s %s" %s %s %s',
            escaped(environ.get("REMOTE_ADDR", "-")), self.now(),
            environ["REQUEST_METHOD"], escaped(environ["RAW_URI"]), environ["SERVER_PROTOCOL"],
            resp.status_code, "-" if sent is None else sent, escaped(environ.get(REQUEST_ID, "-")),
        )


def escaped(value):
    """A client's value with backslashes and quotes escaped, so the access line reads one way."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's error and access lines as JsonFormatter's; an access line has no header value."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers + self.access_log.handlers:
            handler.setFormatter(JsonFormatter())

    def access(self, resp, req, environ, request_time):
        if self.access_log_enabled:
            method, status = environ["REQUEST_METHOD"], resp.status_code
            self.access_log.info("%s %s %s", method, environ["RAW_URI"], status, extra={
                "request_id": environ.get(REQUEST_ID), "path": environ.get("PATH_INFO"), "status": status,
                "method": method, "client": environ.get("REMOTE_ADDR"), "bytes": getattr(resp, "sent", None),
                "duration_seconds": request_time.total_seconds(),
            })
