"""The service's log lines and gunicorn's, in LOG_FORMAT (text or json), each
with the id of the request it is about: configure_logging(app) for the app's,
GunicornLogger or GunicornJsonLogger (gunicorn.conf.py's logger_class) for gunicorn's.
"""

import json
import logging
from datetime import datetime, timezone

from flask import has_request_context, request
from gunicorn import glogging

from dm_channels.api import REQUEST_ID, request_id

# As gunicorn's error log writes its lines, with the request id after the level.
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] [%(request_id)s] %(message)s"
TEXT_DATES = "[%Y-%m-%d %H:%M:%S %z]"

# Fields of a record that JSON lines show when a record has them: the status
# given with a log call, and what GunicornLogger adds to access lines.
JSON_EXTRA = ("method", "client", "bytes", "duration_seconds")


class RequestLogFilter(logging.Filter):
    """Gives each record the request id and path of the request this thread
    is serving, if any; a handler's filter."""

    def filter(self, record):
        if has_request_context():
            if not hasattr(record, "request_id"):
                record.request_id = request_id()
            if not hasattr(record, "path"):
                record.path = request.path
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, pid, message,
    request_id, path, status (null when none), the extras when present, and
    exception (the traceback) when there is one."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "path": getattr(record, "path", None),
            "status": getattr(record, "status", None),
        }
        for name in JSON_EXTRA:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def log_formatter(log_format):
    """The formatter of LOG_FORMAT ("text" or "json")."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, TEXT_DATES, defaults={"request_id": "-"})


def configure_logging(app):
    """The standalone service's own log lines, in its LOG_FORMAT, with the
    request id: written where Flask's would be (the server's error stream,
    gunicorn's error log), in place of Flask's default handler."""
    from flask.logging import default_handler, wsgi_errors_stream

    logger = app.logger
    logger.removeHandler(default_handler)
    for handler in [h for h in logger.handlers if getattr(h, "_dm_channels", False)]:
        logger.removeHandler(handler)  # an earlier app's of the same name
    handler = logging.StreamHandler(wsgi_errors_stream)
    handler.setFormatter(log_formatter(app.config["LOG_FORMAT"]))
    handler.addFilter(RequestLogFilter())
    handler._dm_channels = True
    logger.addHandler(handler)


# Text access lines as gunicorn's usual ones, without the header values
# (referer, user agent, the user of Authorization), and with the request id.
ACCESS_LOG_FORMAT = '%(h)s - - %(t)s "%(r)s" %(s)s %(b)s %({dm_channels.request_id}e)s'


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, writing ACCESS_LOG_FORMAT's line itself from the few
    values it shows: gunicorn's own way first copies every header and every
    environ variable of the request into a dict, and costs several times more.
    An access_log_format of your own is written gunicorn's way."""

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != ACCESS_LOG_FORMAT:
            return super().access(resp, req, environ, request_time)
        sent = getattr(resp, "sent", None)
        self.access_log.info(
            '%s - - %s "%s %s %s" %s %s %s',
            escaped(environ.get("REMOTE_ADDR", "-")),
            self.now(),
            environ["REQUEST_METHOD"],
            escaped(environ["RAW_URI"]),
            environ["SERVER_PROTOCOL"],
            resp.status_code,
            "-" if sent is None else sent,
            escaped(environ.get(REQUEST_ID, "-")),
        )


def escaped(value):
    """A value a client wrote, for the text access line: a backslash or a
    quote in it escaped, so that the line still reads one way."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's error and access lines as JSON, one object a line, as
    JsonFormatter writes the app's own: an access line has the request's id,
    path, status, method, client address, bytes and seconds, and no header
    value."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers + self.access_log.handlers:
            handler.setFormatter(JsonFormatter())

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        status = resp.status_code
        self.access_log.info(
            "%s %s %s", environ["REQUEST_METHOD"], environ["RAW_URI"], status,
            extra={
                "request_id": environ.get(REQUEST_ID),
                "path": environ.get("PATH_INFO"),
                "status": status,
                "method": environ["REQUEST_METHOD"],
                "client": environ.get("REMOTE_ADDR"),
                "bytes": getattr(resp, "sent", None),
                "duration_seconds": request_time.total_seconds(),
            },
        )
