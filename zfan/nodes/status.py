"""Asking a running sink over its control channel, one request and its answer: how it is doing
(query_status), and what zfan.nodes.dead asks about the dead letters."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from .. import protocol as p
from ..config import Curve, endpoints
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
    `control` may list several sinks (an active one and its standbys): each is asked, and the
    first answer wins, which only an active sink gives. Raises NoSink if none comes within
    `timeout` seconds, AuthError if a handshake is refused."""
    ctx = context or zmq.Context.instance()
    asked: list[tuple[str, Any, Any]] = []  # (endpoint, socket, handshake watch)
    try:
        for endpoint in endpoints(control, what="control endpoint"):
            sock = socket(ctx, zmq.DEALER, max_frame=max_frame)
            asked.append((endpoint, sock, secure_client(sock, curve, endpoint)))
            connect(sock, endpoint, "control endpoint")
            send(sock, p.encode(request))  # a send that cannot go ends as no answer, below
        poller = zmq.Poller()
        for _, sock, _ in asked:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while not (ready := dict(poller.poll(50))):
            for _, _, watch in asked:
                watch.check()
            if time.monotonic() > deadline:
                where = ", ".join(endpoint for endpoint, _, _ in asked)
                raise NoSink(control, f"no answer from a sink at {where} within {timeout:g} s (is it running?)")
        endpoint, sock, _ = next(entry for entry in asked if entry[1] in ready)
        frames = sock.recv_multipart()
        try:
            return p.decode(frames, allowed=answers)
        except ProtocolError as exc:
            raise ZfanError(f"the sink at {endpoint} answered something else: {exc}") from None
    finally:
        for _, sock, watch in asked:
            watch.close()
            sock.close(linger=0)


def query_partitions(
    controls: list[str], *, timeout: float = 3.0, context: Ctx | None = None, curve: Curve | None = None
) -> dict[str, Any]:
    """Every key-partitioned sink's status, asked at once: {"partitions": [{"partition": i,
    "control": its endpoint, and "status" or "error"}, ...]}. Raises the first error only when
    no sink answered."""
    answers: list[dict[str, Any]] = [{"partition": i, "control": control} for i, control in enumerate(controls)]
    errors: list[ZfanError] = []

    def ask_one(i: int, control: str) -> None:
        try:
            answers[i]["status"] = query_status(control, timeout=timeout, context=context, curve=curve)
        except ZfanError as exc:
            answers[i]["error"] = str(exc)
            errors.append(exc)

    threads = [threading.Thread(target=ask_one, args=pair, daemon=True) for pair in enumerate(controls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(errors) == len(controls):
        raise errors[0]  # as asking one sink would: NoSink, AuthError...
    return {"partitions": answers}


def query_status(
    control: str, *, timeout: float = 3.0, context: Ctx | None = None, curve: Curve | None = None
) -> dict[str, Any]:
    reply = ask(
        control, p.Status(), frozenset({p.StatusReply, p.Status}), timeout=timeout, context=context, curve=curve
    )
    if not isinstance(reply, p.StatusReply):
        raise ZfanError(f"the sink at {control} sent an empty status")
    return reply.info
