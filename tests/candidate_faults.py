"""Fault injection for candidate_service's item store (tests only): a sqlite3 connection whose next
COMMITs fail the way a full disk or a failed fsync makes them fail.

`StoreFaults.open` is an item-store opener for `CandidateCore` / `create_server`; `fail_next_commits`
arms it. SQLITE_FULL is raised after rolling the transaction back (as SQLite does by itself on a full
disk); SQLITE_IOERR_FSYNC leaves the transaction open, so the store's own rollback is exercised too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from candidate_service.item_store import SqliteItemStore

MESSAGES = {"SQLITE_FULL": "database or disk is full", "SQLITE_IOERR_FSYNC": "disk I/O error"}


def sqlite_error(name: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(MESSAGES[name])
    exc.sqlite_errorname = name  # what the sqlite3 module sets on a real error
    exc.sqlite_errorcode = getattr(sqlite3, name)
    return exc


class FaultyConnection(sqlite3.Connection):
    faults: list[str]

    def execute(self, sql: str, *args):  # type: ignore[override]
        if sql == "COMMIT" and self.faults:
            name = self.faults.pop(0)
            if name == "SQLITE_FULL":
                super().execute("ROLLBACK")
            raise sqlite_error(name)
        return super().execute(sql, *args)


class StoreFaults:
    def __init__(self) -> None:
        self.pending: list[str] = []  # shared with every connection this opener makes

    def fail_next_commits(self, *names: str) -> None:
        self.pending.extend(names)

    def open(self, path: Path) -> SqliteItemStore:
        return SqliteItemStore.open(path, connect=self._connect)

    def _connect(self, *args, **kwargs) -> sqlite3.Connection:
        conn = sqlite3.connect(*args, factory=FaultyConnection, **kwargs)
        conn.faults = self.pending
        return conn
