"""Where `zfan produce` gets its records: JSON lines from a stream, or synthetic readings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from .errors import ConfigError

log = logging.getLogger(__name__)


class JsonLines:
    """Records from a stream of JSON lines. A line that is not JSON is skipped, logged with its
    line number and counted in ``skipped``; with ``strict=True`` it stops the run instead."""

    def __init__(self, stream: TextIO | Iterable[str], *, strict: bool = False, name: str = "stdin") -> None:
        self.stream = stream
        self.strict = strict
        self.name = name
        self.skipped = 0

    def __iter__(self) -> Iterator[Any]:
        for lineno, line in enumerate(self.stream, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                where = f"{self.name} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
                if self.strict:
                    raise ConfigError(f"{where}; stopped (--strict)") from None
                self.skipped += 1
                log.warning("%s; skipped", where)
