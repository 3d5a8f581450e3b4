"""Local worker processes a sink starts and keeps running beside itself (`zfan sink --workers N`)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from ..config import Timing

log = logging.getLogger(__name__)


class LocalWorkers:
    """N worker processes; one that exits is started again, no more than once a second each."""

    def __init__(self, n: int, *, control: str, app: str, credit: int, timing: Timing) -> None:
        self._cmd = [sys.executable, "-m", "zfan", "worker", "--control", control, "--app", app,
                     "--credit", str(credit), "--heartbeat", str(timing.heartbeat),
                     "--liveness", str(timing.liveness)]
        self.procs = [self._spawn(i) for i in range(n)]
        self._started = [time.monotonic()] * n
        self.restarts = 0

    def _spawn(self, i: int) -> subprocess.Popen:
        return subprocess.Popen([*self._cmd, "--name", f"local-{i + 1}", "--log-level", "warning"],
                                stdin=subprocess.DEVNULL)

    def check(self) -> None:
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None and now - self._started[i] >= 1.0:
                log.warning("local worker %d exited with %s; starting it again", i + 1, proc.returncode)
                self.procs[i] = self._spawn(i)
                self._started[i] = now
                self.restarts += 1

    def stop(self, timeout: float = 5.0) -> None:
        stop_processes(self.procs, timeout)


def stop_processes(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGTERM each, wait, then SIGKILL whatever is left; every process is reaped."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
