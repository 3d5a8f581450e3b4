"""What every subcommand shares: endpoint options (with their environment variables), timing
options, exit codes, logging, signal handling, and turning a ZfanError into one line."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import click

from .. import config_file
from ..config import DEFAULT_CONTROL, DEFAULT_INTAKE, DEFAULT_RESULTS, Curve, Timing
from ..errors import (
    AppError,
    AuthError,
    BindError,
    ConfigError,
    DeliveryTimeout,
    LedgerError,
    NoSink,
    OutcomeTimeout,
    ZfanError,
)
from ..nodes import security
from . import logs
from .show import release_stdout, say

# Exit codes, named (as dramatiq's CLI does).
RET_OK = 0
RET_ERROR = 1  # the run itself failed: records unacknowledged, lost or duplicated
RET_USAGE = 2  # a bad flag or value (click uses 2 as well)
RET_APP = 3  # --app cannot be imported or called
RET_BIND = 4  # an endpoint cannot be bound
RET_LEDGER = 5  # the ledger cannot be opened or written
RET_TIMEOUT = 6  # the sink did not answer, acknowledge or process in time
RET_AUTH = 7  # the encrypted handshake failed: a key refused or wrong
RET_DEAD = 8  # zfan produce: a batch was dead-lettered (or its outcome is unknown)
# Stopped by a signal before the command's work was complete: 128 + the signal's number, as a
# shell reports it (130 for SIGINT, Ctrl-C; 143 for SIGTERM). A command whose work was complete
# when the signal came (a worker or sink that drained) exits 0.
RET_SIGNAL = 128

_CODES: list[tuple[type[ZfanError], int]] = [
    (ConfigError, RET_USAGE),
    (AppError, RET_APP),
    (BindError, RET_BIND),
    (LedgerError, RET_LEDGER),
    (DeliveryTimeout, RET_TIMEOUT),
    (OutcomeTimeout, RET_TIMEOUT),
    (NoSink, RET_TIMEOUT),
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


SINKS_HELP = (
    "key-partitioned sinks, in place of the endpoints above: each a HOST (ports 5557-5559), HOST:PORT "
    "(intake PORT, control and results the next two), tcp://HOST:PORT or ipc:///FOLDER, separated by "
    "commas; a sink's standbys after | (a|a2,b|b2). Every role names the same sinks in the same order"
)


def sinks_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --sinks (also ZFAN_SINKS, or `sinks` at the top of the settings file)."""
    return click.option("--sinks", default=None, metavar="SINKS", help=SINKS_HELP)(f)


def connect_timeout(default: float | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add --connect-timeout: how long a client waits for a first welcome before it says that no
    sink answers (and exits 6)."""
    shown = "none: wait for a sink" if default is None else f"{default:g}"
    return click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0.1),
        default=default,
        envvar="ZFAN_CONNECT_TIMEOUT",
        show_envvar=True,
        help=f"seconds to wait for a sink's first answer before giving up [default: {shown}]",
    )


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


LOG_OPTIONS = (
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        envvar="ZFAN_LOG_LEVEL",
        help="what to log",
    ),
    click.option(
        "--log-format",
        type=click.Choice(logs.FORMATS),
        default="text",
        show_default=True,
        envvar=logs.FORMAT_ENV,
        help="text lines with a timestamp, or JSON lines (time, level, role, message, fields)",
    ),
    click.option(
        "--log-file",
        default=None,
        metavar="PATH",
        envvar=logs.FILE_ENV,
        help="append the log there instead of writing it on stderr",
    ),
)


def role(name: str, *, logged: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a subcommand as role ``name``: its settings file read, logging set up once (unless
    not `logged`), a ZfanError printed as one line with its exit code, SIGINT and SIGTERM
    handled (see Signals), and a closed stdout not turned into a traceback."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            global _signals
            _signals = Signals(name)
            _signals.install()
            if logged:
                log_level, log_format, log_file = (kwargs.pop(k) for k in ("log_level", "log_format", "log_file"))
                try:
                    logs.setup(name, log_level, log_format, log_file)
                except OSError as exc:
                    click.echo(f"zfan {name}: error: --log-file {log_file}: {exc.strerror or exc}", err=True)
                    sys.exit(RET_USAGE)
            try:
                code = f(*args, **kwargs)
            except ZfanError as exc:
                click.echo(f"zfan {name}: error: {in_flags(str(exc))}", err=True)
                code = next((c for cls, c in _CODES if isinstance(exc, cls)), RET_ERROR)
            except Interrupted as exc:  # stopped before anything was under way: nothing to say
                code = RET_SIGNAL + exc.signum
            except Exception as exc:  # a bug, not a user's mistake: still one line, details on request
                logging.getLogger("zfan").debug("internal error", exc_info=True)
                click.echo(
                    f"zfan {name}: internal error: {type(exc).__name__}: {exc} "
                    "(run with --log-level debug for the traceback)",
                    err=True,
                )
                code = RET_ERROR
            release_stdout()
            sys.exit(code or RET_OK)

        command = wrapper
        for option in reversed(LOG_OPTIONS if logged else ()):
            command = option(command)
        return click.option(
            "--config",
            default=None,
            metavar="PATH",
            envvar=config_file.ENV,
            is_eager=True,  # read before the options whose defaults it sets
            expose_value=False,
            callback=_with_config(name),
            help="settings file [default: ./zfan.toml, or [tool.zfan] in ./pyproject.toml]",
        )(command)

    return decorate


class FileError(click.ClickException):
    """A configuration file that cannot be used: one line, as every other error, and exit 2."""

    exit_code = RET_USAGE

    def __init__(self, role_name: str, message: str) -> None:
        super().__init__(message)
        self.role = role_name

    def show(self, file: Any = None) -> None:
        click.echo(f"zfan {self.role}: error: {self.message}", err=True)


# Options read neither from a file nor from ZFAN_<OPTION>: the file's own, and those only a
# person or the process that starts a role gives. An environment variable left set would turn
# every later `zfan worker` into a check, or let a `zfan dead purge` go without its question.
NOT_CONFIGURED = frozenset({"config", "help", "version", "check", "yes", "all"})


def configurable(command: click.Command) -> dict[str, str]:
    """A command's options that a file or ZFAN_<OPTION> may set: key (the long flag,
    underscored) -> parameter name."""
    keys: dict[str, str] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.name is None:
            continue
        key = max(param.opts, key=len).lstrip("-").replace("-", "_")
        if key not in NOT_CONFIGURED:
            keys[key] = param.name
    return keys


def every_command(group: click.Group) -> dict[str, dict[str, str]]:
    """Each role command (a direct subcommand of `group`) and its configurable options."""
    return {
        name: configurable(command) for name, command in group.commands.items() if not isinstance(command, click.Group)
    }


# What a command inside a group (zfan dead list, zfan keys generate) reads from the top of a
# settings file or from ZFAN_<OPTION>: where the sink is, the keys, the log. Not `topic`, `json`
# or `timeout`, which the top of a file or the environment set for the role commands.
FOR_EVERY_COMMAND = frozenset(
    {"intake", "control", "results", "curve_secret", "curve_server_key", "log_level", "log_format", "log_file"}
)


def environment(group: click.Group, *, nested: bool = False) -> None:
    """Give every configurable option without an environment variable ZFAN_<OPTION> (in a
    command inside a group: those of FOR_EVERY_COMMAND)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            environment(command, nested=True)
            continue
        names = configurable(command)
        if nested:
            names = {k: v for k, v in names.items() if k in FOR_EVERY_COMMAND}
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None and param.name in names.values():
                key = next(k for k, v in names.items() if v == param.name)
                param.envvar = f"ZFAN_{key.upper()}"


@dataclass
class Setting:
    key: str
    value: Any
    source: str  # "flag", "env ZFAN_X", "file" or "default"


def resolved(group: click.Group, names: list[str], config: str | None) -> dict[str, list[Setting]]:
    """What each named command (every role command if none) would run with, and where each
    value comes from, without running it."""
    commands = every_command(group)
    for name in names:
        if name not in commands:
            raise ConfigError(f"{name!r} is no zfan command (choose from {', '.join(sorted(commands))})")
    out: dict[str, list[Setting]] = {}
    for name in names or sorted(commands):
        command = group.commands[name]
        args = ["--config", config] if config else []
        try:
            ctx = command.make_context(name, args, parent=click.get_current_context())
        except click.ClickException as exc:  # a value from the environment or the file, refused
            raise ConfigError(f"zfan {name}: {exc.format_message()}") from None
        with ctx:
            settings = []
            for key, param_name in configurable(command).items():
                source = ctx.get_parameter_source(param_name)
                param = next(p for p in command.params if p.name == param_name)
                if source is click.core.ParameterSource.ENVIRONMENT:
                    where = f"env {param.envvar}"
                elif source is click.core.ParameterSource.DEFAULT_MAP:
                    where = "file"
                elif source is click.core.ParameterSource.COMMANDLINE:
                    where = "flag"
                else:
                    where = "default"
                value = ctx.params[param_name]
                settings.append(Setting(key, getattr(value, "name", value), where))  # a file option: its path
            out[name] = settings
    return out


def _with_config(role_name: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """--config's callback: find and read the file, and make what it sets the command's defaults
    (click then takes a value from the command line first, the environment second, these third)."""

    def read(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        root = ctx.find_root().command
        try:
            path = config_file.find(value)
            if path is None:
                return None
            found = config_file.load(path)
            if isinstance(root, click.Group):
                found.check(every_command(root))
        except ConfigError as exc:
            raise FileError(role_name, str(exc)) from None
        # A role command's own table; a command inside a group (keys generate) reads the top only.
        direct = isinstance(root, click.Group) and root.commands.get(ctx.info_name or "") is ctx.command
        table = ctx.info_name or "" if direct else ""
        keys = configurable(ctx.command)
        if not direct:
            keys = {k: v for k, v in keys.items() if k in FOR_EVERY_COMMAND}
        ctx.default_map = {**(ctx.default_map or {}), **found.defaults(table, keys)}
        ctx.meta["zfan.config"] = path
        return path

    return read


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where a command waits on something it cannot poll (a read of
    stdin, a full window). A BaseException, as KeyboardInterrupt is: no `except Exception`
    swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Set by a signal handler, read by the command's threads. No lock: a handler runs between
    any two bytecodes of the main thread, also inside a lock it holds (a threading.Event's, in
    its own set() when signals come in a burst), and taking that lock again would wait forever."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Whether it was set within `timeout` seconds (looked at every 50 ms)."""
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        return self._set


class Signals:
    """SIGINT and SIGTERM for one command. The first asks it to stop: `stopping` is set, and
    the command finishes what it must, says so and exits; inside `interruptible()` (and before
    the command calls `cooperate()`) Interrupted is raised at once instead. A second signal
    ends the process at once, with 128 + its number."""

    def __init__(self, role_name: str) -> None:
        self.role = role_name
        self.signum: int | None = None
        self.stopping = StopFlag()
        self._raise = True
        self._parent: int | None = None  # the process whose end ends this one

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def follow_parent(self, parent: int) -> None:
        """SIGHUP, which die_with_parent has sent when the parent ends (maybe several times),
        asks the command to stop however often it comes: it is never a second signal."""
        self._parent = parent
        signal.signal(signal.SIGHUP, self._parent_gone)

    def check_parent(self) -> None:
        """Stop as the SIGHUP would, if the parent is gone and that signal was not seen (the
        kernel sends it when the thread that started us ends, which is not always the last)."""
        if self._parent is not None and os.getppid() != self._parent:
            self._parent_gone(signal.SIGHUP, None)

    def _parent_gone(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        self.stopping.set()
        if first and self._raise:
            raise Interrupted(signum)

    def cooperate(self) -> Signals:
        """From now on the first signal only sets `stopping`: the command polls it."""
        self._raise = False
        return self

    @property
    def code(self) -> int:
        """The exit code of a command stopped by the signal that came."""
        return RET_SIGNAL + (self.signum or signal.SIGINT)

    def after_ctrl_c(self, line: str) -> str:
        """`line`, on a line of its own even after the ^C a terminal echoes where the cursor was."""
        return ("\n" + line) if self.signum == signal.SIGINT and sys.stderr.isatty() else line

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch that the first signal interrupts at once, raising Interrupted."""
        self._raise = True
        try:
            if self.signum is not None:
                raise Interrupted(self.signum)
            yield
        finally:
            self._raise = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # Not through Python's exit: threads, sockets and children are left as they are
            # (a sink's workers and zfan up's sink end with their parent).
            lead = "\n" if os.isatty(2) else ""  # off the line a progress bar or ^C is on
            os.write(2, f"{lead}zfan {self.role}: stopped at once\n".encode())
            os._exit(RET_SIGNAL + signum)
        self.signum = signum
        self.stopping.set()
        if self._raise:
            raise Interrupted(signum)


_signals: Signals | None = None


def signals() -> Signals:
    """This process's Signals, installed by @role."""
    assert _signals is not None, "signals() is for a command run through @role"
    return _signals


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
    """The one readiness line a role prints on stderr once it is up (a client: once a sink has
    welcomed it)."""
    detail = " ".join(f"{k}={v}" for k, v in fields.items())
    say(f"zfan {role_name}: ready {detail}")


class Client(Protocol):
    """What await_welcome needs of a producer or worker."""

    connected: threading.Event

    @property
    def running(self) -> bool: ...

    @property
    def error(self) -> BaseException | None: ...


def await_welcome(node: Client, stop: Signals) -> bool:
    """Wait until a sink has welcomed `node`: True then; False if the command was asked to stop
    first or the node ended (raising the node's error if it ended on one). (The node itself
    warns once when no sink answers.)"""
    while not node.connected.wait(0.1):
        if stop.stopping.is_set():
            return False
        if not node.running:
            if node.error is not None:
                raise node.error
            return False
    return True
