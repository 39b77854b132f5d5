"""On-disk corpus cache (no grpc): one snapshot file plus an append-only delta log per directory.

Layout: <cache_dir>/<fingerprint>-<items digest[:16]>/{snapshot.safetensors, deltas.log}.

- The snapshot is a safetensors file (never pickle): post_ids [n] int64, author_ids [n] int64,
  embeddings [n, D] float32 and the attributes as UTF-8 JSON bytes, with a SHA-256 over all of them in
  its metadata. It is written to a temp file, fsynced, renamed over the old one, and the directory is
  fsynced: a crash leaves either the old or the new snapshot, never a mix.
- Each delta (one upsert or delete call) is appended to the log as one framed record
  (magic | payload length | CRC-32 | payload) and fsynced before the call is acknowledged. Only the last
  record can be torn by a crash; reading drops such a tail (it was never acknowledged). A bad record
  with valid-looking data after it is corruption, not a torn write, and fails the whole cache.
- Compaction writes a new snapshot at version V, then atomically replaces the log with the records
  after V. A crash in between leaves records <= V in the log; replay skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from candidate_service.store import Delta, Snapshot, attribute_bytes

logger = logging.getLogger(__name__)

FORMAT = "twotower-corpus/1"
SNAPSHOT_FILE = "snapshot.safetensors"
LOG_FILE = "deltas.log"
_MAGIC = b"TTD1"
_FRAME = struct.Struct("<4sII")  # magic, payload bytes, crc32 of the payload
_U32 = struct.Struct("<I")


class CacheError(Exception):
    """A cache file fails its checks (truncated, corrupt, wrong shape, other model or items file)."""


def cache_dir_for(root: Path, fingerprint: str, items_digest: str) -> Path:
    return Path(root) / f"{fingerprint}-{items_digest[:16]}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then fsync, rename over `target`, fsync the directory (the rename is durable)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete what `atomic_write` leaves when the process is killed mid-write (a snapshot-sized file per
    crash otherwise). Only the process that owns the cache directory may call this, at start-up."""
    stale = list(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
        logger.warning("removed %s, left by an interrupted write", path)
    return stale


# -- snapshot ----------------------------------------------------------------------------------------


def _attributes_blob(attributes: list[dict[str, str] | None]) -> np.ndarray:
    sparse = {str(i): a for i, a in enumerate(attributes) if a}  # most corpora have few attributes
    return np.frombuffer(json.dumps(sparse, ensure_ascii=False).encode(), dtype=np.uint8)


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}|{tensors[name].dtype}|{tensors[name].shape}|".encode())
        digest.update(memoryview(np.ascontiguousarray(tensors[name])).cast("B"))
    return digest.hexdigest()


def write_snapshot(directory: Path, snapshot: Snapshot, items_digest: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "post_ids": snapshot.post_ids,
        "author_ids": snapshot.author_ids,
        "embeddings": snapshot.embeddings,
        "attributes_json": _attributes_blob(snapshot.attributes),
    }
    metadata = {
        "format": FORMAT,
        "fingerprint": snapshot.fingerprint,
        "items_digest": items_digest,
        "version": str(snapshot.version),
        "sha256": _checksum(tensors),
    }
    atomic_write(directory / SNAPSHOT_FILE, lambda path: save_file(tensors, path, metadata=metadata))


def read_snapshot(directory: Path, fingerprint: str, items_digest: str, dim: int) -> Snapshot:
    """Load and verify the snapshot; raises CacheError saying which check failed."""
    path = directory / SNAPSHOT_FILE
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable or truncated: {exc}") from exc
    expected = {"format": FORMAT, "fingerprint": fingerprint, "items_digest": items_digest}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CacheError(f"{path}: {key} is {meta.get(key)!r}, expected {value!r}")
    if set(tensors) != {"post_ids", "author_ids", "embeddings", "attributes_json"}:
        raise CacheError(f"{path}: unexpected tensors {sorted(tensors)}")
    post_ids, author_ids, embeddings = tensors["post_ids"], tensors["author_ids"], tensors["embeddings"]
    n = len(post_ids)
    if (
        post_ids.dtype != np.int64 or author_ids.dtype != np.int64 or embeddings.dtype != np.float32
        or post_ids.shape != (n,) or author_ids.shape != (n,) or embeddings.shape != (n, dim)
    ):  # fmt: skip
        raise CacheError(
            f"{path}: wrong shapes/dtypes (post_ids {post_ids.shape}, author_ids {author_ids.shape}, "
            f"embeddings {embeddings.shape} {embeddings.dtype}; expected D={dim})"
        )
    if meta.get("sha256") != _checksum(tensors):
        raise CacheError(f"{path}: checksum mismatch (corrupt file)")
    try:
        version = int(meta["version"])
        sparse = json.loads(tensors["attributes_json"].tobytes().decode())
        attributes: list[dict[str, str] | None] = [None] * n
        for i, attrs in sparse.items():
            attributes[int(i)] = attrs
    except (KeyError, ValueError, IndexError) as exc:
        raise CacheError(f"{path}: bad metadata or attributes: {exc}") from exc
    return Snapshot(
        version, fingerprint, post_ids, author_ids, embeddings, attributes,
        np.fromiter((attribute_bytes(a) for a in attributes), dtype=np.int64, count=n),
    )  # fmt: skip


# -- delta log ---------------------------------------------------------------------------------------


def encode_record(delta: Delta) -> bytes:
    header = json.dumps({
        "version": delta.version, "fingerprint": delta.fingerprint, "upserts": len(delta.upsert_post_ids),
        "deletes": len(delta.deleted_post_ids), "dim": int(delta.upsert_embeddings.shape[1]),
        "attributes": delta.upsert_attributes,
    }, ensure_ascii=False).encode()  # fmt: skip
    payload = b"".join([
        _U32.pack(len(header)), header,
        delta.upsert_post_ids.astype("<i8").tobytes(), delta.upsert_author_ids.astype("<i8").tobytes(),
        delta.upsert_embeddings.astype("<f4").tobytes(), delta.deleted_post_ids.astype("<i8").tobytes(),
    ])  # fmt: skip
    return _FRAME.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> Delta:
    (header_len,) = _U32.unpack_from(payload)
    header = json.loads(payload[4 : 4 + header_len])
    u, d, dim = header["upserts"], header["deletes"], header["dim"]
    offset = 4 + header_len

    def take(count: int, dtype: str) -> np.ndarray:
        nonlocal offset
        arr = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).astype(dtype[1:])
        offset += arr.nbytes
        return arr

    post_ids, author_ids = take(u, "<i8"), take(u, "<i8")
    embeddings = take(u * dim, "<f4").reshape(u, dim)
    deleted = take(d, "<i8")
    if offset != len(payload) or len(header["attributes"]) != u:
        raise ValueError("record sizes do not add up")
    return Delta(header["version"], header["fingerprint"], post_ids, author_ids, embeddings,
                 header["attributes"], deleted)  # fmt: skip


def read_log(path: Path) -> tuple[list[Delta], int]:
    """All complete records and the byte offset where they end. A torn last record (a crash during an
    append, never acknowledged) is left out; anything else that fails its checks raises CacheError."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    deltas, offset = [], 0
    while offset < len(data):
        problem = None
        if len(data) - offset < _FRAME.size:
            problem = "truncated frame header"
        else:
            magic, size, crc = _FRAME.unpack_from(data, offset)
            end = offset + _FRAME.size + size
            if magic != _MAGIC:
                problem = "bad magic"
            elif end > len(data):
                problem = "record runs past the end of the file"
            elif zlib.crc32(data[offset + _FRAME.size : end]) != crc:
                problem = "CRC mismatch"
        if problem is None:
            try:
                deltas.append(_decode_payload(data[offset + _FRAME.size : end]))
            except (ValueError, KeyError, TypeError, struct.error) as exc:
                raise CacheError(f"{path}: undecodable record at byte {offset}: {exc}") from exc
            offset = end
            continue
        # A torn append is the last thing in the file: it reaches EOF, or is zero-filled up to EOF.
        rest = len(data) - offset
        torn = (
            problem in ("truncated frame header", "record runs past the end of the file")
            or (problem == "CRC mismatch" and end == len(data))
            or (problem == "bad magic" and data.count(0, offset) == rest)
        )
        if not torn:
            raise CacheError(f"{path}: corrupt record at byte {offset} ({problem}) with data after it")
        logger.warning("%s: dropping a torn last record at byte %d (%s)", path, offset, problem)
        break
    return deltas, offset


class DeltaLog:
    """Append-only, fsynced delta log. Not thread-safe: the caller serialises writes."""

    def __init__(self, path: Path, valid_bytes: int) -> None:
        """Open for appending after the first `valid_bytes` (a torn tail beyond them is cut off first)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()
        if self._file.tell() != valid_bytes:
            self._file.truncate(valid_bytes)
            os.fsync(self._file.fileno())
        fsync_dir(path.parent)  # the log's directory entry is durable before any record is acknowledged
        self.records = 0

    def append(self, delta: Delta) -> None:
        """Durable when this returns; on failure the log is cut back to its previous end."""
        record = encode_record(delta)
        start = self._file.tell()
        try:
            self._file.write(record)
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self._file.truncate(start)
            raise
        self.records += 1

    @property
    def size(self) -> int:
        return self._file.tell()

    def keep_from(self, offset: int, records: int) -> None:
        """Atomically replace the log with its bytes from `offset` on (compaction: the records after the
        new snapshot, `records` of them). The caller holds off appends meanwhile."""
        self._file.close()
        with open(self.path, "rb") as f:
            f.seek(offset)
            tail = f.read()
        atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(tail))
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self.records = records

    def close(self) -> None:
        self._file.close()
