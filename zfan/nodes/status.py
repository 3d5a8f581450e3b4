"""Asking a running sink over its control channel, one request and its answer: how it is doing
(query_status), and what zfan.nodes.dead asks about the dead letters."""

from __future__ import annotations

import time
from typing import Any

import zmq

from .. import protocol as p
from ..config import Curve
from ..errors import NoSink, ProtocolError, ZfanError
from .security import secure_client
from .transport import Ctx, connect, send, socket


def ask(
    control: str,
    request: p.Message,
    answers: frozenset[type[p.Message]],
    *,
    timeout: float = 3.0,
    context: Ctx | None = None,
    curve: Curve | None = None,
    max_frame: int = p.MAX_HEADER_BYTES,
) -> p.Message:
    """Send `request` on a connection of its own and return the answer, one of `answers`.
    Raises NoSink if none comes within `timeout` seconds, AuthError if the handshake is refused."""
    sock = socket(context or zmq.Context.instance(), zmq.DEALER, max_frame=max_frame)
    watch = secure_client(sock, curve, control)
    try:
        connect(sock, control, "control endpoint")
        send(sock, p.encode(request))  # a send that cannot go ends as no answer, below
        deadline = time.monotonic() + timeout
        while not sock.poll(50):
            watch.check()
            if time.monotonic() > deadline:
                raise NoSink(control, f"no answer from a sink at {control} within {timeout:g} s (is it running?)")
        frames = sock.recv_multipart()
        try:
            return p.decode(frames, allowed=answers)
        except ProtocolError as exc:
            raise ZfanError(f"the sink at {control} answered something else: {exc}") from None
    finally:
        watch.close()
        sock.close(linger=0)


def query_status(
    control: str, *, timeout: float = 3.0, context: Ctx | None = None, curve: Curve | None = None
) -> dict[str, Any]:
    reply = ask(
        control, p.Status(), frozenset({p.StatusReply, p.Status}), timeout=timeout, context=context, curve=curve
    )
    if not isinstance(reply, p.StatusReply):
        raise ZfanError(f"the sink at {control} sent an empty status")
    return reply.info
