"""Core values <-> protobuf messages for the servicer (protobuf types only, no grpc).

Messages are filled in place: passing a built sub-message to a constructor copies it again at every
level (11 ms instead of 0.3 ms for a 4 MiB chunk), which would cap snapshot streaming well below
the network.
"""

from __future__ import annotations

from google.protobuf.message import Message

from candidate_service.corpus import CorpusInfo
from candidate_service.rollout import ModelRef, RolloutStatus
from candidate_service.store import Attrs, Delta
from candidate_service.watch import SnapshotPart
from shared import codec
from twotower.v1 import candidate_tower_pb2 as pb
from twotower.v1 import common_pb2


def add_attributes(msg: Message, field: str, attributes: list[Attrs]) -> None:
    """Append one ItemAttributes per row to the repeated `field` of `msg` (row-aligned)."""
    if not any(attributes):
        # Every row empty (the common case): an empty sub-message is the two bytes (tag, length 0),
        # and merging them is ~100x faster than adding messages one by one.
        number = msg.DESCRIPTOR.fields_by_name[field].number
        msg.MergeFromString(bytes([number << 3 | 2, 0]) * len(attributes))
        return
    repeated = getattr(msg, field)
    for attrs in attributes:
        item = repeated.add()
        if attrs:
            item.attributes.update(attrs)


def snapshot_event(part: SnapshotPart) -> pb.CorpusEvent:
    snap, rows = part.snapshot, slice(part.lo, part.hi)
    event = pb.CorpusEvent()
    chunk = event.snapshot_chunk
    chunk.version = snap.version
    chunk.fingerprint = snap.fingerprint
    chunk.chunk_index = part.index
    chunk.num_chunks = part.num_chunks
    chunk.total_items = len(snap)
    chunk.post_ids.CopyFrom(codec.encode(snap.post_ids[rows]))
    chunk.author_ids.CopyFrom(codec.encode(snap.author_ids[rows]))
    chunk.embeddings.CopyFrom(codec.encode(snap.embeddings[rows]))
    add_attributes(chunk, "attributes", snap.attributes[rows])
    return event


def delta_event(delta: Delta) -> pb.CorpusEvent:
    event = pb.CorpusEvent()
    msg = event.delta
    msg.version = delta.version
    msg.fingerprint = delta.fingerprint
    msg.upsert_post_ids.CopyFrom(codec.encode(delta.upsert_post_ids))
    msg.upsert_author_ids.CopyFrom(codec.encode(delta.upsert_author_ids))
    msg.upsert_embeddings.CopyFrom(codec.encode(delta.upsert_embeddings))
    add_attributes(msg, "upsert_attributes", delta.upsert_attributes)
    msg.deleted_post_ids.CopyFrom(codec.encode(delta.deleted_post_ids))
    return event


def corpus_info(info: CorpusInfo) -> pb.CorpusInfo:
    return pb.CorpusInfo(
        num_items=info.num_items,
        embedding_dim=info.dim,
        dtype=codec.DType.DTYPE_FLOAT32,
        version=info.version,
        fingerprint=info.fingerprint,
    )


def model_info(model: ModelRef | None) -> common_pb2.ModelInfo | None:
    if model is None:
        return None
    return common_pb2.ModelInfo(fingerprint=model.fingerprint, embedding_dim=model.dim)


def rollout_status(status: RolloutStatus) -> pb.RolloutStatus:
    return pb.RolloutStatus(
        state=pb.RolloutStatus.State.Value(status.state.value),
        active=model_info(status.active),
        target=model_info(status.target),
        items_encoded=status.items_encoded,
        items_total=status.items_total,
        error=status.error,
        switched_at_version=status.switched_at_version,
        step_seconds=status.step_seconds,
    )
