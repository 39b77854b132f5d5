"""The one configuration dataclass of candidate_service."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.server.bootstrap import ServerOptions

DEFAULT_ENCODE_BATCH_SIZE = 16_384  # items per forward pass when building the corpus
DEFAULT_MAX_BATCH_ITEMS = 4_096  # items per EncodeItems / UpsertItems / DeleteItems request
MAX_SNAPSHOT_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class CandidateConfig:
    checkpoint: Path  # checkpoint directory (model.safetensors + config.json)
    items: Path  # items file (JSONL; Parquet when pyarrow is installed)
    cache_dir: Path  # embeddings cache + delta log, one sub-directory per (fingerprint, items digest)
    encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    # Recent deltas kept in memory so that a watcher that was briefly away resumes without a snapshot.
    delta_ring_size: int = 1_024
    # Deltas queued for one watcher before it is considered too slow (it then gets a fresh snapshot).
    watcher_queue_size: int = 256
    # Consecutive fresh snapshots a watcher may need because it fell behind before it is cut off.
    max_watcher_resyncs: int = 3
    # The delta log is folded into a new snapshot once it holds this many records.
    compact_after_deltas: int = 10_000
    torch_threads: int | None = None  # torch intra-op threads; None = torch's choice
    port_file: Path | None = None  # the bound port is written here once listening
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        for name in ("encode_batch_size", "max_batch_items", "delta_ring_size", "watcher_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_watcher_resyncs < 1 or self.compact_after_deltas < 1:
            raise ValueError("max_watcher_resyncs and compact_after_deltas must be >= 1")

    @property
    def snapshot_chunk_bytes(self) -> int:
        """Bytes of tensors + attributes per snapshot chunk: a quarter of the message limit, at most 4 MiB,
        so a chunk stays well under the limit whatever protobuf framing adds."""
        return max(1, min(MAX_SNAPSHOT_CHUNK_BYTES, self.server.max_message_bytes // 4))

    @property
    def max_delta_bytes(self) -> int:
        """Upper bound on one delta's payload (an UpsertItems call), so every delta fits a message."""
        return self.server.max_message_bytes * 3 // 4
