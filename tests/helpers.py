"""What the tests share: waiting on a condition, and real role processes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.peers.parties import free_ports  # noqa: F401  (for the tests: one copy)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ")  # how every log line begins


def logged(line: str, text: str) -> bool:
    """Whether `line` is a log line (a timestamp first) whose text begins with `text`."""
    m = STAMP.match(line)
    return m is not None and line[m.end() :].startswith(text)


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail the test if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        threading.Event().wait(interval)


class Role:
    """A `zfan ...` subprocess: started, waited on for its readiness line, stopped and reaped.

    stderr is read by a thread so the process never blocks on a full pipe; stdout is either
    captured the same way or left to a file the test names.
    """

    def __init__(
        self,
        *args: str,
        stdin: Any = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.args = args
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # A process group of its own, so that kill() also reaches whatever it started.
        # `prefix` runs it through another command first (`ip netns exec NS`, which execs it).
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "zfan", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=cwd or ROOT,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(s, buf), daemon=True)
            for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: Any, buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    def wait_ready(self, timeout: float = 15.0) -> str:
        def line() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"zfan {' '.join(self.args)} exited {self.proc.returncode}:\n{self.stderr}")
            return next((x for x in self.err if ": ready " in x), None)

        return wait_for(line, timeout, what=f"zfan {self.args[0]} to be ready")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"zfan {' '.join(self.args)} still running after {timeout} s:\n{self.stderr}"
            ) from None
        self._close()
        return code

    def _close(self) -> None:
        for t in self._threads:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process and everything in its group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._close()


def run_cli(
    *args: str,
    timeout: float = 30.0,
    input: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `zfan ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "zfan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


class Terminal:
    """`zfan ARGS` on a pseudo-terminal of its own, as the session's foreground process: Ctrl-C
    typed there reaches it (and only what is in its process group), and its output is read
    back as a person would see it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: str = ROOT) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        # setsid --ctty: a new session whose controlling terminal is this one (the pid stays zfan's).
        self.proc = subprocess.Popen(
            ["setsid", "--ctty", sys.executable, "-m", "zfan", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        os.close(slave)
        self._raw = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every process holding the terminal has ended
                return
            if not data:
                return
            with self._lock:
                self._raw += data

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def ctrl_c(self) -> None:
        self.type("\x03")

    @property
    def raw(self) -> str:
        with self._lock:
            return self._raw.decode(errors="replace")

    def screen(self) -> list[str]:
        return render(self.raw)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n" + "\n".join(self.screen())) from None
        self._reader.join(5)
        return code

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        os.close(self.master)


def render(raw: str) -> list[str]:
    """The lines as a terminal shows them: a carriage return goes back to the line's start and
    what follows overwrites it (how a progress bar redraws itself)."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        col = 0
        for ch in line:
            if ch == "\r":
                col = 0
                continue
            if col < len(cells):
                cells[col] = ch
            else:
                cells.append(ch)
            col += 1
        lines.append("".join(cells).rstrip())
    return lines


class Feed:
    """Writes JSON-lines records ({"id": i}, or `record(i)`) to a producer's stdin at a steady
    pace, from a thread."""

    def __init__(
        self, proc: subprocess.Popen[str], rate: int, record: Callable[[int], Any] = lambda i: {"id": i}
    ) -> None:
        self.proc, self.rate, self.record = proc, rate, record
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while not self.stop.is_set():
                chunk = "".join(
                    json.dumps(self.record(i)) + "\n" for i in range(self.sent, self.sent + self.rate // 20)
                )
                stdin.write(chunk)
                stdin.flush()
                self.sent += self.rate // 20
                self.stop.wait(0.05)  # load shaping: a steady stream, not a wait
        except BrokenPipeError:
            pass  # the producer is gone (a test that failed killed it): its exit code says why
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(30)
        return self.sent
