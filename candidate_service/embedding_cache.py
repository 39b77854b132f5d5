"""The embeddings cache (no grpc): derived data, one file per model, rebuilt from the item store.

Layout: <cache_dir>/embeddings/<fingerprint>.safetensors, a safetensors file (never pickle) of
post_ids [n] int64, author_ids [n] int64 and embeddings [n, D] float32, with the model fingerprint,
the corpus version it was taken at and a SHA-256 over the tensors in its metadata. It is written to a
temp file, fsynced, renamed over the old one and the directory fsynced: a crash leaves the old file or
the new one, never a mix. Any file that fails a check is simply rebuilt (CacheError): losing or
corrupting it never loses an item, only encoding time.

An embedding depends only on (post id, author id) and the model, so a stale file (older version)
still serves every row whose author is unchanged; only the other rows are encoded again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from shared.atomic_file import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "twotower-embeddings/1"
_TENSORS = ("post_ids", "author_ids", "embeddings")


class CacheError(Exception):
    """A cache file fails its checks (truncated, corrupt, wrong shape, other model)."""


@dataclass(frozen=True)
class CachedEmbeddings:
    version: int  # the corpus version these rows were taken at
    post_ids: np.ndarray  # [n] int64
    author_ids: np.ndarray  # [n] int64
    embeddings: np.ndarray  # [n, D] float32

    def __len__(self) -> int:
        return len(self.post_ids)


def cache_file(cache_dir: Path, fingerprint: str) -> Path:
    return Path(cache_dir) / "embeddings" / f"{fingerprint}.safetensors"


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete what `atomic_write` leaves when the process is killed mid-write (a cache-sized file per
    crash otherwise). Only the process that owns the cache directory may call this, at start-up."""
    stale = list(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
        logger.warning("removed %s, left by an interrupted write", path)
    return stale


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}|{tensors[name].dtype}|{tensors[name].shape}|".encode())
        # flat uint8 view, no copy; memoryview.cast refuses shapes with a zero (an empty corpus)
        digest.update(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def write_cache(path: Path, fingerprint: str, cached: CachedEmbeddings) -> None:
    tensors = {
        "post_ids": np.ascontiguousarray(cached.post_ids, dtype=np.int64),
        "author_ids": np.ascontiguousarray(cached.author_ids, dtype=np.int64),
        "embeddings": np.ascontiguousarray(cached.embeddings, dtype=np.float32),
    }
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "version": str(cached.version),
        "sha256": _checksum(tensors),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_cache(path: Path, fingerprint: str, dim: int) -> CachedEmbeddings:
    """Load and verify; FileNotFoundError when there is none, CacheError saying which check failed."""
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable or truncated: {exc}") from exc
    for key, value in {"format": FORMAT, "fingerprint": fingerprint}.items():
        if meta.get(key) != value:
            raise CacheError(f"{path}: {key} is {meta.get(key)!r}, expected {value!r}")
    if set(tensors) != set(_TENSORS):
        raise CacheError(f"{path}: unexpected tensors {sorted(tensors)}")
    post_ids, author_ids, embeddings = (tensors[name] for name in _TENSORS)
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
    except (KeyError, ValueError) as exc:
        raise CacheError(f"{path}: bad version in its metadata: {exc}") from exc
    return CachedEmbeddings(version, post_ids, author_ids, embeddings)


def reusable_rows(cached: CachedEmbeddings, post_ids: np.ndarray, author_ids: np.ndarray) -> np.ndarray:
    """For each wanted (post id, author id), the row of `cached` holding its embedding, or -1."""
    out = np.full(len(post_ids), -1, dtype=np.int64)
    if len(cached) == 0 or len(post_ids) == 0:
        return out
    order = np.argsort(cached.post_ids, kind="stable")
    sorted_ids = cached.post_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, post_ids), len(sorted_ids) - 1)
    rows = order[pos]
    hit = (sorted_ids[pos] == post_ids) & (cached.author_ids[rows] == author_ids)
    out[hit] = rows[hit]
    return out
