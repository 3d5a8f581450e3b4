"""The configuration file every `zfan` command reads: `zfan.toml`, or `[tool.zfan]` in
`pyproject.toml`.

Keys at the top apply to every command that has an option of that name (the endpoints, the
CURVE keys, the log options); a table per command (`[sink]`, `[worker]`, `[produce]`,
`[subscribe]`, `[up]`, `[status]`) holds that command's own, and wins over the top. Keys are
the options' long names, with dashes or underscores:

    control = "tcp://sink.example:5558"

    [sink]
    ledger = "/var/lib/zfan/zfan.db"
    max-attempts = 5

The command line wins over the environment (ZFAN_<OPTION>), which wins over the file, which
wins over the defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

FILE_NAME = "zfan.toml"
PYPROJECT = "pyproject.toml"
ENV = "ZFAN_CONFIG"
NONE = "none"  # --config none: read no settings file
# Top-level keys a command does not take although it has an option of that name: `sinks` at
# the top names the running sinks every client spans; `zfan up --sinks` counts sinks of its own.
NOT_SHARED = frozenset({("up", "sinks")})


def child_environment() -> dict[str, str]:
    """The environment for the roles a process starts with every setting on their command line
    (a sink's local workers, zfan up's sink): without the ZFAN_<OPTION> variables and settings
    file meant for this one, which would add to or override those settings. The log's format
    and file are kept: the children log as their parent does."""
    keep = {"ZFAN_LOG_FORMAT", "ZFAN_LOG_FILE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZFAN_") or k in keep}
    env[ENV] = NONE
    return env


@dataclass(frozen=True)
class ConfigFile:
    """A file's settings: `shared` (the top-level keys) and one table per command, each a mapping
    of option name (underscored) to value."""

    path: str
    shared: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self, options: Mapping[str, Mapping[str, str]]) -> None:
        """Refuse a table no command has, or a key no command (or not this table's) has: a
        misspelt key would otherwise be ignored without a word. `options`: each command's
        keys (its long flags, underscored) and the parameter each sets."""
        every = {key for keys in options.values() for key in keys}
        for key in self.shared:
            if key not in every:
                raise ConfigError(f"{self.path}: {_flag(key)} is no option of any zfan command")
        for command, table in self.commands.items():
            if command not in options:
                known = ", ".join(f"[{c}]" for c in sorted(options))
                raise ConfigError(f"{self.path}: [{command}] is no zfan command (tables: {known})")
            for key in table:
                if key not in options[command]:
                    raise ConfigError(f"{self.path}: [{command}] {_flag(key)} is no option of zfan {command}")

    def defaults(self, command: str, options: Mapping[str, str]) -> dict[str, Any]:
        """What the file sets for `command`, by parameter name; `options` as for check()."""
        values = {options[k]: v for k, v in self.shared.items() if k in options and (command, k) not in NOT_SHARED}
        values.update((options[k], v) for k, v in self.commands.get(command, {}).items() if k in options)
        return values


def find(explicit: str | None, folder: str = ".") -> str | None:
    """The file to read: `explicit` (from --config or ZFAN_CONFIG), which must exist ("none":
    no file at all); else zfan.toml in `folder`; else its pyproject.toml if that has a
    [tool.zfan] table; else none."""
    if explicit == NONE:
        return None
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"config file {explicit}: no such file")
        return explicit
    here = os.path.join(folder, FILE_NAME)
    if os.path.isfile(here):
        return here
    pyproject = os.path.join(folder, PYPROJECT)
    if os.path.isfile(pyproject):
        try:
            tool = _read(pyproject).get("tool", {})
        except ConfigError:
            return None  # a project's own file, broken: not ours to refuse, unless named
        if isinstance(tool, dict) and "zfan" in tool:
            return pyproject
    return None


def load(path: str) -> ConfigFile:
    doc = _read(path)
    if os.path.basename(path) == PYPROJECT:
        doc = doc.get("tool", {}).get("zfan", {})
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: [tool.zfan] must be a table")
    shared: dict[str, Any] = {}
    commands: dict[str, dict[str, Any]] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            commands[key] = {_name(k): v for k, v in value.items()}
        else:
            shared[_name(key)] = value
    return ConfigFile(path, shared, commands)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _name(key: str) -> str:
    return key.replace("-", "_")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")
