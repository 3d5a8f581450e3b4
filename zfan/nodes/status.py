"""Asking a running sink how it is doing, over its control channel."""

from __future__ import annotations

import time
from typing import Any

import zmq

from .. import protocol as p
from ..config import Curve
from ..errors import NoSink, ProtocolError, ZfanError
from .security import secure_client
from .transport import Ctx, connect, send, socket


def query_status(
    control: str, *, timeout: float = 3.0, context: Ctx | None = None, curve: Curve | None = None
) -> dict[str, Any]:
    sock = socket(context or zmq.Context.instance(), zmq.DEALER, max_frame=p.MAX_HEADER_BYTES)
    watch = secure_client(sock, curve, control)
    try:
        connect(sock, control, "control endpoint")
        send(sock, p.encode(p.Status()))  # a send that cannot go ends as no answer, below
        deadline = time.monotonic() + timeout
        while not sock.poll(50):
            watch.check()
            if time.monotonic() > deadline:
                raise NoSink(control, f"no answer from a sink at {control} within {timeout:g} s (is it running?)")
        frames = sock.recv_multipart()
        try:
            reply = p.decode(frames, allowed=frozenset({p.StatusReply, p.Status}))
        except ProtocolError as exc:
            raise ZfanError(f"the sink at {control} answered something else: {exc}") from None
        if not isinstance(reply, p.StatusReply):
            raise ZfanError(f"the sink at {control} sent an empty status")
        return reply.info
    finally:
        watch.close()
        sock.close(linger=0)
