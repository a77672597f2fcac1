"""gunicorn's gthread worker, whose graceful close (util.close_graceful: half-close, drain until the
client closes) lingers on the main loop's poller instead of blocking every request of the worker."""

import selectors
import socket
import time
from functools import partial

from gunicorn import util
from gunicorn.workers import gthread

LINGER, MAX_DRAIN = 2.0, 65536  # util.close_graceful's limits: seconds, bytes


class ThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lingering = {}  # each half-closed socket still draining: its deadline, oldest first

    def enqueue_req(self, conn):
        """gunicorn's, with the connection's graceful close lingering on this worker's poller."""
        conn.close = partial(self.close_conn, conn)
        super().enqueue_req(conn)

    def close_conn(self, conn, graceful=False):
        if graceful:
            self.linger(conn.sock)
        else:
            util.close(conn.sock)

    def linger(self, sock):
        """util.close_graceful without the wait; on the main loop (finish_request), the poller's one user."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            util.close(sock)
            return
        sock.setblocking(False)
        self.nr_conns += 1  # finish_request has just counted it out; worker_connections bounds lingering too
        self.lingering[sock] = time.monotonic() + LINGER
        self.poller.register(sock, selectors.EVENT_READ, partial(self.drain, [0]))

    def drain(self, drained, sock):
        try:
            data = sock.recv(MAX_DRAIN)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        drained[0] += len(data)
        if not data or drained[0] >= MAX_DRAIN:
            self.close_lingering(sock)

    def close_lingering(self, sock):
        del self.lingering[sock]
        self.poller.unregister(sock)
        util.close(sock)
        self.nr_conns -= 1

    def murder_keepalived(self, force=False):
        """gunicorn's sweep of idle kept-alive connections, then of lingering ones past their time."""
        super().murder_keepalived(force)
        now = time.monotonic()
        for sock, deadline in list(self.lingering.items()):
            if deadline > now and not force:
                break
            self.close_lingering(sock)
