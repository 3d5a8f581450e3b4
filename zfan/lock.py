"""One sink per ledger: a lock file beside the ledger, held for the sink's whole life.

Two guards, because one is not enough everywhere:
- the OS lock (``flock``) on ``LEDGER.lock``, which the kernel drops when the process dies,
  however it dies; it is exact on one host, and on file systems that pass it on (NFSv4 does,
  some network file systems do not);
- the lock file's content: the owner's host, pid and a stamp it renews every few seconds. A
  sink that gets the OS lock still refuses a ledger whose stamp another host renewed
  recently, and a running sink that finds someone else's name in the file stops at once.
  This covers hosts sharing a file system without working locks, within the clock skew
  between them and one renewal period; it is no substitute for a file system with locks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from typing import Any

from .errors import LedgerError, LedgerFull

RENEW_EVERY = 2.0  # seconds between two stamps of the lock file
STALE_AFTER = 15.0  # a stamp older than this, from another host, is a dead sink's
STAMP_BYTES = 512  # the lock file's size while held (a host name is at most 255 bytes)


class LedgerLock:
    def __init__(self, ledger: str, *, wall: Any = time.time) -> None:
        self.ledger = ledger
        self.path = f"{ledger}.lock"
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self._wall = wall
        self._fd: int | None = None
        self._renewed = 0.0

    def acquire(self) -> None:
        """Take the ledger, or raise LedgerError naming the sink that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            folder = os.path.dirname(os.path.abspath(self.ledger))
            raise LedgerError(f"ledger {self.ledger}: folder {folder} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise LedgerFull(self.ledger) from None
            raise LedgerError(
                f"ledger {self.ledger} is not writable (cannot create {self.path}: "
                f"{exc.strerror}): choose a path you can write for ledger="
            ) from None
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise LedgerError(self._in_use(owner)) from None
        except OSError:
            locked = False  # a file system without locks: the stamp below is all there is
        owner = _read(fd)
        # With the OS lock held, a sink of this host named in the file is dead; one of another
        # host may be alive where the lock does not reach it: its recent stamp says so.
        fresh = bool(owner) and self._wall() - owner.get("stamp", 0) < STALE_AFTER
        if fresh and (owner.get("host") != self.host or not locked):
            os.close(fd)
            raise LedgerError(self._in_use(owner))
        self._fd = fd
        self._write()

    def renew(self) -> None:
        """Stamp the lock file again (every RENEW_EVERY seconds); raise LedgerError if another
        sink has taken the ledger meanwhile, so that this one stops before writing to it."""
        if self._fd is None or self._wall() - self._renewed < RENEW_EVERY:
            return
        owner = _read(self._fd)
        if owner and owner.get("token") != self.token:
            raise LedgerError(f"ledger {self.ledger} was taken over by {_who(owner)}; this sink stops")
        self._write()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no stamp left behind for a sink on another host to wait out
        except OSError:
            pass
        os.close(self._fd)  # closing drops the OS lock
        self._fd = None

    def _write(self) -> None:
        assert self._fd is not None
        self._renewed = self._wall()
        data = json.dumps({"host": self.host, "pid": os.getpid(), "token": self.token, "stamp": self._renewed}).encode()
        try:
            # Always the same size, written in place: renewing needs no new disk block, so a
            # full disk cannot stop a sink whose ledger still has room.
            os.pwrite(self._fd, data.ljust(STAMP_BYTES), 0)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise LedgerFull(self.ledger) from None
            raise LedgerError(
                f"ledger {self.ledger}: cannot write its lock file {self.path} ({exc.strerror})"
            ) from None

    def _in_use(self, owner: dict[str, Any]) -> str:
        return (
            f"ledger {self.ledger} is in use by {_who(owner)}: one sink per ledger; "
            "stop that sink first, or give this one another ledger="
        )

    def __enter__(self) -> LedgerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _who(owner: dict[str, Any]) -> str:
    if not owner.get("pid"):
        return "another sink"
    return f"the sink with pid {owner['pid']} on host {owner.get('host', '?')}"
