"""The ledger backends the tests run on: SQLite always, PostgreSQL when ZFAN_TEST_POSTGRES names
a server (`.ci/postgres start DIR` starts a private one and prints its DSN)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any
from urllib.parse import quote

import pytest

from zfan.ledger import Ledger, SqliteLedger

POSTGRES = os.environ.get("ZFAN_TEST_POSTGRES", "")
NO_POSTGRES = (
    "no PostgreSQL to test on: set ZFAN_TEST_POSTGRES=postgresql://... "
    "(`.ci/postgres start DIR` starts a private server and prints its DSN)"
)


def need_postgres() -> str:
    """The test server's DSN; skips the test without one (fails it where CI requires one)."""
    if not POSTGRES:
        if os.environ.get("ZFAN_REQUIRE_POSTGRES"):
            pytest.fail(NO_POSTGRES)
        pytest.skip(NO_POSTGRES)
    return POSTGRES


def in_schema(dsn: str, schema: str) -> str:
    """`dsn` with its search_path set to `schema` (libpq's options parameter)."""
    joiner = "&" if "?" in dsn else "?"
    return f"{dsn}{joiner}options={quote(f'-csearch_path={schema}', safe='')}"


@contextmanager
def schema() -> Iterator[str]:
    """A PostgreSQL schema of its own, as a DSN; dropped, with all it holds, at the end."""
    import psycopg

    base = need_postgres()
    name = f"zfan_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {name}")
    try:
        yield in_schema(base, name)
    finally:
        with psycopg.connect(base, autocommit=True) as db:
            # A session the test left holding locks (a frozen sink's) fails the drop, not the run.
            db.execute("SET lock_timeout = '20s'")
            db.execute(f"DROP SCHEMA {name} CASCADE")


class Backend:
    """Where a test's ledger lives, and how another process would read it."""

    def __init__(self, name: str, location: str) -> None:
        self.name = name
        self.location = location
        self._opened: list[Ledger] = []

    def open(self) -> Ledger:
        """The ledger, opened as a sink opens it; for PostgreSQL, claimed at once (as a sink that
        takes over from a dead one: an earlier claim in the test has no term left)."""
        led: Ledger
        if self.name == "postgres":
            from zfan.ledger.postgres import PostgresLedger

            pg = PostgresLedger(self.location, term=0.0)
            assert pg.claim(), "a claim with no term is always taken"
            led = pg
        else:
            led = SqliteLedger(self.location)
        self._opened.append(led)
        return led

    def peek(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Committed rows, as another process would read them (`?` placeholders)."""
        if self.name == "postgres":
            import psycopg

            with psycopg.connect(self.location, autocommit=True) as db:
                return [tuple(r) for r in db.execute(sql.replace("?", "%s"), args).fetchall()]
        with closing(sqlite3.connect(self.location)) as db:
            return db.execute(sql, args).fetchall()

    def close(self) -> None:
        for led in self._opened:
            led.close()


@contextmanager
def backend(name: str, folder: str) -> Iterator[Backend]:
    if name == "postgres":
        with schema() as dsn:
            b = Backend(name, dsn)
            try:
                yield b
            finally:
                b.close()
    else:
        b = Backend(name, os.path.join(folder, "ledger.db"))
        try:
            yield b
        finally:
            b.close()
