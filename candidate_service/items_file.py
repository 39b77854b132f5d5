"""The items file, imported into the item store (on the first start, or with --import-items): JSONL
(one item per line), or Parquet when pyarrow is installed.

JSONL line format: {"post_id": <int > 0>, "author_id": <int >= 0, optional>, "attributes": {str: str}}.
Every problem (missing file, malformed line, bad value, duplicate post id) raises ItemsFileError naming
the line: the service refuses to start rather than silently dropping rows. Blank lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.convert import check_attributes
from shared.errors import InvalidInput

INT64_MAX = 2**63 - 1
_KEYS = {"post_id", "author_id", "attributes"}


class ItemsFileError(Exception):
    """The items file is missing or malformed (raised at start; the service does not start)."""


@dataclass(frozen=True)
class ItemColumns:
    post_ids: np.ndarray  # [N] int64, > 0, unique
    author_ids: np.ndarray  # [N] int64, >= 0
    attributes: list[dict[str, str] | None]  # [N]; None = no attributes (saves memory on big corpora)
    digest: str  # sha256 of the file's bytes: recorded in the item store at import

    def __len__(self) -> int:
        return len(self.post_ids)


def _int_field(obj: dict[str, Any], key: str, low: int, default: int | None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise ValueError(f"'{key}' is missing")
    # bool is an int in Python and 1.5 is not an id: both are rejected rather than coerced
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{key}' must be an integer, got {value!r}")
    if not low <= value <= INT64_MAX:
        raise ValueError(f"'{key}' must be in [{low}, 2^63-1], got {value}")
    return value


def parse_item(line: str) -> tuple[int, int, dict[str, str] | None]:
    """One JSONL line -> (post id, author id, attributes); raises ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {sorted(_KEYS)}")
    post_id = _int_field(obj, "post_id", 1, None)
    author_id = _int_field(obj, "author_id", 0, 0)
    attrs = obj.get("attributes")
    if attrs is None:
        return post_id, author_id, None
    if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
        raise ValueError("'attributes' must be an object of string values")
    try:
        check_attributes(attrs, "attributes")
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    return post_id, author_id, attrs or None


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes: the `digest` read_items gives, without parsing the file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_items(path: str | Path) -> ItemColumns:
    path = Path(path)
    if not path.is_file():
        raise ItemsFileError(f"items file not found: {path}")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    digest = hashlib.sha256()
    post_ids: list[int] = []
    author_ids: list[int] = []
    attributes: list[dict[str, str] | None] = []
    line_of: dict[int, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            if not raw.strip():
                continue
            try:
                post_id, author_id, attrs = parse_item(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ItemsFileError(f"{path}:{number}: {exc}") from None
            first = line_of.setdefault(post_id, number)
            if first != number:
                raise ItemsFileError(f"{path}:{number}: duplicate post_id {post_id} (first on line {first})")
            post_ids.append(post_id)
            author_ids.append(author_id)
            attributes.append(attrs)
    return ItemColumns(
        post_ids=np.asarray(post_ids, dtype=np.int64),
        author_ids=np.asarray(author_ids, dtype=np.int64),
        attributes=attributes,
        digest=digest.hexdigest(),
    )


def _read_parquet(path: Path) -> ItemColumns:
    """Columns post_id (int), author_id (int, optional), attributes (map<string,string> or a JSON string,
    optional). Row numbers in errors count from 1."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ItemsFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise ItemsFileError(f"{path}: unreadable Parquet file: {exc}") from None
    names = set(table.column_names)
    if "post_id" not in names or names - _KEYS:
        raise ItemsFileError(f"{path}: columns {sorted(names)}; need post_id, optional author_id, attributes")
    rows = table.to_pylist()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    post_ids, author_ids, attributes, line_of = [], [], [], {}
    for number, row in enumerate(rows, start=1):
        attrs = row.get("attributes")
        if isinstance(attrs, list):  # a parquet map arrives as [(key, value), ...]
            row["attributes"] = dict(attrs)
        if row.get("author_id") is None:
            row.pop("author_id", None)
        try:
            if isinstance(attrs, str):
                row["attributes"] = json.loads(attrs)
            post_id, author_id, attrs = parse_item(json.dumps(row))
        except ValueError as exc:
            raise ItemsFileError(f"{path}: row {number}: {exc}") from None
        first = line_of.setdefault(post_id, number)
        if first != number:
            raise ItemsFileError(f"{path}: row {number}: duplicate post_id {post_id} (first in row {first})")
        post_ids.append(post_id)
        author_ids.append(author_id)
        attributes.append(attrs)
    return ItemColumns(
        np.asarray(post_ids, dtype=np.int64), np.asarray(author_ids, dtype=np.int64), attributes, digest
    )
