"""The hot path: get-or-create answered in front of Flask, from a cache of answers.

A channel never changes once it exists, so for one app the answer to a get of
an existing pair is the same bytes every time. create_app wraps the Flask
app's WSGI callable in FastPath, which answers a GET of the dm-channel route
itself when its query is exactly `userId1=<id>&userId2=<id>` (either order, ids
in UUID_FORM, two different users): from a bounded per-process cache of
answers, or else through the store, the view's own schemas and the app's JSON
provider, and then caches the answer. Every other request goes to Flask
untouched, and Flask answers it as the schemas and api.py say.

What the fast path skips cannot change the answer to such a request:

- Flask's request context and routing: the path is the route's own rule;
- the before-request guard: the API key is compared the same way, and a
  query of that form is short, ASCII, and routed;
- marshmallow's load: for that form it gives the two ids in lower case.

An error of the store is answered by the app's own error handlers, inside a
request context made for it. tests/test_fastpath.py checks that both paths
answer alike, byte for byte, and that the cache stays within its bound.
init_app does not install it: a host app's own request hooks would not run.
"""

import re
import threading

from dm_channels import api, ops, schemas
from dm_channels.store import UUID_FORM


class FastPath:
    """WSGI middleware in front of `wsgi_app`, the Flask `app`'s own callable."""

    def __init__(self, app, wsgi_app, endpoint):
        self.app = app
        self.wsgi_app = wsgi_app
        self.store = app.extensions["dm_channels"]
        self.server_id = app.config["SERVER_ID"]
        self.api_key = app.config["API_KEY"]
        view = app.view_functions[endpoint]
        self.answer = view.answer  # the view's success schema (api.endpoint)
        self.content_type = app.json.mimetype  # as Flask's JSON answers have it
        [rule] = app.url_map.iter_rules(endpoint)
        self.path = rule.rule
        # The query's two parameters, named as the view's query schema names them.
        first, second = view.query.load_fields
        uuid = f"({UUID_FORM.pattern})"
        self.query_forms = [
            re.compile(f"{a}={uuid}&{b}={uuid}") for a, b in ((first, second), (second, first))
        ]
        # Answers by pair, oldest first: the oldest goes when the cache is full.
        self.size = app.config["CHANNEL_CACHE_SIZE"]
        self.cache = {}
        self.cache_lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != self.path or environ.get("REQUEST_METHOD") != "GET":
            return self.wsgi_app(environ, start_response)
        pair = self.recognised_pair(environ)
        if pair is None:
            return self.wsgi_app(environ, start_response)
        environ[ops.ENDPOINT] = self.path  # for the metrics (ops.RequestLayer)
        body = self.cache.get(pair)
        if body is None:
            try:
                channel, created = self.store.get_or_create_dm(*pair)
            except Exception as e:
                return self.answer_error(e, environ, start_response)
            body = self.body(channel, created)
            if created:
                environ[ops.CREATED] = True
            else:
                self.keep(pair, body)
        start_response("200 OK", [
            ("Content-Type", self.content_type), ("Content-Length", str(len(body)))
        ])
        return [body]

    def recognised_pair(self, environ):
        """The pair (low, high), both in lower case, if the request is one the
        fast path answers; None otherwise."""
        if api.key_refused(self.api_key, environ.get("HTTP_X_API_KEY", "")):
            return None  # Flask answers UNAUTHORIZED
        query = environ.get("QUERY_STRING", "")
        for form in self.query_forms:
            found = form.fullmatch(query)
            if found:
                low, high = sorted((found[1].lower(), found[2].lower()))
                return (low, high) if low != high else None
        return None

    def body(self, channel, created):
        """The answer's bytes, made exactly as the view's are (api.endpoint)."""
        data = {"channel": channel, "created": created}
        answer = schemas.dump(self.answer, {"data": data}, self.server_id)
        return self.app.json.response(answer).get_data()

    def keep(self, pair, body):
        if self.size <= 0:
            return
        with self.cache_lock:
            while len(self.cache) >= self.size:
                del self.cache[next(iter(self.cache))]
            self.cache[pair] = body

    def answer_error(self, error, environ, start_response):
        # As if the view had raised it: the app's error handlers log it and
        # answer the envelope.
        with self.app.request_context(environ):
            rv = self.app.handle_user_exception(error)
            response = self.app.finalize_request(rv, from_error_handler=True)
            return response(environ, start_response)
