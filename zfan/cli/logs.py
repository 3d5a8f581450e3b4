"""How a role logs: text lines with a timestamp for a person, or JSON lines for a log shipper;
on stderr, or appended to a file.

    2026-12-03T07:40:12.345 zfan sink: INFO worker local-1 joined with credit 256
    {"time": "2026-12-03T07:40:12.345Z", "level": "info", "role": "sink", "logger": "zfan.leasing",
     "message": "worker local-1 joined with credit 256", "worker": "local-1"}

The structured fields a log call gives in `extra` (FIELDS) become keys of their own in JSON.
The choice is put in the environment too, so that the processes a role starts (a sink's local
workers) log the same way to the same place.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

FORMATS = ("text", "json")
FIELDS = ("batch", "worker", "topic", "producer", "seconds", "count", "attempt")
FORMAT_ENV, FILE_ENV = "ZFAN_LOG_FORMAT", "ZFAN_LOG_FILE"
_json_on_stderr = False


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, milliseconds), level, role, logger,
    message, the record's structured fields, and the traceback if there is one."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update((k, getattr(record, k)) for k in FIELDS if hasattr(record, k))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(role: str, level: str, fmt: str, file: str | None) -> None:
    """Log records of `level` and above, as `fmt` ("text" or "json"), to `file` or stderr."""
    global _json_on_stderr
    handler: logging.Handler = (
        logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(sys.stderr)
    )
    if fmt == "json":
        handler.setFormatter(JsonLines(role))
    else:
        text = logging.Formatter(f"%(asctime)s.%(msecs)03d zfan {role}: %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        handler.setFormatter(text)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    _json_on_stderr = fmt == "json" and not file
    os.environ[FORMAT_ENV] = fmt
    if file:
        os.environ[FILE_ENV] = os.path.abspath(file)


def json_on_stderr() -> bool:
    """Whether stderr carries JSON lines: then a role's own lines for a person go there as JSON too."""
    return _json_on_stderr
