"""nginx in front of gunicorn, as deploy/nginx.conf.template configures it.

Real nginx (Debian's package), rendered with real envsubst and started
unprivileged with a prefix of its own on a free port, in front of a real
gunicorn. Without nginx, envsubst or openssl these tests are skipped, or fail
when DM_CHANNELS_REQUIRE_NGINX=1 (as .ci/run sets it).
"""

import http.client
import json
import re
import runpy
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from werkzeug.exceptions import default_exceptions

from dm_channels.api import handle_http_exception
from dm_channels.app import create_app
from helpers import ROOT, TEMPLATE, dm_url, free_port, http_get, new_user, program, report


@pytest.fixture
def proxied(gunicorn, nginx, db_path):
    """The deployment: nginx as the template ships, in front of 2 gunicorn workers."""
    return nginx(gunicorn(db_path, workers=2).port)


def fetch(server, path, method="GET", body=None, headers=None, tls=None):
    """Ask `server` (over TLS with the ssl context `tls`); return the
    answer's (status, headers, body)."""
    if tls is None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=tls)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        with connection.getresponse() as response:
            return response.status, response.headers, response.read()
    finally:
        connection.close()


def send_raw(server, data, source="127.0.0.1"):
    """Send `data` as it is, from `source`; return the answer as fetch does."""
    address = ("127.0.0.1", server.port)
    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        with http.client.HTTPResponse(sock) as response:
            response.begin()
            return response.status, response.headers, response.read()


def envelope(answer, status, code):
    """The error of an answer that must be the envelope with this status and code."""
    got, headers, body = answer
    assert (got, headers["Content-Type"]) == (status, "application/json"), body
    error = json.loads(body)
    assert error["success"] is False and error["error"]["code"] == code, body
    return error["error"]


DM_PATH = "/api/messaging/dm-channel"


def request_line(length):
    """A get-or-create request line of exactly `length` bytes, CRLF excluded."""
    start = dm_url(new_user(), new_user()) + "&pad="
    return f"GET {start}{'x' * (length - len(start) - len('GET  HTTP/1.1'))} HTTP/1.1".encode()


# -- the template's text -------------------------------------------------------------


def test_nginx_errors_have_the_codes_and_messages_the_app_gives_their_status(db_path):
    """Each envelope of the template's map is valid JSON with the code and
    message the app itself answers for that status, and the error_page lines
    send exactly those statuses there."""
    text = TEMPLATE.read_text()
    entries = re.findall(r"^    (\d{3}) '(.+)';$", text, re.M)
    envelopes = {int(status): json.loads(body) for status, body in entries}
    sent = set()
    for statuses in re.findall(r"^    error_page ([\d =]+) /\.dm-channels-error;$", text, re.M):
        replaced = [int(s[1:]) for s in statuses.split() if s.startswith("=")]
        sent |= set(replaced or map(int, statuses.split()))
    assert sent == set(envelopes)
    assert {400, 408, 413, 414, 429, 502, 503, 504} <= sent

    app = create_app({"TESTING": True, "DATABASE": db_path})
    with app.test_request_context():
        for status, body in envelopes.items():
            own = handle_http_exception(default_exceptions[status]()).json
            assert body["success"] is False
            assert list(body) == list(own) and list(body["error"]) == list(own["error"])
            assert body["error"]["code"] == own["error"]["code"]
            assert body["error"]["message"] == own["error"]["message"]
    app.extensions["dm_channels"].store.close()


def test_the_template_has_two_placeholders_only():
    """envsubst renders just the two the docs name: any other ${...} would
    reach nginx as it is written."""
    assert set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text())) == {"DM_LISTEN", "DM_UPSTREAM"}


def test_nginx_closes_idle_upstream_connections_before_gunicorn_does():
    upstream = re.search(r"^upstream dm_channels \{$(.*?)^\}$", TEMPLATE.read_text(), re.M | re.S)
    nginx_idle = int(re.search(r"^\s+keepalive_timeout (\d+)s;$", upstream.group(1), re.M).group(1))
    assert nginx_idle < runpy.run_path(str(ROOT / "gunicorn.conf.py"))["keepalive"]


def connections_to(port):
    """How many TCP connections to 127.0.0.1:port are established (Linux's /proc/net/tcp)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[2] == f"0100007F:{port:04X}" and row[3] == "01")


@pytest.mark.xdist_group("timing")
def test_nginx_keeps_connections_to_gunicorn_alive_and_closes_them_first(gunicorn, nginx, db_path):
    upstream = gunicorn(db_path, workers=2)
    server = nginx(upstream.port)

    for _ in range(50):
        assert fetch(server, dm_url(new_user(), new_user()))[0] == 200
    assert connections_to(upstream.port) == 1  # one request after another: one connection
    time.sleep(1.5)  # nginx's keepalive_timeout is 1 s, gunicorn's keepalive 2 s
    assert connections_to(upstream.port) == 0


# -- slow clients ----------------------------------------------------------------------


class Slowloris:
    """`count` connections that each send a request line, then one more header
    line every `interval` seconds, and never end their request."""

    def __init__(self, port, count=200, interval=1.0):
        self.connections = []
        for _ in range(count):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: slowloris\r\n")
            self.connections.append(connection)
        self.stopped = threading.Event()
        self.dripping = threading.Thread(target=self.drip, args=(interval,))
        self.dripping.start()

    def drip(self, interval):
        line = 0
        while not self.stopped.wait(interval):
            for connection in self.connections:
                try:
                    connection.sendall(b"X-Drip-%d: x\r\n" % line)
                except OSError:
                    pass  # closed by the server: see states()
            line += 1

    def stop(self):
        self.stopped.set()
        self.dripping.join()

    def states(self):
        """Stop dripping; then how many connections are "held" (open and
        unanswered), "answered" or "closed"."""
        self.stop()
        states = Counter()
        for connection in self.connections:
            connection.setblocking(False)
            try:
                data = connection.recv(1, socket.MSG_PEEK)
                states["answered" if data else "closed"] += 1
            except BlockingIOError:
                states["held"] += 1
            except OSError:
                states["closed"] += 1
        return states

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        for connection in self.connections:
            connection.close()


MEASURED = 2.0  # seconds of ordinary requests


def ordinary_requests(url, clients=4, timeout=2.0):
    """Get-or-create of new pairs by `clients` threads, one after another
    for MEASURED seconds: each answer's latency in seconds, or what went wrong."""
    deadline = time.monotonic() + MEASURED

    def client(_):
        results = []
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                status, _, _ = http_get(url + dm_url(new_user(), new_user()), timeout=timeout)
                results.append(time.monotonic() - start if status == 200 else f"status {status}")
            except OSError as e:
                results.append(f"{type(e).__name__} after {time.monotonic() - start:.1f} s")
            time.sleep(0.01)
        return results

    with ThreadPoolExecutor(clients) as pool:
        return [result for results in pool.map(client, range(clients)) for result in results]


def percentile(latencies, q):
    return latencies[int(q * (len(latencies) - 1))]


def under_slowloris(url, port, capsys, label):
    """Ordinary requests to `url` while 200 slow connections drip headers to
    `port`; reports the figures and returns (latencies, failures, states)."""
    with Slowloris(port) as attack:
        time.sleep(1.5)  # every slow connection has sent a header line more
        results = ordinary_requests(url)
        states = attack.states()
    latencies = sorted(r for r in results if isinstance(r, float))
    failures = [r for r in results if not isinstance(r, float)]
    figures = f"{label}, 200 slow connections ({dict(states)}): {len(results)} ordinary requests"
    figures += f", {len(failures)} failed{' (' + failures[0] + ')' if failures else ''}"
    figures += f"; {len(latencies) / MEASURED:.0f} answered a second"
    if latencies:
        p50, p99, top = (percentile(latencies, q) * 1000 for q in (0.5, 0.99, 1))
        figures += f", p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {top:.0f} ms"
    report(capsys, figures)
    return latencies, failures, states


@pytest.mark.xdist_group("timing")
def test_slow_clients_cannot_starve_the_service_behind_nginx(gunicorn, nginx, db_path, capsys):
    upstream = gunicorn(db_path, workers=2)
    server = nginx(upstream.port)

    latencies, failures, states = under_slowloris(server.url, server.port, capsys, "through nginx")

    assert states == {"held": 200}  # the attack lasted the whole measurement
    assert failures == []
    assert percentile(latencies, 0.99) < 1.0


@pytest.mark.xdist_group("timing")
def test_slowloris_against_gunicorn_alone_is_measured(gunicorn, db_path, capsys):
    """Reported, not asserted: the figures docs/deployment.md gives as the
    reason for nginx (gunicorn's threads wait on the slow clients)."""
    upstream = gunicorn(db_path, workers=2)

    _, _, states = under_slowloris(upstream.url, upstream.port, capsys, "gunicorn alone")

    assert states == {"held": 200}


@pytest.mark.xdist_group("timing")
def test_a_client_too_slow_with_its_header_or_body_is_disconnected(gunicorn, nginx, db_path):
    server = nginx(
        gunicorn(db_path, workers=1).port,
        changes=[
            ("client_header_timeout 10s;", "client_header_timeout 1s;"),
            ("client_body_timeout 10s;", "client_body_timeout 1s;"),
        ],
    )
    with (
        Slowloris(server.port, count=5, interval=0.2) as dripping_header,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as stalled_body,
    ):
        stalled_body.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n12345")
        time.sleep(2.5)
        # Dripping kept nothing open, and no answer (no HTML 408) was sent;
        # nor to the stalled body: reset (reset_timedout_connection).
        assert dripping_header.states() == {"closed": 5}
        with pytest.raises(ConnectionResetError):
            stalled_body.recv(1000)


# -- what nginx answers itself, what it passes on --------------------------------------


def test_nginx_answers_its_own_errors_with_the_envelope(proxied):
    def head(lines):
        return send_raw(proxied, lines + b"\r\nHost: t\r\nConnection: close\r\n\r\n")

    envelope(send_raw(proxied, b"NOT HTTP\r\n\r\n"), 400, "BAD_REQUEST")
    # The longest request line nginx reads (gunicorn's limit_request_line too)
    # reaches the app, whose own 414 names its limit on the query string; one
    # byte more is nginx's 414.
    for length, limit in [(4094, "2048 bytes"), (4095, "4094 bytes")]:
        details = envelope(head(request_line(length)), 414, "REQUEST_URI_TOO_LONG")["details"]
        assert limit in details
    envelope(
        head(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"x" * 4096), 431, "REQUEST_HEADER_FIELDS_TOO_LARGE"
    )
    envelope(fetch(proxied, "/healthz", body=b"x" * 2000), 413, "REQUEST_ENTITY_TOO_LARGE")
    envelope(fetch(proxied, "/.dm-channels-error"), 404, "NOT_FOUND")


FORWARDED_HEADERS = ["User-Agent", "X-API-KEY", "X-Request-ID", "X-Forwarded-For"]


def test_nothing_a_client_sends_through_nginx_is_answered_with_html(proxied):
    """Every byte in the query string, control characters and bytes beyond
    ASCII in each header nginx passes on, methods of any length, and what
    nginx itself refuses (TRACE, HTTP/2.0 in the request line, an unknown
    Transfer-Encoding): the answer is JSON, from nginx or the app. ("\n"
    would end the request line, an HTTP/0.9 request, answered with no header.)"""
    heads = [
        b"GET " + DM_PATH.encode() + b"?a=x" + bytes([byte]) + b"y HTTP/1.1"
        for byte in range(256)
        if byte != 0x0A
    ]
    heads += [
        b"GET /healthz HTTP/1.1\r\n" + name.encode() + b": x" + bytes([byte]) + b"y"
        for name in FORWARDED_HEADERS
        for byte in [*range(0x20), 0x7F, 0x80, 0xFF]
        if byte not in (0x0A, 0x0D)
    ]
    heads += [b"A" * length + b" " + DM_PATH.encode() + b" HTTP/1.1" for length in range(1, 25)]
    heads += [
        b"TRACE / HTTP/1.1",
        b"GET / HTTP/2.0",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip",
    ]
    html = []
    for head in heads:
        status, headers, _ = send_raw(proxied, head + b"\r\nHost: t\r\nConnection: close\r\n\r\n")
        if headers["Content-Type"] != "application/json":
            html.append((head, status))
    assert html == []


def test_the_apps_own_errors_pass_through_nginx_as_they_are(proxied):
    envelope(fetch(proxied, DM_PATH + "?userId1=x"), 400, "INVALID_USER_IDS")
    envelope(fetch(proxied, "/api/messaging/nowhere"), 404, "NOT_FOUND")
    answer = fetch(proxied, DM_PATH, method="POST", body=b"{}")
    envelope(answer, 405, "METHOD_NOT_ALLOWED")
    assert set(answer[1]["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_gunicorn_down_or_stuck_is_a_502_or_504_envelope(nginx):
    down = nginx(free_port())  # nothing listens there
    envelope(fetch(down, "/healthz"), 502, "BAD_GATEWAY")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        stuck = nginx(
            silent.getsockname()[1], changes=[("proxy_read_timeout 30s;", "proxy_read_timeout 1s;")]
        )
        envelope(fetch(stuck, "/healthz"), 504, "GATEWAY_TIMEOUT")


def test_only_the_headers_the_service_reads_reach_gunicorn(gunicorn, nginx, db_path):
    key = "key-through-nginx"
    server = nginx(gunicorn(db_path, workers=1, env={"FLASK_API_KEY": key}).port)
    # gunicorn alone refuses more than 100 header fields, with an HTML page.
    many = {f"X-Extra-{i}": "x" for i in range(300)}

    status, _, body = fetch(server, dm_url(new_user(), new_user()), headers={**many, "X-API-KEY": key})
    assert status == 200, body
    envelope(fetch(server, dm_url(new_user(), new_user()), headers=many), 401, "UNAUTHORIZED")


def test_the_rate_limit_is_off_as_shipped_and_a_429_envelope_once_on(gunicorn, nginx, db_path):
    upstream = gunicorn(db_path, workers=2).port
    limit = "# limit_req zone=dm_channels_creates burst=40 nodelay;"
    shipped = nginx(upstream)
    # A second's refill is 1 request, not 20, so that a slow machine still
    # sends more than the burst before the bucket refills.
    limited = nginx(upstream, changes=[(limit, limit[2:]), ("rate=20r/s;", "rate=1r/s;")])

    assert {fetch(shipped, dm_url(new_user(), new_user()))[0] for _ in range(60)} == {200}
    answers = [fetch(limited, dm_url(new_user(), new_user())) for _ in range(60)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:41] == [200] * 41  # the burst, and the request the rate allows
    assert 429 in statuses and set(statuses) == {200, 429}
    for answer in answers:
        if answer[0] == 429:
            envelope(answer, 429, "TOO_MANY_REQUESTS")
    assert fetch(limited, "/healthz")[0] == 200  # only get-or-create is limited


# -- request ids and metrics -----------------------------------------------------------


def test_request_ids_and_the_metrics_token_pass_through_nginx(gunicorn, nginx, db_path):
    upstream = gunicorn(
        db_path, workers=1, env={"FLASK_METRICS": "true", "FLASK_METRICS_TOKEN": '"scrape-me"'}
    )
    server = nginx(upstream.port)
    status, headers, _ = fetch(
        server, dm_url(new_user(), new_user()), headers={"X-Request-ID": "through-nginx-1"}
    )
    assert status == 200 and headers["X-Request-ID"] == "through-nginx-1"
    envelope(fetch(server, "/metrics"), 401, "UNAUTHORIZED")
    status, headers, body = fetch(server, "/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert status == 200 and b"dm_channels_requests_total" in body
    envelope(
        fetch(server, "/metrics", headers={"Authorization": "Bearer scrape\x01me"}),
        400, "BAD_REQUEST",
    )


# -- the client's address and scheme ---------------------------------------------------


@pytest.mark.parametrize(
    "trusted_proxies, logged",
    [(0, "127.0.0.1"), (1, "127.0.0.2")],
    ids=["off-logs-nginx", "one-proxy-logs-client"],
)
def test_the_access_log_shows_the_client_address_nginx_saw_only_with_the_setting(
    gunicorn, nginx, db_path, trusted_proxies, logged
):
    """nginx listens on 127.0.0.1 and the client connects from 127.0.0.2,
    sending an X-Forwarded-For of its own, which is never believed."""
    upstream = gunicorn(db_path, workers=1, env={"FLASK_TRUSTED_PROXIES": str(trusted_proxies)})
    server = nginx(upstream.port)
    user = new_user()

    status, _, _ = send_raw(
        server,
        f"GET {dm_url(user, new_user())} HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n"
        "Connection: close\r\n\r\n".encode(),
        source="127.0.0.2",
    )

    assert status == 200
    line = upstream.log_line(user)
    assert line.split()[0] == logged
    assert "203.0.113.7" not in line


def test_the_commented_tls_lines_serve_https_and_redirects_stay_on_it(
    gunicorn, nginx, db_path, tmp_path
):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            program("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", key, "-out", cert,
        ],
        check=True,
        capture_output=True,
    )
    upstream = gunicorn(db_path, workers=1, env={"FLASK_TRUSTED_PROXIES": "1"})
    server = nginx(
        upstream.port,
        changes=[  # as docs/deployment.md says
            ("    listen ${DM_LISTEN} default_server;\n", ""),
            ("# listen ${DM_LISTEN} ssl", "listen ${DM_LISTEN} ssl"),
            ("# ssl_certificate     /etc/ssl/dm-channels/fullchain.pem", "ssl_certificate cert.pem"),
            ("# ssl_certificate_key /etc/ssl/dm-channels/privkey.pem", "ssl_certificate_key key.pem"),
            ("# ssl_protocols", "ssl_protocols"),
            ("# ssl_session_cache", "ssl_session_cache"),
        ],
        files={"cert.pem": cert.read_bytes(), "key.pem": key.read_bytes()},
    )

    # A doubled slash is redirected to the plain path, a path alone: the
    # client resolves it against the https URL it asked.
    status, headers, _ = fetch(
        server, "/api//messaging/dm-channel", tls=ssl.create_default_context(cafile=cert)
    )
    assert status == 308
    assert headers["Location"] == DM_PATH
    # Plain http on the TLS port is refused with the envelope too.
    envelope(fetch(server, "/healthz"), 400, "BAD_REQUEST")
