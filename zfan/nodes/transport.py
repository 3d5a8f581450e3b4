"""Thin helpers every role uses around pyzmq: binding and connecting with errors a person
can read, sending without blocking, draining a socket, and a wake-up pipe a thread can poll
next to its sockets.

The sockets of the asyncio API are made by the same helpers from a zmq.asyncio context; an
event loop waits on them, and they are read and written without blocking through plain()."""

from __future__ import annotations

import errno
import math
import os
import select
import stat
import threading
from collections.abc import Iterator
from typing import Any, TypeAlias, TypeVar

import zmq

from ..errors import BindError, ConfigError

Sock: TypeAlias = "zmq.Socket[bytes]"
Ctx: TypeAlias = "zmq.Context[zmq.Socket[bytes]]"
AnySock = TypeVar("AnySock", bound="zmq.Socket[Any]")  # a plain socket, or a zmq.asyncio one

# Messages taken from one socket per turn of a loop: enough to amortise a commit, few enough
# that one busy socket cannot starve the others.
DRAIN = 1000
# ZeroMQ's own heartbeats on every connecting socket (milliseconds). A TCP connection left
# half-open by a network cut otherwise lingers with its data stuck behind TCP's backed-off
# retransmit timer (tens of seconds): with these, a socket that hears nothing for
# HEARTBEAT_TIMEOUT drops the connection and dials again, and the sink drops a client it has
# not heard for HEARTBEAT_TTL. They do not replace zfan's own heartbeats, which also catch a
# hung process whose ZeroMQ thread still answers pings.
HEARTBEAT_IVL = 1000
HEARTBEAT_TIMEOUT = 5000
HEARTBEAT_TTL = 10_000
CONNECT_TIMEOUT = 2000  # a dial into a cut network gives up and retries, rather than wait out TCP's SYN retries
CLIENTS = frozenset({zmq.DEALER, zmq.PUSH, zmq.SUB})


def socket(
    ctx: zmq.Context[AnySock],
    kind: int,
    *,
    hwm: int | None = None,
    max_frame: int | None = None,
    stallable: bool = False,
) -> AnySock:
    """A socket with zfan's options. `stallable`: a client socket read only when its caller
    asks (the subscriber's), which may leave it unread for longer than HEARTBEAT_TIMEOUT. Such
    a socket gets TCP keepalive instead of ZeroMQ heartbeats: a full receive pipe stops its
    engine reading, the unread pongs time the connection out, and libzmq 4.3.5 then aborts
    the process (src/stream_engine_base.cpp:396) once the caller reads again."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if kind in CLIENTS:
        s.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT)
    if kind in CLIENTS and not stallable:
        s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT)
        s.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL)
    else:
        # Peers that speak no ZeroMQ heartbeats still vanish in the end.
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        s.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        s.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
    if max_frame is not None:
        s.setsockopt(zmq.MAXMSGSIZE, max_frame)
    if hwm is not None:
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
    return s


def bind(sock: Sock, endpoint: str, what: str) -> str:
    """Bind and return the address actually bound (a tcp port of * becomes a number)."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BindError(
                f"{what} {endpoint}: address already in use (is another sink running? choose another port)"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BindError(f"{what} {endpoint}: address not available on this machine") from None
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENAMETOOLONG):
            raise BindError(f"{what} {endpoint}: cannot create the socket file ({exc.strerror})") from None
        raise BindError(f"{what} {endpoint}: cannot bind ({exc.strerror})") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def remove_ipc(endpoint: str) -> None:
    """Remove the socket file of an ipc:// endpoint this process bound and has closed. libzmq
    removes it in its I/O thread, after close() returns: a process that ends soon after never
    gets that far, and leaves the file behind."""
    path = endpoint.removeprefix("ipc://")
    if path == endpoint or path.startswith("@"):  # not ipc, or Linux's abstract namespace: no file
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass  # gone already


def plain(sock: zmq.Socket[Any]) -> Sock:
    """The socket itself, or for a socket of another class (a zmq.asyncio socket, whose calls
    return futures) a plain view of it, to read and write without blocking; the view owns
    nothing and is not closed: the socket is."""
    if type(sock) is zmq.Socket:
        return sock
    return zmq.Socket.shadow(sock)


def plain_context(ctx: zmq.Context[Any]) -> Ctx:
    """The context itself, or for a context of another class (a zmq.asyncio one) a plain view of
    it, whose sockets are plain; terminating it stays the context's owner's to do."""
    if type(ctx) is zmq.Context:
        return ctx
    return zmq.Context.shadow(ctx)


def connect(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"{what} {endpoint}: cannot connect ({exc.strerror})") from None


def send(sock: Sock, frames: list[bytes]) -> bool:
    """Send without blocking; False if the socket takes nothing now. A DEALER blocks for good
    once it has no connection to queue on (libzmq drops one whose peer is of an incompatible
    kind, and never dials it again), and any socket blocks at its high-water mark: neither may
    stop a role's loop, whose session notices the silence and dials again."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def drain(sock: Sock, limit: int = DRAIN) -> Iterator[list[bytes]]:
    """Every message ready on the socket, up to ``limit``, without blocking."""
    for _ in range(limit):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def drain_keyed(sock: Sock, keyed: bool, limit: int = DRAIN) -> Iterator[tuple[list[bytes], str | None]]:
    """Like drain(), with the CURVE key each message came with (ZAP's User-Id) when `keyed`."""
    if not keyed:
        for frames in drain(sock, limit):
            yield frames, None
        return
    for _ in range(limit):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        key = parts[-1].get("User-Id")
        yield [f.bytes for f in parts], key if isinstance(key, str) else None


class Poll:
    """A poller kept while the sockets it watches stay the same: making one each turn costs more
    than the poll itself when messages are small and many."""

    def __init__(self) -> None:
        self._watched: list[tuple[Sock | int, int]] = []
        self._poller = zmq.Poller()

    def __call__(self, watched: list[tuple[Sock | int, int]], seconds: float) -> dict[Any, int]:
        """Wait up to `seconds` for one of (socket or fd, POLLIN/POLLOUT); what is ready."""
        if watched != self._watched:
            self._poller = zmq.Poller()
            for sock, flags in watched:
                self._poller.register(sock, flags)
            self._watched = watched
        return dict(self._poller.poll(math.ceil(max(0.0, seconds) * 1000)))


class Wakeup:
    """A self-pipe: another thread calls set(); the owner polls fileno() and calls clear(),
    then looks at what it was woken for. Once closed, set() does nothing: a descriptor number
    reused by another file is never written."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False
        # A wake-up written and not yet cleared: more set() calls meanwhile write nothing, since
        # the owner looks at everything after its clear(). Reset only once clear() has read the
        # pipe: reset before, a set() racing it could write a byte that read takes away, leaving
        # the flag up over an empty pipe and every later set() silent.
        self._pending = False

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        if self._pending:
            return
        with self._lock:
            if self._closed:
                return
            self._pending = True
            try:
                os.write(self._w, b"x")
            except BlockingIOError:
                pass  # already full of wake-ups

    def wait(self, timeout: float) -> None:
        """Block until set() or `timeout` seconds passed, then clear: for a loop with no socket to poll."""
        select.select([self._r], [], [], timeout)
        self.clear()

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._pending = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._r)
            os.close(self._w)
