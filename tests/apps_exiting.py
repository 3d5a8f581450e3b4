"""An app whose module ends any worker process that imports it: the sink that names it (and
imports it to check it) lives on, and every local worker it starts exits at once."""

from __future__ import annotations

import os

if os.environ.get("ZFAN_TEST_SINK_PID") != str(os.getpid()):
    os._exit(4)


def process(records):
    return records
