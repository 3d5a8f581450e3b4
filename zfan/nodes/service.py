"""The life of a role that runs its own I/O thread: start, ready, stop, close.

The thread creates, uses and closes the role's sockets; other threads only call stop(), which
sets a flag and writes to a wake-up pipe the loop polls (as pyzmq's ThreadAuthenticator is
stopped by a message on its pipe).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from ..errors import ZfanError
from .transport import Ctx, Wakeup

log = logging.getLogger(__name__)


class Service:
    role = "service"

    def __init__(self, context: Ctx | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._stopping = threading.Event()
        self._wakeup = Wakeup()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Lock()
        self._close_when_ended = False
        self._failed_to_start = False  # close() gave up waiting: the thread closes the pipe itself
        self._drain_until: float | None = None  # set by _drain(): the loop finishes by then
        self._drained = False  # the loop set it: it finished what it had in hand

    # --- for subclasses --------------------------------------------------------------------
    def _serve(self) -> None:
        """Open sockets, call self._ready.set(), loop until self._stopping, close sockets."""
        raise NotImplementedError

    # --- public ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Any:
        """Start the I/O thread; return once the sockets are up, or raise why they are not."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name=f"zfan-{self.role}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise ZfanError(f"{self.role} did not start within {timeout:g} s")
        if self._failed_to_start:
            self._thread.join()
            assert self._error is not None
            raise self._error
        return self

    def stop(self) -> None:
        """Ask the I/O thread to finish; returns at once (close() waits)."""
        self._stopping.set()
        self._wakeup.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the I/O thread ends; True if it has. Signals still run meanwhile."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        self.stop()
        ended = self.wait(timeout)
        with self._closing:
            if ended:
                self._wakeup.close()
            else:  # the thread may still poll the pipe: it is closed once the thread is done
                self._close_when_ended = True

    def _drain(self, timeout: float, grace: float) -> bool:
        """Ask the I/O thread to finish what it has in hand within `timeout` and end; wait for
        it (`grace` more for its own ending), close; whether it finished everything."""
        if self._thread is None:
            return True
        self._drain_until = time.monotonic() + timeout
        self._wakeup.set()
        ended = self.wait(timeout + grace)
        self.close()
        return ended and self._drained

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """Why the I/O thread ended early, if it did."""
        return self._error

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread's end must reach whoever waits on it
            if not isinstance(exc, ZfanError):
                log.exception("%s stopped by an unexpected error", self.role)
            self._error = exc
            # Why start() raises; a failure after the sockets were up is for whoever waits next.
            self._failed_to_start = not self._ready.is_set()
        finally:
            self._ended()
            self._ready.set()
            with self._closing:
                if self._close_when_ended:
                    self._wakeup.close()

    def _ended(self) -> None:
        """Called on the I/O thread as it ends, once `error` says why."""
