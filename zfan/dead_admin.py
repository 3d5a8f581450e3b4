"""The dead letters as a workflow: list them, show one (its error's traceback and its records),
requeue them once the app is fixed, or purge them. Asked over the control channel by `zfan dead`.

A requeued batch is pending again with its attempts from zero, behind the batches already
waiting, and goes through the normal path once: its results are published as any batch's are.
Its dead-letter notice on zfan.dead stays where it was in that topic's history.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import protocol as p
from .leasing import Backlog
from .ledger import DeadLetter, Ledger

log = logging.getLogger(__name__)


def summary(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter as `zfan dead list` shows it: its error cut to the last line."""
    lines = (letter.error or "").strip().splitlines()
    return {
        "batch_id": letter.batch_id,
        "topic": letter.topic,
        "records": letter.count,
        "attempts": letter.attempts,
        "producer": letter.producer,
        "producer_seq": letter.seq,
        "at": letter.at,
        "error": lines[-1][: p.MAX_SUMMARY] if lines else "",
    }


class DeadLetters:
    """The sink's answers to dead_list, dead_show, dead_requeue and dead_purge. A requeue or
    purge is committed before it is answered: what the answer says is what the ledger holds."""

    def __init__(
        self,
        ledger: Ledger,
        backlog: Backlog,
        counts: dict[str, int],
        stats: Counter[str],
        send: Callable[[bytes, p.Message], None],
    ) -> None:
        self._ledger = ledger
        self._backlog = backlog
        self._counts = counts
        self._stats = stats
        self._send = send

    def page(self, rid: bytes, msg: p.DeadList) -> None:
        limit = max(1, min(msg.limit, p.MAX_DEAD_PAGE))
        page = self._ledger.dead_page(msg.prefix, msg.after, limit + 1)
        info = {"batches": [summary(d) for d in page[:limit]], "more": len(page) > limit}
        self._send(rid, p.DeadReply(info, b""))

    def show(self, rid: bytes, msg: p.DeadShow) -> None:
        found = self._ledger.dead_letter_of(msg.batch_id)
        if found is None:
            self._send(rid, p.DeadReply({"batch_id": msg.batch_id, "found": False}, b""))
            return
        letter, payload = found
        info = {**summary(letter), "found": True, "error": (letter.error or "")[-p.MAX_ERROR :]}
        self._send(rid, p.DeadReply(info, payload))

    def requeue(self, rid: bytes, msg: p.DeadRequeue) -> None:
        ids = self._ledger.dead_ids(None if msg.every else msg.batch_ids, msg.prefix)
        batches = self._ledger.requeue(ids)
        self._ledger.commit()
        for batch in batches:
            self._backlog.append(batch)
        self._counts["dead"] -= len(batches)
        self._counts["pending"] += len(batches)
        self._stats["batches requeued"] += len(batches)
        if batches:
            log.info("%d dead-lettered batch(es) requeued", len(batches), extra={"count": len(batches)})
        self._answer(rid, "requeued", [b.batch_id for b in batches], msg.batch_ids, msg.every)

    def purge(self, rid: bytes, msg: p.DeadPurge) -> None:
        ids = self._ledger.dead_ids(None if msg.every else msg.batch_ids, msg.prefix)
        self._ledger.purge(ids)
        self._ledger.commit()
        self._counts["dead"] -= len(ids)
        self._counts["purged"] += len(ids)
        self._stats["batches purged"] += len(ids)
        if ids:
            log.info("%d dead-lettered batch(es) purged", len(ids), extra={"count": len(ids)})
        self._answer(rid, "purged", ids, msg.batch_ids, msg.every)

    def _answer(self, rid: bytes, done: str, ids: list[int], asked: list[int], every: bool) -> None:
        # Ids asked for that were not dead-lettered (never were, requeued or purged already).
        missing = [] if every else sorted(set(asked) - set(ids))
        info = {done: len(ids), "batch_ids": ids[: p.MAX_SEQS], "not_dead": missing[: p.MAX_SEQS]}
        self._send(rid, p.DeadReply(info, b""))
