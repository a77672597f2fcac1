"""gunicorn's gthread worker, with one change: closing a connection never
blocks the worker's main loop. gunicorn.conf.py's worker_class names it.

gunicorn 26 and later close a connection they do not keep alive gracefully
(RFC 9112 section 9.6, util.close_graceful): they half-close it, then read and
drop what the client still sends until it closes too, for up to 2 s and
64 KiB, so that unread request bytes do not turn the close into a reset that
could cut the response short. But ThreadWorker does it on its main loop,
which meanwhile accepts and dispatches nothing: a client that reads its
answer and closes late (urllib's urlopen without reading the body does)
stalls every other request of that worker for up to 2 s.

Here the same linger runs on the main loop's own poller: the connection is
half-closed, and the poller reads what comes on it until the client closes or
the same limits pass. A lingering connection still counts among the worker's
connections, so worker_connections bounds them (accept pauses at it), and a
stopping worker waits for them as for the others, within graceful_timeout.
The change is ThreadWorker's own in shape (a connection class, accept making
it, the sweep beside murder_keepalived), so it can be offered upstream as it is.
"""

import errno
import selectors
import socket
import time
from functools import partial

from gunicorn import util
from gunicorn.workers import gthread

# util.close_graceful's limits.
LINGER = 2.0  # seconds
MAX_DRAIN = 65536  # bytes


class Connection(gthread.TConn):
    """gunicorn's connection, whose graceful close lingers on its worker's poller."""

    def __init__(self, worker, *args):
        super().__init__(*args)
        self.worker = worker

    def close(self, graceful=False):
        if graceful:
            self.worker.linger(self.sock)
        else:
            super().close()


class ThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each half-closed socket still draining: its deadline, oldest first.
        self.lingering = {}

    def accept(self, listener):
        """gunicorn's accept, making a Connection."""
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = Connection(self, self.cfg, client_sock, client_addr, listener.getsockname())
            self.enqueue_req(conn)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise

    def linger(self, sock):
        """util.close_graceful without waiting: half-close `sock`, and let the
        poller drain it until the client closes, or LINGER or MAX_DRAIN pass.
        Called on the main loop (finish_request), which alone touches the poller."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            util.close(sock)
            return
        sock.setblocking(False)
        self.nr_conns += 1  # finish_request has just counted it out
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
        """gunicorn's sweep of idle kept-alive connections (run every second
        or so by the main loop, and as it stops), then of lingering ones whose
        time is up (all of them when forced, as the worker exits)."""
        super().murder_keepalived(force)
        now = time.monotonic()
        for sock, deadline in list(self.lingering.items()):
            if deadline > now and not force:
                break
            self.close_lingering(sock)
