from __future__ import annotations

import gc
import shutil
import sys
import threading

import pytest
import zmq

from tests import ledgers
from tests.helpers import Role, free_ports
from zfan import Sink
from zfan.config import Curve
from zfan.ledger import SqliteLedger
from zfan.nodes.security import generate

ANY = "tcp://127.0.0.1:*"  # a free port, which the sink binds and reports


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _leaks_found_where_made():
    """From Python 3.13 an SQLite connection left open warns (an error here) when the garbage
    collector frees it, which may be during a later test or at the end of the run. Collecting
    after each test makes the test that left it open the one that fails."""
    yield
    if sys.version_info >= (3, 13):
        gc.collect()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """Each ledger backend in turn (PostgreSQL in a schema of the test's own; skipped without a
    server, see tests/ledgers.py)."""
    with ledgers.backend(request.param, str(tmp_path)) as chosen:
        yield chosen


@pytest.fixture
def ledger(tmp_path):
    led = SqliteLedger(str(tmp_path / "ledger.db"))
    yield led
    led.close()


@pytest.fixture
def sink(tmp_path, ctx):
    """A sink of the test's own on free loopback ports (a module may have a sink fixture of its own)."""
    with Sink(intake=ANY, control=ANY, results=ANY, ledger=str(tmp_path / "z.db"), context=ctx) as s:
        yield s


@pytest.fixture
def free_port():
    """A tcp port nothing listens on (free a moment ago: nothing here binds ports)."""
    return f"tcp://127.0.0.1:{free_ports(1)[0]}"


@pytest.fixture
def keys(tmp_path):
    """A sink's keypair and a node's, the node's let in (test_curve.py has keys of its own)."""
    folder, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("sink", "node"):
        generate(str(folder), name)
    shutil.copy(folder / "node.key", allowed)
    server = Curve(secret_file=str(folder / "sink.key_secret"), allow_keys=str(allowed))
    client = Curve(secret_file=str(folder / "node.key_secret"), server_key=str(folder / "sink.key"))
    return server, client


@pytest.fixture
def ctx():
    """A context of the test's own: every socket is closed with linger 0, and term() must not
    hang, which is how a leaked socket shows."""
    context = zmq.Context()
    yield context
    done = threading.Event()

    def term() -> None:
        context.term()
        done.set()

    t = threading.Thread(target=term, daemon=True)
    t.start()
    if not done.wait(10):
        pytest.fail("zmq context did not terminate within 10 s: a socket was left open")


@pytest.fixture
def ipc(tmp_path):
    """Endpoints of a sink of the test's own, on ipc:// in the test's temporary folder."""
    return {name: f"ipc://{tmp_path}/{name}" for name in ("intake", "control", "results")}


@pytest.fixture
def roles():
    """Start `zfan` subprocesses with roles(...); every one is stopped and reaped at teardown."""
    started: list[Role] = []

    def start(*args: str, **kw) -> Role:
        r = Role(*args, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.proc.poll() is None:
            try:
                r.stop(timeout=10)  # a clean stop first: a sink stops its own workers
            except AssertionError:
                pass
        r.kill()
