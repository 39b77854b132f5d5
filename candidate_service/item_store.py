"""The corpus of record: every item's post id, author id and attributes, and the corpus version (no
grpc, no torch). Embeddings are not here: they are derived from these rows, per model.

`ItemStore` is the small interface the service uses; `SqliteItemStore` is the embedded default (the
standard library's sqlite3, WAL, synchronous=FULL) and a server database could take its place.

- One change (an upsert or delete call, or an import) is one transaction that also sets the version
  to the previous one + 1; it is acknowledged only once COMMIT has returned, and is then on disk.
- A failed write (disk full, file size limit, I/O or fsync error) is rolled back and raises
  StorageFull or StorageUnavailable: nothing is applied, the version does not move, later writes work.
- A store that cannot be read (not SQLite, corrupt, another schema, in use by another process) raises
  ItemStoreError when opened: the service stops and never replaces or rebuilds it.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import resource
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from shared.atomic_file import fsync_dir
from shared.corpus_rows import Attrs
from shared.errors import ServiceError, StorageFull, StorageUnavailable

logger = logging.getLogger(__name__)

APPLICATION_ID = 0x54544931  # "TTI1" in the file header: this file is a twotower item store
SCHEMA_VERSION = 1  # PRAGMA user_version; a store of another schema is refused, never rewritten
LOW_SPACE_BYTES = 4 << 20  # an I/O error with less free space than this is reported as "disk full"
JOURNAL_SIZE_LIMIT = 64 << 20  # the WAL is truncated back to this after a checkpoint (a big import)
LOCK_TIMEOUT_S = 5.0  # sqlite's busy timeout; the lock file already keeps other services out

_UPSERT = (
    "INSERT INTO items (post_id, author_id, attributes) VALUES (?, ?, ?) ON CONFLICT (post_id) "
    "DO UPDATE SET author_id = excluded.author_id, attributes = excluded.attributes"
)
_SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class ItemStoreError(Exception):
    """The item store cannot be opened or read (raised at start: the service does not start)."""


@dataclass(frozen=True)
class Items:
    """Item rows without embeddings, row-aligned."""

    post_ids: np.ndarray  # [n] int64
    author_ids: np.ndarray  # [n] int64
    attributes: list[Attrs]  # [n]; None = no attributes

    def __len__(self) -> int:
        return len(self.post_ids)

    @classmethod
    def empty(cls) -> Items:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), [])


class ItemStore(Protocol):
    """What candidate_service needs from its store of record."""

    location: str  # for messages: a path or a URL without credentials

    @property
    def version(self) -> int:
        """The version of the last committed change."""
        ...

    @property
    def fresh(self) -> bool:
        """True until the first change is committed (the items file is imported then)."""
        ...

    def load(self) -> Items:
        """Every item, sorted by post id."""
        ...

    def meta(self, key: str) -> str | None: ...

    def set_meta(self, values: Mapping[str, str]) -> None:
        """Set these meta values in one transaction (the version does not move); durable when it
        returns. On failure nothing is set (StorageFull, StorageUnavailable)."""
        ...

    def commit(
        self,
        version: int,
        upserts: Items,
        deleted_post_ids: np.ndarray,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Apply `upserts`, then the deletes, set `meta` and the version (`self.version + 1`) in one
        transaction; durable when it returns. On failure nothing is applied (StorageFull,
        StorageUnavailable)."""
        ...

    def close(self) -> None: ...


def initial_version() -> int:
    """A new store starts at the current time in microseconds, not at 1: a store created anew (the old
    one deleted) must never reuse a version number a watcher may hold for other content."""
    return time.time_ns() // 1000


def attributes_to_text(attrs: Attrs) -> str | None:
    return json.dumps(attrs, ensure_ascii=False, separators=(",", ":"), sort_keys=True) if attrs else None


def write_error(exc: sqlite3.Error, path: Path) -> ServiceError:
    """The caller-facing error of a failed write, saying why (SQLite reports a file size limit, EFBIG,
    as a generic I/O error: free space and RLIMIT_FSIZE tell it apart from a failing disk)."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    facts, full = [], name == "SQLITE_FULL"
    try:
        free = shutil.disk_usage(path.parent).free
        facts.append(f"{free} bytes free on its filesystem")
        full = full or free < LOW_SPACE_BYTES
    except OSError:
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        facts.append(f"file size limit (RLIMIT_FSIZE) {soft} bytes")
        sizes = [p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()]
        full = full or any(size >= soft for size in sizes)
    detail = f"{name}: {exc}" + (f"; {', '.join(facts)}" if facts else "")
    if full:
        return StorageFull(
            f"the item store {path} is full ({detail}): the change was not saved; retry once space is freed"
        )
    return StorageUnavailable(
        f"the item store {path} could not save the change ({detail}); nothing was applied"
    )


class SqliteItemStore:
    """The store in one SQLite file. Not thread-safe: the service serialises writes (one at a time, in
    a worker thread), and loads before it takes any."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self.location = str(path)
        self._conn = conn
        self._lock_fd = lock_fd
        self._version = self._int_meta("version")
        self._created_version = self._int_meta("created_version")

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        connect: Callable[..., sqlite3.Connection] = sqlite3.connect,
    ) -> SqliteItemStore:
        """Open (or create, when the file does not exist or is empty) and check the store. `connect`
        is sqlite3.connect or a test's wrapper (fault injection)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ItemStoreError(f"cannot create the directory of the item store {path}: {exc}") from exc
        lock_fd = _lock(path)
        try:
            conn = connect(str(path), isolation_level=None, check_same_thread=False, timeout=LOCK_TIMEOUT_S)
            try:
                created = _prepare(conn, path)
                store = cls(path, conn, lock_fd)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise ItemStoreError(_unreadable(path, str(exc))) from exc
        except BaseException:
            os.close(lock_fd)
            raise
        if created:
            fsync_dir(path.parent)  # the new file's directory entry is durable before any acknowledgement
            logger.info("created the item store %s (version %d)", path, store.version)
        return store

    # -- reading -----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def fresh(self) -> bool:
        return self._version == self._created_version

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def load(self) -> Items:
        """Every item, sorted by post id. Ids come as one flat integer stream and the attributes as one
        JSON array built by SQLite: ~4x faster than a Python tuple per row on a 1M-item store."""
        try:
            cursor = self._conn.execute("SELECT post_id, author_id FROM items ORDER BY post_id")
            flat = np.fromiter(itertools.chain.from_iterable(cursor), dtype=np.int64)
            post_ids, author_ids = flat[0::2].copy(), flat[1::2].copy()
            ids_json, attrs_json = self._conn.execute(
                "SELECT json_group_array(post_id), json_group_array(json(attributes)) "
                "FROM items WHERE attributes IS NOT NULL"
            ).fetchone()
        except sqlite3.Error as exc:
            raise ItemStoreError(_unreadable(self.path, str(exc))) from exc
        attr_ids = np.asarray(json.loads(ids_json), dtype=np.int64)
        parsed = json.loads(attrs_json)
        attributes: list[Attrs] = [None] * len(post_ids)
        for row, attrs in zip(np.searchsorted(post_ids, attr_ids).tolist(), parsed, strict=True):
            if not isinstance(attrs, dict):
                raise ItemStoreError(_unreadable(self.path, f"post {post_ids[row]}: attributes {attrs!r}"))
            attributes[row] = attrs
        if len(post_ids) and (post_ids[0] <= 0 or author_ids.min() < 0):
            raise ItemStoreError(_unreadable(self.path, "ids out of range"))
        return Items(post_ids, author_ids, attributes)

    # -- writing -----------------------------------------------------------------------------------

    def commit(
        self,
        version: int,
        upserts: Items,
        deleted_post_ids: np.ndarray,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        if version != self._version + 1:
            raise ValueError(f"change to version {version} does not follow store version {self._version}")
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            (current,) = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if current != self._version:  # written by someone else: never build on a version we do not hold
                raise StorageUnavailable(
                    f"the item store {self.path} is at version {current}, this service at {self._version}: "
                    "restart the service to reload it"
                )
            if len(upserts):
                rows = zip(upserts.post_ids.tolist(), upserts.author_ids.tolist(),
                           map(attributes_to_text, upserts.attributes), strict=True)  # fmt: skip
                conn.executemany(_UPSERT, rows)
            if len(deleted_post_ids):
                conn.executemany("DELETE FROM items WHERE post_id = ?", _singles(deleted_post_ids.tolist()))
            conn.executemany(_SET_META, [("version", version), *(meta or {}).items()])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise write_error(exc, self.path) from exc
        except BaseException:
            self._rollback()
            raise
        self._version = version

    def set_meta(self, values: Mapping[str, str]) -> None:
        reserved = {"version", "created_version"} & set(values)
        if reserved:  # moved only by commit(), with a change
            raise ValueError(f"meta {sorted(reserved)} cannot be set directly")
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_SET_META, list(values.items()))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise write_error(exc, self.path) from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """SQLite rolls back by itself after some errors (SQLITE_FULL, I/O errors), not after others."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback of a failed write to %s failed", self.path)

    def _int_meta(self, key: str) -> int:
        value = self.meta(key)
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ItemStoreError(_unreadable(self.path, f"meta {key!r} is {value!r}")) from None

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            os.close(self._lock_fd)


def _singles(values: Iterable[int]) -> Iterable[tuple[int]]:
    return ((v,) for v in values)


def _unreadable(path: Path, why: str) -> str:
    return (
        f"the item store {path} cannot be read ({why}). It is the corpus of record and is never replaced "
        "or rebuilt: restore it from a backup, or move it away to start a new store from the items file"
    )


def _lock(path: Path) -> int:
    """An exclusive lock on `<store>.lock` for the life of the process: two services writing one store
    would each believe they own the version sequence. The OS drops the lock when the process dies."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ItemStoreError(f"cannot open the lock file {lock_path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise ItemStoreError(
            f"the item store {path} is in use by another process (pid {holder or 'unknown'}); "
            "one candidate_service per store"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _prepare(conn: sqlite3.Connection, path: Path) -> bool:
    """Check the file (or create the schema in an empty one); returns whether it was created."""
    (tables,) = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # "not a database" here
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    (schema,) = conn.execute("PRAGMA user_version").fetchone()
    created = tables == 0 and app_id == 0
    if not created and app_id != APPLICATION_ID:
        raise ItemStoreError(_unreadable(path, f"not a twotower item store: application_id {app_id:#x}"))
    if not created and schema != SCHEMA_VERSION:
        raise ItemStoreError(
            _unreadable(path, f"schema version {schema}, this service reads {SCHEMA_VERSION}")
        )
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode != "wal":
        raise ItemStoreError(_unreadable(path, f"cannot switch to WAL (journal mode {mode})"))
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    if created:
        version = initial_version()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)")
        conn.execute(
            "CREATE TABLE items (post_id INTEGER PRIMARY KEY CHECK (post_id > 0), "
            "author_id INTEGER NOT NULL CHECK (author_id >= 0), attributes TEXT)"
        )
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [("version", version), ("created_version", version)])  # fmt: skip
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        return True
    (check,) = conn.execute("PRAGMA quick_check(1)").fetchone()
    if check != "ok":
        raise ItemStoreError(_unreadable(path, f"integrity check failed: {' '.join(str(check).split())}"))
    columns = {t: [row[1] for row in conn.execute(f"PRAGMA table_info({t})")] for t in ("items", "meta")}
    if columns != {"items": ["post_id", "author_id", "attributes"], "meta": ["key", "value"]}:
        raise ItemStoreError(_unreadable(path, f"unexpected tables {columns}"))
    return False
