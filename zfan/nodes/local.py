"""Local worker processes a sink starts and keeps running beside itself (`zfan sink --workers N`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time

from ..config import Curve, Timing
from ..config_file import child_environment
from ..errors import AppError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
APP_FAILED = 3  # what `zfan worker` exits with when its app cannot be imported or called
STARTUP = 5.0  # seconds: a worker that ends sooner than this after it was started failed to start
GIVE_UP = 3  # failed starts in a row, of every local worker at once, before the sink stops


class LocalWorkers:
    """N worker processes; one that exits is started again, no more than once a second each.
    Restarting cannot help when the app itself fails: a worker that says its app cannot be
    loaded, or every worker failing to start GIVE_UP times in a row, ends the sink with AppError."""

    def __init__(
        self, n: int, *, control: str, app: str, credit: int, timing: Timing, curve: Curve | None = None
    ) -> None:
        self._cmd = [
            sys.executable,
            "-m",
            "zfan",
            "worker",
            "--control",
            control,
            "--app",
            app,
            "--credit",
            str(credit),
            "--heartbeat",
            str(timing.heartbeat),
            "--liveness",
            str(timing.liveness),
        ]
        if curve is not None:
            # Local workers hold the sink's own keypair, which the sink lets in.
            self._cmd += ["--curve-secret", curve.secret_file, "--curve-server-key", curve.secret_file]
        self.app = app
        self.procs = [self._spawn(i) for i in range(n)]
        self._started = [time.monotonic()] * n
        self._failed = [0] * n  # failed starts in a row, per worker
        self.restarts = 0

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*self._cmd, "--name", f"local-{i + 1}", "--log-level", "warning", "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            env=child_environment(),
            # Out of the sink's process group: Ctrl-C at a terminal reaches the sink alone, which
            # drains and then stops its workers (they would otherwise stop first, and be restarted).
            start_new_session=True,
        )

    def check(self) -> None:
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            code = proc.poll()
            up = now - self._started[i]
            if code is None:
                if up >= STARTUP:
                    self._failed[i] = 0
                continue
            if up < 1.0:
                continue  # restarted at most once a second
            self._failed[i] = self._failed[i] + 1 if up < STARTUP else 0
            self._give_up_if_hopeless(i, code)
            log.warning("local worker %d exited with %s; starting it again", i + 1, code)
            self.procs[i] = self._spawn(i)
            self._started[i] = now
            self.restarts += 1

    def _give_up_if_hopeless(self, i: int, code: int) -> None:
        if code == APP_FAILED:
            raise AppError(f"local worker {i + 1} cannot load app {self.app!r} (its error is above); the sink stops")
        if all(n >= GIVE_UP for n in self._failed):
            raise AppError(
                f"every local worker running app {self.app!r} ended within {STARTUP:g} s of starting, "
                f"{GIVE_UP} times in a row (the last with exit code {code}); the sink stops"
            )

    def stop(self, timeout: float = 5.0) -> None:
        stop_processes(self.procs, timeout)


def die_with_parent(parent: int) -> None:
    """Make this process get SIGHUP when `parent` ends, even by SIGKILL: a sink's local workers
    are its own, and must not outlive it to join the next sink as extras; the sink of `zfan up`
    is that command's (Linux only; elsewhere a no-op).

    The signal comes each time a thread of the parent that is the child's parent ends (the
    child passes to the next), so it may come several times: its handler must not count
    them. SIGHUP, not SIGTERM, so that it is told apart from a person's second SIGTERM."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGHUP)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGHUP)


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
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
