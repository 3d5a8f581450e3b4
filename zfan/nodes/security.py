"""CURVE encryption and authentication for every socket that crosses a network.

The sink is the CURVE server on all three of its sockets, with a ZAP authenticator (pyzmq's)
that lets in only the public keys found in its allow folder; every other role is a client
holding its own keypair and the sink's public key. A client watches its socket's monitor so
that a refused handshake, or a peer that is no zfan sink's port, is an error a person reads,
not a silent hang.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from ..config import Curve
from ..errors import AuthError, ConfigError, NoSink
from .probe import TIMEOUT, not_a_sink_port, probe
from .transport import Ctx, Sock, plain, plain_context, socket

log = logging.getLogger(__name__)

DOMAIN = "zfan"  # the ZAP domain every zfan server socket sets and enforces
LOG_EVERY = 10.0  # seconds between two log lines about refused keys
REPEATED_FAILURES = 3  # failed handshakes in a row that are not a sink dying mid-handshake


def generate(folder: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret (secret) into folder; return their paths."""
    if not name or os.sep in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use a plain name such as 'sink' or 'node-7'")
    os.makedirs(folder, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        path = os.path.join(folder, name + suffix)
        if os.path.exists(path):
            raise ConfigError(f"{path} exists already: not overwritten (remove it, or choose another name)")
    try:
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {folder}: {exc.strerror}") from None
    return public, secret


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file."""
    public, secret = _load(path, "secret_file=")
    if secret is None:
        raise ConfigError(f"secret_file={path}: holds no secret key (give the .key_secret file)")
    return public, secret


def load_public(path: str, what: str = "server_key=") -> bytes:
    return _load(path, what)[0]


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise ConfigError(f"{what}{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what}{path}: not readable")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}{path}: not a key file made by `zfan keys generate` ({exc})") from None
    return public, secret


def check_allow_folder(folder: str) -> int:
    if not os.path.isdir(folder):
        raise ConfigError(f"allow_keys={folder}: no such folder")
    keys = [f for f in os.listdir(folder) if f.endswith(".key")]
    if not keys:
        raise ConfigError(f"allow_keys={folder}: holds no public keys (*.key); no client could connect")
    for name in keys:
        _load(os.path.join(folder, name), "allow_keys=")
    return len(keys)


def validate(curve: Curve, *, server: bool) -> None:
    """Read every key file now, so that a missing or wrong one is one clear error at start."""
    load_secret(curve.secret_file)
    if server:
        if curve.allow_keys is None:
            raise ConfigError(
                "a sink with secret_file= also needs allow_keys= (a folder of the public keys it lets in)"
            )
        check_allow_folder(curve.allow_keys)
    else:
        if curve.server_key is None:
            raise ConfigError("with secret_file=, a client also needs server_key= (the sink's public key)")
        load_public(curve.server_key)


def make_server(sock: Sock, curve: Curve) -> None:
    public, secret = load_secret(curve.secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = DOMAIN.encode()
    # Without an authenticator answering for this domain a CURVE server lets any key in:
    # enforce the domain so that it never does.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def make_client(sock: zmq.Socket[Any], curve: Curve) -> None:
    if curve.server_key is None:
        raise ConfigError("with secret_file=, a client also needs server_key= (the sink's public key)")
    public, secret = load_secret(curve.secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public(curve.server_key)


class _RefusalLog:
    """The authenticator's log, with refusals raised to warnings at most once per interval."""

    def __init__(self) -> None:
        self._last = 0.0
        self.refused = 0

    def debug(self, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        if "DENIED" in text:
            self.refused += 1
            now = time.monotonic()
            if now - self._last >= LOG_EVERY:
                self._last = now
                log.warning("refused a connection: %s (%d refused so far)", text, self.refused)

    def info(self, msg: str, *args: Any) -> None:
        self.debug(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        log.warning(msg, *args)

    error = exception = warning


class AllowList:
    """The public keys in the allow folder, plus the sink's own key (its local workers use it).
    The folder is read again whenever its key files change: checked when an unknown key knocks,
    so that a key added is let in at once, and at most once a second as messages arrive, so
    that a key removed is refused on connections it already holds."""

    RECHECK = 1.0  # seconds between two looks at the folder for messages of known keys

    def __init__(self, folder: str, own_public: bytes) -> None:
        self.folder = folder
        self._own = own_public
        # The authenticator's thread and the sink's both re-read the folder: one at a time.
        self._lock = threading.Lock()
        self._seen: tuple[tuple[str, int, int], ...] = ()
        self._keys: frozenset[bytes] = frozenset({own_public})
        self._checked = 0.0
        self._refresh()

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        try:
            with os.scandir(self.folder) as entries:
                return tuple(
                    sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.name.endswith(".key"))
                )
        except OSError:
            return self._seen  # the folder is gone for a moment: keep what was read

    def _refresh(self) -> None:
        with self._lock:
            self._reread()

    def _reread(self) -> None:
        self._checked = time.monotonic()
        seen = self._signature()
        if seen == self._seen:
            return
        try:
            keys = frozenset(zmq.auth.load_certificates(self.folder)) | {self._own}
        except Exception as exc:  # a bad file dropped in later must not stop the authenticator
            log.warning("cannot read the keys in %s (%s); keeping the keys read before", self.folder, exc)
            return
        if self._seen and keys != self._keys:
            log.info(
                "allowed keys re-read from %s: %d added, %d removed",
                self.folder,
                len(keys - self._keys),
                len(self._keys - keys),
            )
        self._seen, self._keys = seen, keys

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question for a new connection (on the authenticator's thread)."""
        if key not in self._keys:
            self._refresh()
        return key in self._keys

    def allows(self, key: str) -> bool:
        """Whether a message's key (its User-Id) is still allowed (on the sink's thread)."""
        if time.monotonic() - self._checked >= self.RECHECK:
            self._refresh()
        return key.encode() in self._keys


def start_authenticator(ctx: Ctx, curve: Curve) -> tuple[ThreadAuthenticator, AllowList]:
    if curve.allow_keys is None:
        raise ConfigError("a sink with secret_file= also needs allow_keys= (a folder of the public keys it lets in)")
    check_allow_folder(curve.allow_keys)
    public, _ = load_secret(curve.secret_file)
    auth = ThreadAuthenticator(ctx, log=_RefusalLog())
    auth.start()
    allow = AllowList(curve.allow_keys, public)
    auth.configure_curve_callback(domain=DOMAIN, credentials_provider=allow)
    return auth, allow


_REFUSED = "the sink refused this node's key (it is not in the sink's allow_keys=)"
_DISAGREE = "the sink and this node disagree on encryption (one uses CURVE, the other does not)"
_WRONG_KEY = "the encrypted handshake failed: is server_key= the sink's public key?"
_NEEDS_KEYS = "the sink requires encryption: give secret_file= and server_key="
_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
# What each kind of client socket dials.
PORTS: dict[int, str] = {int(zmq.DEALER): "control", int(zmq.PUSH): "intake", int(zmq.SUB): "results"}
CLIENT_KINDS = {"control": zmq.DEALER, "intake": zmq.PUSH, "results": zmq.SUB}


def check_handshakes(*watches: HandshakeWatch | None) -> None:
    """Raise if any of the watched sockets failed its handshake for good (see HandshakeWatch)."""
    for watch in watches:
        if watch is not None:
            watch.check()


class Handshakes:
    """What one role has seen of its handshakes, across its sockets and reconnects."""

    def __init__(self) -> None:
        self.ever_succeeded = False


def secure_client(
    sock: zmq.Socket[Any], curve: Curve | None, endpoint: str, history: Handshakes | None = None
) -> HandshakeWatch:
    """Make `sock` a CURVE client if given keys (before it connects), and watch its handshakes
    either way: a plaintext client of an encrypted sink must say so too."""
    if curve is not None:
        make_client(sock, curve)
    return HandshakeWatch(sock, endpoint, curve=curve, history=history)


class HandshakeWatch:
    """Reads a socket's monitor and turns a handshake that failed for good into an error a
    person reads: AuthError for keys and encryption, NoSink for a peer that is no zfan sink's
    port of the kind this socket dials.

    What libzmq 4.3.5 reports is not enough by itself. A peer of an incompatible socket type
    (a DEALER meeting a PULL) ends the connection with no handshake event at all, and ZeroMQ
    never dials it again; when that peer hangs up first, the client sees the same
    HANDSHAKE_FAILED_NO_DETAIL that a wrong server key or a sink dying mid-handshake gives. So
    any handshake that ends without success, other than a refused key or a mismatch of
    mechanisms, is settled by asking the endpoint what it is (zfan.nodes.probe).
    """

    def __init__(
        self, sock: zmq.Socket[Any], endpoint: str, *, curve: Curve | None = None, history: Handshakes | None = None
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.encrypted = curve is not None
        self.history = history or Handshakes()
        self.port = PORTS.get(int(sock.getsockopt(zmq.TYPE)), "control")
        # The monitor is what a loop polls, of the socket's own class (a zmq.asyncio socket's is
        # one too); its events are read without blocking through a plain view of it.
        self.monitor = sock.get_monitor_socket(
            _FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        )
        self._events = plain(self.monitor)
        self._sock = sock
        self._failures = 0  # failed handshakes since the last one that succeeded
        self._shaking = False  # a connection is up and its handshake not yet done
        self.succeeded = False  # a handshake on this socket succeeded at least once

    def check(self) -> None:
        """Raise AuthError or NoSink if the monitor reports a handshake failed for good. Never
        blocks but to ask the endpoint what it is after a failure (a second at most; two for
        an encrypted client).

        A refused key is the sink's answer, a mismatch of mechanisms or a peer of another kind
        is certain: all fatal at once. A wrong server key cannot be told from a sink dying
        mid-handshake: fatal for a role that never got in, and otherwise only when failures
        repeat with no success between.
        """
        while self._events.poll(0):
            msg = recv_monitor_message(self._events)
            event, value = zmq.Event(msg["event"]), msg["value"]
            if event == zmq.EVENT_CONNECTED:
                self._shaking = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.history.ever_succeeded = self.succeeded = True
                self._failures = 0
                self._shaking = False
            elif event & _FAILED or (event == zmq.EVENT_DISCONNECTED and self._shaking):
                self._shaking = False
                self._failed(event, value)

    def _failed(self, event: zmq.Event, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise AuthError(f"cannot connect to {self.endpoint}: {_REFUSED}")
        if "," in self.endpoint:
            # One socket dialling several sinks (results without control): which one failed is
            # not known, so nothing is probed; only failures that repeat say the keys are wrong.
            self._failures += 1
            if self.encrypted and self._failures >= REPEATED_FAILURES:
                raise AuthError(f"cannot connect to {self.endpoint}: {_WRONG_KEY}")
            return
        peer = probe(self.endpoint)
        if peer.wrong_for(self.port):
            raise not_a_sink_port(self.endpoint, self.port, peer)
        mismatch = event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        if mismatch or (peer.mechanism and (peer.mechanism == "CURVE") != self.encrypted):
            raise AuthError(f"cannot connect to {self.endpoint}: {_DISAGREE if self.encrypted else _NEEDS_KEYS}")
        if not self.encrypted or not peer.listening:
            return  # a sink that went away mid-handshake: ZeroMQ or the session dials again
        port = self._encrypted_port()
        if port == self.port:
            return  # these keys get in, from a socket of this kind: the failure was the sink's
        if port is not None:
            kind = zmq.SocketType(CLIENT_KINDS[port]).name
            raise NoSink(
                self.endpoint,
                f"{self.endpoint}: that is not a zfan {self.port} port (with these keys the peer "
                f"lets a ZeroMQ {kind} socket in, as a zfan sink's {port} port does)",
            )
        self._failures += 1
        if not self.history.ever_succeeded or self._failures >= REPEATED_FAILURES:
            raise AuthError(f"cannot connect to {self.endpoint}: {_WRONG_KEY}")

    def _encrypted_port(self) -> str | None:
        """Which zfan port an encrypted peer is, if these keys get in at all: an encrypted peer
        shows its socket type to no probe, so a socket of each client kind dials it with the
        same keys, and the one whose handshake succeeds tells (a PUSH gets in only at a PULL).
        None if none does within the probe's time: then the keys are what is wrong."""
        assert self.curve is not None
        ctx = plain_context(self._sock.context)  # the trials are polled here, not by an event loop
        trials: list[tuple[str, Sock, Sock]] = []
        try:
            for port, kind in CLIENT_KINDS.items():
                trial = socket(ctx, kind)
                monitor = trial.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                trials.append((port, trial, monitor))
                make_client(trial, self.curve)
                trial.connect(self.endpoint)
            poller = zmq.Poller()
            for _, _, monitor in trials:
                poller.register(monitor, zmq.POLLIN)
            ready = dict(poller.poll(int(TIMEOUT * 1000)))
            return next((port for port, _, monitor in trials if monitor in ready), None)
        finally:
            for _, trial, monitor in trials:
                trial.disable_monitor()
                monitor.close(linger=0)
                trial.close(linger=0)

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
