"""A node's HTTP port: Prometheus metrics, health probes, a JSON status and the sink's dashboard.

It runs on threads of its own (the standard library's ThreadingHTTPServer) and reads only what
the node's thread hands it: a snapshot, swapped whole (see Snapshots), and the health checks
the node gives it, which read nothing the node's thread writes.

    /metrics    Prometheus text format (prometheus-client)
    /healthz    200 while the node's loop turns; 503 with the reason once it does not
    /readyz     200 when the node can do its job; 503 with the reasons (JSON) when not
    /api/status the latest snapshot, as JSON
    /           the dashboard (a sink only): one static page that polls /api/status
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from ..config import split_http
from ..errors import BindError

log = logging.getLogger(__name__)

FRESH = 0.5  # seconds a snapshot is served before a fresher one is asked for
WANTED = 5.0  # seconds after a request that the node goes on refreshing its snapshot
WAIT = 1.0  # seconds a request waits for a fresh snapshot before it takes the last one
TIMEOUT = 5.0  # seconds a connection may stay silent

Check = Callable[[], "list[str]"]  # the reasons a probe fails; none when it passes


class Snapshots:
    """The node's thread builds snapshots only while someone reads them: due() says when (two
    comparisons, on every turn), put() hands one over; get() is the readers' side."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake  # turns the node's loop at once
        self._cond = threading.Condition()
        self._latest: dict[str, Any] | None = None
        self._at = -FRESH  # when the latest was built
        self._wanted = -WANTED  # when it was last asked for
        self._serving = True  # False while the node serves nothing (a standby sink): no snapshot comes

    def serving(self, on: bool) -> None:
        with self._cond:
            self._serving = on
            if not on:
                self._latest, self._at = None, -FRESH
            self._cond.notify_all()

    def due(self, now: float) -> bool:
        return now - self._wanted < WANTED and now - self._at >= FRESH

    def put(self, snapshot: dict[str, Any], now: float) -> None:
        with self._cond:
            self._latest, self._at = snapshot, now
            self._cond.notify_all()

    def get(self) -> dict[str, Any] | None:
        """A snapshot at most FRESH seconds old, or the latest if none comes within WAIT."""
        if not self._serving:
            return None
        now = time.monotonic()
        self._wanted = now
        if now - self._at < FRESH:
            return self._latest
        self._wake()
        with self._cond:
            self._cond.wait_for(lambda: self._at >= now, WAIT)
            return self._latest


class Web:
    """The HTTP port of one node. start() binds (BindError on a port in use), close() stops."""

    def __init__(
        self,
        address: str,
        *,
        registry: CollectorRegistry,
        snapshot: Callable[[], dict[str, Any] | None],
        healthy: Check,
        ready: Check,
        page: str | None = None,
    ) -> None:
        self._host, self._port = split_http(address)
        self._registry = registry
        self._snapshot = snapshot
        self._healthy = healthy
        self._ready = ready
        self._page = _page(page) if page else None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""  # host:port once bound (the port the system chose for port 0)

    def start(self) -> Web:
        handler = type("Handler", (_Handler,), {"web": self})
        server = _Server6 if ":" in self._host else ThreadingHTTPServer
        try:
            self._server = server((self._host, self._port), handler)
        except OSError as exc:
            raise BindError(f"http endpoint {self._host}:{self._port}: {exc.strerror or exc}") from None
        # close() waits for the requests being answered (each at most TIMEOUT): no thread of ours
        # outlives the node.
        self._server.daemon_threads = False
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="zfan-http", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever has
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- the handlers' side ------------------------------------------------------------------
    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path in ("/healthz", "/readyz"):
            reasons = (self._healthy if path == "/healthz" else self._ready)()
            status = HTTPStatus.SERVICE_UNAVAILABLE if reasons else HTTPStatus.OK
            body = {"ok": not reasons, "reasons": reasons}
            return status, "application/json", json.dumps(body).encode() + b"\n"
        if path == "/api/status":
            snap = self._snapshot()
            if snap is None:
                return HTTPStatus.SERVICE_UNAVAILABLE, "application/json", b'{"error": "not serving"}\n'
            return HTTPStatus.OK, "application/json", json.dumps(snap, default=str).encode()
        if path in ("/", "/index.html") and self._page is not None:
            return HTTPStatus.OK, "text/html; charset=utf-8", self._page
        return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n"


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    web: Web
    server_version = "zfan"
    timeout = TIMEOUT  # a client that sends nothing does not hold a thread for long

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        path = self.path.split("?", 1)[0]
        try:
            status, ctype, body = self.web.respond(path)
        except Exception:  # a bug here must not take the node down, nor go unseen
            log.exception("http: GET %s failed", path)
            status, ctype, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        log.debug("http: " + format, *args)


def _page(name: str) -> bytes:
    return resources.files("zfan").joinpath("web").joinpath(name).read_bytes()
