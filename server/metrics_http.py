"""The /metrics HTTP server: prometheus_client's WSGI app on a threading server with bounds.

prometheus_client's own ``start_http_server`` gives every connection a thread and never times a
read out: 300 half-sent requests held 300 threads, for as long as their clients kept them open.
Here a connection that sends nothing for ``timeout_s`` is closed, and at most ``max_connections``
are served at once; one more is answered 503 and closed at once, without a thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _QuietHandler(WSGIRequestHandler):
    """No access log; a connection that times out or drops is closed without a traceback."""

    def handle(self) -> None:
        # TimeoutError included: the client sent nothing for timeout_s.
        with contextlib.suppress(OSError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (a scrape every few seconds is not news)."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64
    max_connections = 1  # set per server by ``serve_metrics``

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self.refused = 0
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            with contextlib.suppress(OSError):
                request.settimeout(0)  # never block the accepting thread on a slow client
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, max_connections: int, timeout_s: float
) -> tuple[WSGIServer, int]:
    """Starts the /metrics server in a daemon thread; returns (server, bound port). Stop it with
    ``shutdown()`` and ``server_close()``.

    Raises:
        OSError: the address cannot be bound.
    """
    # Like prometheus_client: the address family from the address, so "::" binds IPv6.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_BoundedServer):
        address_family = family

    Server.max_connections = max_connections

    class Handler(_QuietHandler):
        timeout = timeout_s  # StreamRequestHandler applies it to every read and write

    server = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), Server, Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, int(server.server_port)
