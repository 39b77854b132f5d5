"""The one configuration dataclass of candidate_service."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.server.bootstrap import ServerOptions

DEFAULT_ENCODE_BATCH_SIZE = 16_384  # items per forward pass when building the corpus
DEFAULT_MAX_BATCH_ITEMS = 4_096  # items per EncodeItems / UpsertItems / DeleteItems request
MAX_SNAPSHOT_CHUNK_BYTES = 4 * 1024 * 1024
ITEM_STORE_FILE = "items.sqlite3"  # under cache_dir unless --item-store says otherwise


@dataclass(frozen=True)
class CandidateConfig:
    checkpoint: Path  # checkpoint directory (model.safetensors + config.json)
    cache_dir: Path  # embeddings cache (one file per model fingerprint); default home of the item store
    # Items file (JSONL; Parquet when pyarrow is installed), imported into an empty item store, or into
    # a non-empty one with `import_items`. Otherwise the item store is the record and the file is unused.
    items: Path | None = None
    item_store: Path | None = None  # SQLite file of the corpus of record; None = cache_dir/items.sqlite3
    import_items: bool = False  # upsert the items file's new and changed items into the store at start
    encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    # Recent deltas kept in memory so that a watcher that was briefly away resumes without a snapshot.
    delta_ring_size: int = 1_024
    # Deltas queued for one watcher before it is considered too slow (it then gets a fresh snapshot).
    watcher_queue_size: int = 256
    # Consecutive fresh snapshots a watcher may need because it fell behind before it is cut off.
    max_watcher_resyncs: int = 3
    # Open WatchCorpus streams; each may cost a full snapshot, so one more is RESOURCE_EXHAUSTED.
    max_watchers: int = 64
    # The embeddings cache is rewritten (in the background) once this many changes are not in it, so
    # that a restart re-encodes at most about this many items.
    cache_refresh_after_changes: int = 10_000
    torch_threads: int | None = None  # torch intra-op threads; None = torch's choice
    port_file: Path | None = None  # the bound port is written here once listening
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        for name in (
            "encode_batch_size", "max_batch_items", "delta_ring_size", "watcher_queue_size",
            "max_watcher_resyncs", "max_watchers", "cache_refresh_after_changes",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.import_items and self.items is None:
            raise ValueError("import_items needs an items file")

    @property
    def item_store_path(self) -> Path:
        return self.item_store if self.item_store is not None else Path(self.cache_dir) / ITEM_STORE_FILE

    @property
    def snapshot_chunk_bytes(self) -> int:
        """Bytes of tensors + attributes per snapshot chunk: a quarter of the message limit, at most 4 MiB,
        so a chunk stays well under the limit whatever protobuf framing adds."""
        return max(1, min(MAX_SNAPSHOT_CHUNK_BYTES, self.server.max_message_bytes // 4))

    @property
    def max_delta_bytes(self) -> int:
        """Upper bound on one delta's payload (an UpsertItems call), so every delta fits a message."""
        return self.server.max_message_bytes * 3 // 4
