"""What every subcommand shares: endpoint options (with their environment variables), timing
options, exit codes, logging, signal handling, and turning a ZfanError into one line."""

from __future__ import annotations

import functools
import logging
import re
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from ..config import DEFAULT_CONTROL, DEFAULT_INTAKE, DEFAULT_RESULTS, Curve, Timing
from ..errors import AppError, AuthError, BindError, ConfigError, DeliveryTimeout, LedgerError, ZfanError
from ..nodes import security

# Exit codes, named (as dramatiq's CLI does).
RET_OK = 0
RET_ERROR = 1  # the run itself failed: records unacknowledged, lost or duplicated
RET_USAGE = 2  # a bad flag or value (click uses 2 as well)
RET_APP = 3  # --app cannot be imported or called
RET_BIND = 4  # an endpoint cannot be bound
RET_LEDGER = 5  # the ledger cannot be opened or written
RET_TIMEOUT = 6  # the sink did not answer or acknowledge in time
RET_AUTH = 7  # the encrypted handshake failed: a key refused or wrong

_CODES: list[tuple[type[ZfanError], int]] = [
    (ConfigError, RET_USAGE),
    (AppError, RET_APP),
    (BindError, RET_BIND),
    (LedgerError, RET_LEDGER),
    (DeliveryTimeout, RET_TIMEOUT),
    (AuthError, RET_AUTH),
]

ENDPOINTS = {
    "intake": ("ZFAN_INTAKE", DEFAULT_INTAKE, "the sink's intake, where producers push batches"),
    "control": ("ZFAN_CONTROL", DEFAULT_CONTROL, "the sink's control channel (acks, leases, heartbeats)"),
    "results": ("ZFAN_RESULTS", DEFAULT_RESULTS, "the sink's results, where subscribers listen"),
}


def endpoints(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add --intake / --control / --results (each also from ZFAN_<NAME>)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            env, default, text = ENDPOINTS[name]
            f = click.option(
                f"--{name}",
                envvar=env,
                default=default,
                show_default=True,
                show_envvar=True,
                metavar="ENDPOINT",
                help=f"{text}; tcp:// or ipc://",
            )(f)
        return f

    return decorate


def timing(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --heartbeat and --liveness, passed on as one Timing."""
    f = click.option(
        "--liveness",
        type=click.IntRange(min=1),
        default=Timing.liveness,
        show_default=True,
        help="missed heartbeats before a peer is declared dead",
    )(f)
    f = click.option(
        "--heartbeat",
        type=click.FloatRange(min=0.01),
        default=Timing.heartbeat,
        show_default=True,
        help="seconds between heartbeats",
    )(f)

    @functools.wraps(f)
    def wrapper(*args: Any, heartbeat: float, liveness: int, **kwargs: Any) -> Any:
        return f(*args, timing=Timing(heartbeat=heartbeat, liveness=liveness), **kwargs)

    return wrapper


def curve(*, server: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the CURVE options (a server's: --curve-secret, --allow-keys; a client's:
    --curve-secret, --curve-server-key), passed on as one `curve` (None when not given)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @click.option(
            "--curve-secret",
            envvar="ZFAN_CURVE_SECRET",
            default=None,
            metavar="FILE",
            help="this node's secret key file (from `zfan keys generate`): encrypt and authenticate",
        )
        @functools.wraps(f)
        def wrapper(*args: Any, curve_secret: str | None, curve_other: str | None, **kwargs: Any) -> Any:
            if curve_secret is None and curve_other is None:
                return f(*args, curve=None, **kwargs)
            if curve_secret is None:
                raise ConfigError(f"{other_flag} needs --curve-secret too")
            keys = Curve(secret_file=curve_secret, **{other_field: curve_other})
            security.validate(keys, server=server)
            return f(*args, curve=keys, **kwargs)

        if server:
            other_flag, other_field = "--allow-keys", "allow_keys"
            option = click.option(
                "--allow-keys",
                "curve_other",
                envvar="ZFAN_ALLOW_KEYS",
                default=None,
                metavar="FOLDER",
                help="folder of the client public keys (*.key) let in",
            )
        else:
            other_flag, other_field = "--curve-server-key", "server_key"
            option = click.option(
                "--curve-server-key",
                "curve_other",
                envvar="ZFAN_CURVE_SERVER_KEY",
                default=None,
                metavar="FILE",
                help="the sink's public key file",
            )
        return option(wrapper)

    return decorate


def role(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a subcommand as role ``name``: logging set up once, a ZfanError printed as one line
    with its exit code, and Ctrl-C / SIGTERM turned into a clean stop."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
            envvar="ZFAN_LOG_LEVEL",
            help="what to log on stderr",
        )
        @functools.wraps(f)
        def wrapper(*args: Any, log_level: str, **kwargs: Any) -> Any:
            logging.basicConfig(
                level=log_level.upper(), stream=sys.stderr, format=f"zfan {name}: %(levelname)s %(message)s"
            )
            try:
                code = f(*args, **kwargs)
            except ZfanError as exc:
                click.echo(f"zfan {name}: error: {in_flags(str(exc))}", err=True)
                code = next((c for cls, c in _CODES if isinstance(exc, cls)), RET_ERROR)
            except KeyboardInterrupt:
                code = RET_OK
            except Exception as exc:  # a bug, not a user's mistake: still one line, details on request
                logging.getLogger("zfan").debug("internal error", exc_info=True)
                click.echo(
                    f"zfan {name}: internal error: {type(exc).__name__}: {exc} "
                    "(run with --log-level debug for the traceback)",
                    err=True,
                )
                code = RET_ERROR
            sys.exit(code or RET_OK)

        return wrapper

    return decorate


def on_stop(stop: Callable[[], None]) -> None:
    """Call ``stop`` on the first SIGINT or SIGTERM; a second one ends the process at once."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# The library's errors name its arguments (`app=`, `ledger=`); a person at the terminal reads
# the flags that set them.
FLAGS = {
    "app": "--app",
    "ledger": "--ledger",
    "secret_file": "--curve-secret",
    "server_key": "--curve-server-key",
    "allow_keys": "--allow-keys",
}
_ARGUMENT = re.compile(r"\b(" + "|".join(FLAGS) + r")=")


def in_flags(message: str) -> str:
    """A library error's message with each `argument=` it names written as its flag."""

    def flag(m: re.Match[str]) -> str:
        # "app='x': ..." becomes "--app 'x': ...", and "needs allow_keys= (...)" "needs --allow-keys (...)"
        value_follows = m.end() < len(message) and message[m.end()] not in " ,.;:)"
        return FLAGS[m.group(1)] + (" " if value_follows else "")

    return _ARGUMENT.sub(flag, message)


def ready(role_name: str, **fields: Any) -> None:
    """The one readiness line a role prints on stderr once its sockets are up."""
    detail = " ".join(f"{k}={v}" for k, v in fields.items())
    click.echo(f"zfan {role_name}: ready {detail}", err=True)
