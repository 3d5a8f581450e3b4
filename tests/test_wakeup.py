"""The wake-up pipe between a thread that hands work over and the thread that polls for it:
no hand-over may wait for the poll's timeout, however the two threads interleave."""

from __future__ import annotations

import select
import threading
import time
from collections import deque

import pytest

from zfan.nodes.transport import Wakeup

pytestmark = pytest.mark.timeout(60)


def test_every_hand_over_wakes_the_poller_however_set_and_clear_interleave():
    wakeup = Wakeup()
    items: deque[int] = deque()
    n = 200_000
    taken: list[int] = []
    stalls: list[int] = []

    def owner() -> None:
        while len(taken) < n:
            # A hand-over waits at most one poll: a second silent poll with work queued is a
            # wake-up lost (a timeout far above any scheduling delay: 1 s).
            ready, _, _ = select.select([wakeup.fileno()], [], [], 1.0)
            if not ready:
                if items:
                    stalls.append(len(taken))
                    return
                continue
            wakeup.clear()
            while items:
                taken.append(items.popleft())

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        for i in range(n):
            items.append(i)
            wakeup.set()
            if i % 16 == 0:
                time.sleep(0)  # let the owner catch up now and then, so clear() races set()
    finally:
        thread.join(30)
        wakeup.close()
    assert not stalls, f"a wake-up was lost after {stalls[0]} items: the rest waited for the poll's timeout"
    assert taken == list(range(n))
