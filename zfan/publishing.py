"""What the sink publishes: per-topic numbering of results and dead letters, the topics' heads
(saved in the ledger, and logged for paged `heads` answers), and the results stored but not yet
handed to the results socket.
"""

from __future__ import annotations

from collections import Counter

from . import protocol as p
from .heads import HeadLog
from .ledger import Ledger, Stored


class Publishing:
    def __init__(self, ledger: Ledger, epoch: int, stats: Counter[str]) -> None:
        self._ledger = ledger
        self._stats = stats
        self.topic_seq: dict[str, int] = ledger.topic_seqs()
        self._heads_changed: set[str] = set()
        self._head_log = HeadLog(epoch, self.topic_seq)  # what changed when, for paged heads
        # Results stored but not yet known to be published: an earlier sink's leftovers first.
        self._to_publish: list[Stored] = list(ledger.results_after(ledger.published_upto()))

    def head(self, topic: str) -> int:
        """The seq of the topic's latest result (0 before the first)."""
        return self.topic_seq.get(topic, 0)

    def heads_page(self, after: int, prefixes: tuple[str, ...]) -> tuple[list[tuple[str, int]], int, bool]:
        """The heads that changed after position `after` (see HeadLog.page)."""
        return self._head_log.page(after, prefixes, self.topic_seq)

    def store_results(self, batch_id: int, topics: list[str], counts: list[int], payloads: list[bytes]) -> None:
        """A batch's results, one per topic, each numbered next on its topic."""
        rows = []
        for topic, count, payload in zip(topics, counts, payloads, strict=True):
            rows.append((topic, self._next_seq(topic), count, payload))
        self._to_publish.extend(self._ledger.store_results(batch_id, rows))

    def dead_letter(self, batch_id: int, error: str) -> None:
        seq = self._next_seq(p.DEAD_TOPIC)
        self._to_publish.append(self._ledger.dead_letter(batch_id, p.DEAD_TOPIC, seq, error))

    def save_heads(self) -> None:
        if self._heads_changed:
            # Kept apart from the results, so that numbering goes on after retention drops them all.
            self._ledger.save_heads({t: self.topic_seq[t] for t in self._heads_changed})
            self._heads_changed.clear()

    @property
    def waiting(self) -> bool:
        """Whether results wait to be published: the turn must commit them first."""
        return bool(self._to_publish)

    def take(self) -> list[list[bytes]]:
        """The frames (topic, then message) of the results waiting, which are marked published."""
        if not self._to_publish:
            return []
        frames = [[s.topic.encode(), *p.encode(self.message(s))] for s in self._to_publish]
        self._stats["published"] += len(self._to_publish)
        # Committed with a later turn (COMMIT_WITHIN): a crash before then publishes these
        # again with the same per-topic seq, and subscribers discard what they have seen.
        self._ledger.mark_published(self._to_publish[-1].id)
        self._to_publish = []
        return frames

    def message(self, s: Stored) -> p.Publish | p.Dead:
        """A stored result as published, or replayed."""
        if s.kind == 0:
            return p.Publish(s.topic, s.seq, s.batch_id, s.count, s.payload)
        source, _, attempts, error = self._ledger.batch_info(s.batch_id)
        return p.Dead(s.topic, s.seq, s.batch_id, attempts, error or "", source, s.payload)

    def _next_seq(self, topic: str) -> int:
        seq = self.topic_seq.get(topic, 0) + 1
        self.topic_seq[topic] = seq
        self._heads_changed.add(topic)
        self._head_log.changed(topic)
        return seq
