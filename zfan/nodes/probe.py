"""What listens at an endpoint, asked the way ZeroMQ peers greet each other.

libzmq drops a connection whose peer is a socket of an incompatible type (a DEALER meeting a
PULL) and reports nothing but a disconnect, or, when the peer hangs up first, a failed
handshake that looks like a refused encryption. A client that saw its handshake broken off
asks again here: it opens a plain connection, greets the peer as ZMTP 3.0 does, and reads
the peer's greeting (its mechanism) and, for a NULL peer, its READY command (its socket
type). It sends no READY itself, so no peer counts it as one of its own: the peer sees a
connection closed during the handshake, which it drops without a trace.
"""

from __future__ import annotations

import socket as pysocket
import time
from dataclasses import dataclass

from ..errors import NoSink

TIMEOUT = 1.0  # seconds a probe may take: a peer that answers at all does so in milliseconds
# A signature, version 3.0, the NULL mechanism, as-server 0, then filler: 64 bytes.
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
# The sink's socket on each of its ports, and the socket a zfan client there expects.
PORTS = {"PULL": "intake", "ROUTER": "control", "XPUB": "results"}
EXPECTED = {"intake": ("PULL",), "control": ("ROUTER",), "results": ("XPUB", "PUB")}


@dataclass(frozen=True)
class Peer:
    """What a probe learned. `listening` False: nothing accepted the connection. `zmq` False:
    something did, and did not greet as ZeroMQ. `mechanism` is NULL, CURVE, PLAIN...;
    `socket_type` (DEALER, PULL, ...) is known for NULL peers only. `known` False: no answer
    in time, so nothing can be told."""

    known: bool = True
    listening: bool = True
    zmq: bool = True
    mechanism: str = ""
    socket_type: str = ""

    def wrong_for(self, port: str) -> bool:
        """Whether this peer is certainly not a zfan sink's `port` (intake, control, results)."""
        if not (self.known and self.listening):
            return False
        if not self.zmq:
            return True
        return bool(self.socket_type) and self.socket_type not in EXPECTED[port]

    def describe(self) -> str:
        """The peer, for a person: 'a ZeroMQ PULL socket, as a zfan sink's intake port is'."""
        if not self.known:
            return "the peer did not answer in time"
        if not self.listening:
            return "nothing listens there"
        if not self.zmq:
            return "what listens there does not speak ZeroMQ"
        if not self.socket_type:
            return f"a ZeroMQ socket with {self.mechanism} security listens there"
        what = f"the peer is a ZeroMQ {self.socket_type} socket"
        port = PORTS.get(self.socket_type)
        return f"{what}, as a zfan sink's {port} port is" if port else what


def probe(endpoint: str, timeout: float = TIMEOUT) -> Peer:
    """Greet the peer at `endpoint` (tcp:// or ipc://) and say what it is. Never raises for what
    the peer does; takes at most about `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        conn = _connect(endpoint, timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        return Peer(listening=False)
    except (OSError, ValueError):
        return Peer(known=False)  # unreachable, or not in time: that says nothing of the peer
    try:
        # The signature and major version first: libzmq answers them with its whole greeting,
        # and would hang up on the rest of ours at once if our mechanisms differed.
        conn.sendall(GREETING[:11])
        greeting = _read(conn, 64, deadline)
        if not greeting:
            return Peer(known=False)  # silent, or hung up at once (a sink stopping): no telling
        if greeting[0] != 0xFF or (len(greeting) >= 10 and greeting[9] & 1 != 1):
            return Peer(zmq=False)  # an HTTP or SSH server, say: its first bytes are no ZMTP signature
        if len(greeting) < 64 or greeting[10] < 3:
            return Peer(known=False)
        mechanism = greeting[12:32].rstrip(b"\0").decode("ascii", "replace")
        if mechanism != "NULL":
            return Peer(mechanism=mechanism)
        conn.sendall(GREETING[11:])  # the rest of ours: a NULL peer then sends its READY
        return Peer(mechanism=mechanism, socket_type=_socket_type(conn, deadline))
    except OSError:
        return Peer(known=False)
    finally:
        conn.close()


def _connect(endpoint: str, timeout: float) -> pysocket.socket:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if path.startswith("@"):
            path = "\0" + path[1:]  # the abstract namespace, as libzmq spells it
        conn = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except OSError:
            conn.close()
            raise
        return conn
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    return pysocket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def _read(conn: pysocket.socket, n: int, deadline: float) -> bytes | None:
    """Up to `n` bytes: fewer if the peer hung up first; None if it said nothing in time."""
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            return data or None
        conn.settimeout(left)
        try:
            chunk = conn.recv(n - len(data))
        except TimeoutError:
            return data or None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def _socket_type(conn: pysocket.socket, deadline: float) -> str:
    """The Socket-Type property of the peer's READY command, or '' if it sent none."""
    head = _read(conn, 2, deadline)
    if head is None or len(head) < 2 or head[0] not in (0x04, 0x06):
        return ""
    size = head[1]
    if head[0] == 0x06:  # a long command: an 8-byte size, of which one byte is read already
        rest = _read(conn, 7, deadline) or b""
        if len(rest) < 7:
            return ""
        size = int.from_bytes(head[1:2] + rest, "big")
        if size > 1 << 16:
            return ""
    body = _read(conn, size, deadline) or b""
    name_len = body[0] if body else 0
    if body[1 : 1 + name_len] != b"READY":
        return ""
    i = 1 + name_len
    while i < len(body):
        key_len = body[i]
        key = body[i + 1 : i + 1 + key_len]
        i += 1 + key_len
        value_len = int.from_bytes(body[i : i + 4], "big")
        value = body[i + 4 : i + 4 + value_len]
        i += 4 + value_len
        if key.lower() == b"socket-type":
            return value.decode("ascii", "replace")
    return ""


def not_a_sink_port(endpoint: str, port: str, peer: Peer) -> NoSink:
    """The error for an endpoint whose peer is certainly no zfan sink's `port`."""
    return NoSink(endpoint, f"{endpoint}: that is not a zfan {port} port ({peer.describe()})")


def no_answer(endpoint: str, port: str, timeout: float) -> NoSink:
    """The error for an endpoint where no sink answered within `timeout` seconds, with what a
    probe finds there. For several sinks' endpoints (an active one and its standbys), no probe:
    a standby binds nothing, and only one of them need be there."""
    if "," in endpoint:
        return NoSink(
            endpoint,
            f"no zfan sink answered at any of {endpoint} within {timeout:g} s: "
            f"is one of them running, and are these their {port} ports?",
        )
    peer = probe(endpoint)
    head = f"no zfan sink answered at {endpoint} within {timeout:g} s"
    if not peer.known:
        return NoSink(endpoint, f"{head}: is the sink running, and is this its {port} port?")
    if not peer.listening:
        return NoSink(endpoint, f"{head}: nothing listens there (is the sink running, and is this its {port} port?)")
    if peer.wrong_for(port):
        return NoSink(endpoint, f"{head}: that is not a zfan {port} port ({peer.describe()})")
    return NoSink(endpoint, f"{head} ({peer.describe()}): is this the sink's {port} port?")
