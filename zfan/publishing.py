"""What the sink publishes: per-topic numbering of results and dead letters, the topics' heads
(saved in the ledger, and logged for paged `heads` answers), and the results stored but not yet
handed to the results socket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from . import protocol as p
from .heads import HeadLog
from .ledger import Ledger, Stored

# Results of one topic published in one turn go out in one message, up to this many bytes of
# records: a subscriber takes frames of at least this size (its max_frame, 16 MB by default,
# must not be set lower), and a bigger result goes alone, as always.
GROUP_BYTES = 256 << 10


class Publishing:
    def __init__(
        self,
        ledger: Ledger,
        epoch: int,
        stats: Counter[str],
        published: Callable[[list[Stored]], None] = lambda _: None,
    ) -> None:
        self._ledger = ledger
        self._stats = stats
        self._published = published  # told of the results published
        self.topic_seq: dict[str, int] = ledger.topic_seqs()
        self._heads_changed: set[str] = set()
        self._head_log = HeadLog(epoch, self.topic_seq)  # what changed when, for paged heads
        # Results stored but not yet known to be published: an earlier sink's leftovers first.
        self._to_publish: list[Stored] = list(ledger.results_after(ledger.published_upto()))
        # Results of one topic go out several in a message while every subscriber synced takes
        # that (see SinkCore.subscriber_without_groups).
        self.groups = True

    def head(self, topic: str) -> int:
        """The seq of the topic's latest result (0 before the first)."""
        return self.topic_seq.get(topic, 0)

    def heads_page(self, after: int, prefixes: tuple[str, ...]) -> tuple[list[tuple[str, int]], int, bool]:
        """The heads that changed after position `after` (see HeadLog.page)."""
        return self._head_log.page(after, prefixes, self.topic_seq)

    def store_results(self, results: list[tuple[int, list[str], list[int], list[bytes]]]) -> None:
        """Batches' results, (batch_id, topics, counts, payloads) each: one per topic, each
        numbered next on its topic."""
        rows = [
            (batch_id, [(t, self._next_seq(t), c, data) for t, c, data in zip(topics, counts, payloads, strict=True)])
            for batch_id, topics, counts, payloads in results
        ]
        self._to_publish.extend(self._ledger.store_many(rows))

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
        frames = [[topic.encode(), *p.encode(msg)] for topic, msg in self._grouped(self._to_publish)]
        self._stats["published"] += len(self._to_publish)
        self._published(self._to_publish)
        # Committed with a later turn (COMMIT_WITHIN): a crash before then publishes these
        # again with the same per-topic seq, and subscribers discard what they have seen.
        self._ledger.mark_published(self._to_publish[-1].id)
        self._to_publish = []
        return frames

    def _grouped(self, results: list[Stored]) -> list[tuple[str, p.Message]]:
        """The messages that publish `results`: those of one topic together, up to GROUP_BYTES
        and MAX_GROUP each, a dead letter alone; in the order of each message's first result."""
        if not self.groups:
            return [(s.topic, self.message(s)) for s in results]
        runs: list[list[Stored]] = []
        last: dict[str, tuple[list[Stored], int]] = {}  # each topic's open run, and its bytes left
        for s in results:
            run, room = last.get(s.topic, (None, 0))
            n = len(s.payload)
            if run is not None and s.kind == 0 and run[-1].kind == 0 and len(run) < p.MAX_GROUP and n <= room:
                run.append(s)
                last[s.topic] = (run, room - n)
            else:
                runs.append([s])
                last[s.topic] = (runs[-1], GROUP_BYTES - n)
        return [(run[0].topic, self.message(run[0]) if len(run) == 1 else _publishes(run)) for run in runs]

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


def _publishes(run: list[Stored]) -> p.Publishes:
    return p.Publishes(
        run[0].topic,
        [r.seq for r in run],
        [r.batch_id for r in run],
        [r.count for r in run],
        [len(r.payload) for r in run],
        b"".join(r.payload for r in run),
    )
