"""The sink's answers to subscribers about what was published: replays of the results a
subscriber missed, the topics' heads in pages, and durable cursors (read and committed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from . import protocol as p
from .ledger import Ledger
from .publishing import Publishing


class History:
    def __init__(
        self,
        ledger: Ledger,
        publishing: Publishing,
        stats: Counter[str],
        send: Callable[[bytes, p.Message], None],
    ) -> None:
        self._ledger = ledger
        self._publishing = publishing
        self._stats = stats
        self._send = send

    def replay(self, rid: bytes, msg: p.Replay) -> None:
        topic = msg.topic
        first, last = max(msg.first, 1), min(msg.last, self._publishing.head(topic))
        if first > last:
            return  # nothing published there yet
        rows = self._ledger.results_range(topic, first, last, p.MAX_REPLAY)
        if not rows or rows[0].seq > first:
            gap_end = rows[0].seq - 1 if rows else last
            self._send(rid, p.Missing(topic, first, gap_end, "no longer retained by the sink"))
            self._stats["replays refused"] += 1
        for stored in rows:
            self._send(rid, self._publishing.message(stored))
        if rows:
            self._stats["results replayed"] += len(rows)

    def heads(self, rid: bytes, msg: p.Heads) -> None:
        heads, upto, more = self._publishing.heads_page(msg.after, tuple(msg.prefixes))
        self._send(rid, p.Topics(msg.after, [t for t, _ in heads], [s for _, s in heads], upto, more))

    def get_cursor(self, rid: bytes, msg: p.GetCursor) -> None:
        name, after_topic = msg.name, msg.after_topic
        # One row beyond a page tells whether another page follows.
        rows = self._ledger.cursor_page(name, after_topic, p.MAX_TOPICS + 1)
        page = rows[: p.pairs_that_fit(rows)]
        self._send(rid, p.Cursor(name, after_topic, [t for t, _ in page], [s for _, s in page], len(page) < len(rows)))

    def commit(self, rid: bytes, msg: p.Commit) -> None:
        positions: dict[str, int] = {}
        for topic, seq in zip(msg.topics, msg.seqs, strict=True):
            positions[topic] = max(seq, positions.get(topic, 0))
        self._ledger.save_cursor(msg.name, positions)
