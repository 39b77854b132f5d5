"""The one configuration dataclass of candidate_service; its fields declare the flags of __main__."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.server.bootstrap import ServerOptions
from shared.server.settings import setting

DEFAULT_ENCODE_BATCH_SIZE = 16_384  # items per forward pass when building the corpus
DEFAULT_MAX_BATCH_ITEMS = 4_096  # items per EncodeItems / UpsertItems / DeleteItems request
MAX_SNAPSHOT_CHUNK_BYTES = 4 * 1024 * 1024
ITEM_STORE_FILE = "items.sqlite3"  # under cache_dir unless --item-store says otherwise


@dataclass(frozen=True)
class CandidateConfig:
    """Each `setting` field is a flag of `python -m candidate_service` with env `CANDIDATE_<FIELD>`
    (shared/server/settings.py); `port_file` and `server` come from the flags every service shares."""

    checkpoint: Path = field(
        metadata=setting(
            "checkpoint directory (model.safetensors + config.json)", env="TWOTOWER_CHECKPOINT", metavar="DIR"
        )
    )
    cache_dir: Path = field(
        metadata=setting("embeddings cache, a file per model; holds the item store by default", metavar="DIR")
    )
    # Items file (JSONL; Parquet when pyarrow is installed), imported into an empty item store, or into
    # a non-empty one with `import_items`. Otherwise the item store is the record and the file is unused.
    items: Path | None = field(
        default=None,
        metadata=setting("items file, JSONL or .parquet, imported into a new item store", metavar="FILE"),
    )
    item_store: Path | None = field(
        default=None,
        metadata=setting(
            "SQLite file of the corpus of record; not given: CACHE_DIR/items.sqlite3", metavar="FILE"
        ),
    )
    # No env var: an import is an instruction for one start, not a standing setting.
    import_items: bool = field(
        default=False,
        metadata=setting(
            "upsert the items file's new and changed items into an existing item store at start (once)",
            env=None,
        ),
    )
    encode_batch_size: int = field(
        default=DEFAULT_ENCODE_BATCH_SIZE, metadata=setting("items per forward pass when encoding the corpus")
    )
    max_batch_items: int = field(
        default=DEFAULT_MAX_BATCH_ITEMS,
        metadata=setting(
            "items (or ids) per EncodeItems/UpsertItems/DeleteItems call; more is INVALID_ARGUMENT"
        ),
    )
    # Recent deltas kept in memory so that a watcher that was briefly away resumes without a snapshot.
    delta_ring_size: int = field(
        default=1_024, metadata=setting("recent deltas kept for watchers that resume")
    )
    # Deltas queued for one watcher before it is considered too slow (it then gets a fresh snapshot).
    watcher_queue_size: int = field(
        default=256, metadata=setting("deltas queued per watcher before it gets a fresh snapshot instead")
    )
    # Consecutive fresh snapshots a watcher may need because it fell behind before it is cut off.
    max_watcher_resyncs: int = 3
    # Open WatchCorpus streams; each may cost a full snapshot, so one more is RESOURCE_EXHAUSTED.
    max_watchers: int = field(
        default=64, metadata=setting("open WatchCorpus streams; one more is RESOURCE_EXHAUSTED")
    )
    # The embeddings cache is rewritten (in the background) once this many changes are not in it, so
    # that a restart re-encodes at most about this many items.
    cache_refresh_after_changes: int = field(
        default=10_000, metadata=setting("rewrite the embeddings cache once this many changes are not in it")
    )
    torch_threads: int | None = field(
        default=None, metadata=setting("torch intra-op threads; not given: torch's choice")
    )
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
