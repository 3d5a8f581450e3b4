"""The dead letters of a running sink, asked over its control channel (so CURVE applies as to
any client): list them, show one, requeue or purge them. `zfan dead` is these, at a terminal.

    for letter in dead_letters("tcp://sink:5558", topic="orders."):
        print(letter["batch_id"], letter["error"])
    requeue_dead_letters("tcp://sink:5558", every=True, topic="orders.")
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import protocol as p
from ..config import Curve, Limits
from ..errors import ConfigError
from .status import ask
from .transport import Ctx

REPLY = frozenset({p.DeadReply})


def dead_letters(
    control: str,
    *,
    topic: str = "",
    timeout: float = 3.0,
    context: Ctx | None = None,
    curve: Curve | None = None,
) -> Iterator[dict[str, Any]]:
    """Every dead-lettered batch whose topic starts with `topic`, oldest first, asked for a page at
    a time: batch_id, topic, records, attempts, producer, producer_seq, at (wall-clock seconds,
    or None), and error (its last line)."""
    after = 0
    while True:
        reply = ask(
            control, p.DeadList(topic, after, p.MAX_DEAD_PAGE), REPLY, timeout=timeout, context=context, curve=curve
        )
        assert isinstance(reply, p.DeadReply)
        page = reply.info.get("batches", [])
        yield from page
        if not reply.info.get("more") or not page:
            return
        after = page[-1]["batch_id"]


def show_dead_letter(
    control: str, batch_id: int, *, timeout: float = 3.0, context: Ctx | None = None, curve: Curve | None = None
) -> dict[str, Any] | None:
    """One dead-lettered batch, as dead_letters() gives it with `error` the whole traceback and
    `records` its records; None if the sink holds no dead letter of that id."""
    reply = ask(
        control,
        p.DeadShow(batch_id),
        REPLY,
        timeout=timeout,
        context=context,
        curve=curve,
        max_frame=Limits().max_frame,
    )
    assert isinstance(reply, p.DeadReply)
    if not reply.info.get("found"):
        return None
    info = dict(reply.info)
    del info["found"]
    info["count"] = info.pop("records")
    info["records"] = p.decode_records(reply.payload) if reply.payload else []
    return info


def requeue_dead_letters(
    control: str,
    batch_ids: list[int] | None = None,
    *,
    every: bool = False,
    topic: str = "",
    timeout: float = 10.0,
    context: Ctx | None = None,
    curve: Curve | None = None,
) -> dict[str, Any]:
    """Put dead-lettered batches back to pending (attempts from zero): `batch_ids`, or with
    `every` each one whose topic starts with `topic`. Returns {"requeued": n, "batch_ids": [...],
    "not_dead": [ids asked for that are not dead-lettered]}."""
    ids = _chosen(batch_ids, every)
    reply = ask(control, p.DeadRequeue(ids, every, topic), REPLY, timeout=timeout, context=context, curve=curve)
    assert isinstance(reply, p.DeadReply)
    return reply.info


def purge_dead_letters(
    control: str,
    batch_ids: list[int] | None = None,
    *,
    every: bool = False,
    topic: str = "",
    timeout: float = 10.0,
    context: Ctx | None = None,
    curve: Curve | None = None,
) -> dict[str, Any]:
    """Drop dead-lettered batches' records, chosen as for requeue_dead_letters(). Returns
    {"purged": n, "batch_ids": [...], "not_dead": [...]}."""
    ids = _chosen(batch_ids, every)
    reply = ask(control, p.DeadPurge(ids, every, topic), REPLY, timeout=timeout, context=context, curve=curve)
    assert isinstance(reply, p.DeadReply)
    return reply.info


def _chosen(batch_ids: list[int] | None, every: bool) -> list[int]:
    if every == bool(batch_ids):
        raise ConfigError("name the batches, or ask for every one (every=True), not both or neither")
    ids = list(batch_ids or [])
    if len(ids) > p.MAX_SEQS or any(type(b) is not int or b < 1 for b in ids):
        raise ConfigError(f"batch ids are whole numbers from 1, at most {p.MAX_SEQS:,} at once")
    return ids
