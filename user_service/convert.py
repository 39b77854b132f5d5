"""user_service's boundary: EncodeUsers and model-control messages <-> domain types (user contexts,
embeddings, model identities). Protobuf types only (no grpc): the servicer validates and converts
here, and EncodingService / ModelControl never see a proto."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared import codec
from shared.convert import user_batch_from_proto, user_context_from_proto
from shared.errors import InvalidInput
from shared.model.config import TowerConfig
from shared.model.features import UserContext, validate_user
from twotower.v1 import common_pb2, user_tower_pb2
from user_service.encoder import ModelIdentity


def call_size_from_proto(request: user_tower_pb2.EncodeUsersRequest) -> int | None:
    """How many users the call carries, known before any per-user work (None: a batch whose shape is
    wrong, which fails when it is decoded)."""
    batch = request.batch if request.HasField("batch") else None
    if batch is not None and len(request.users):
        raise InvalidInput("EncodeUsersRequest: send either users or batch, not both")
    shape = list(batch.user_ids.shape) if batch is not None else [len(request.users)]
    return shape[0] if len(shape) == 1 else None


def users_from_proto(
    request: user_tower_pb2.EncodeUsersRequest, cfg: TowerConfig, max_history_events: int
) -> list[UserContext]:
    """Every user parsed and checked against the model that will encode it, before it can join a
    batch: a bad call fails alone."""
    if request.HasField("batch"):
        contexts = user_batch_from_proto(
            request.batch, cfg.num_actions, max_history_events, cfg.num_user_features
        )
    else:
        contexts = [
            user_context_from_proto(msg, cfg.num_actions, max_history_events, where=f"users[{i}]")
            for i, msg in enumerate(request.users)
        ]
    for i, ctx in enumerate(contexts):
        validate_user(ctx, cfg, max_history_events, where=f"users[{i}]")
    return contexts


def model_info_to_proto(model: ModelIdentity) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(fingerprint=model.fingerprint, embedding_dim=model.embedding_dim)


def encode_response_to_proto(
    embeddings: torch.Tensor, model: ModelIdentity
) -> user_tower_pb2.EncodeUsersResponse:
    # fp32 servers answer DTYPE_FLOAT32, bf16 servers DTYPE_BFLOAT16 (the codec picks from the tensor).
    return user_tower_pb2.EncodeUsersResponse(
        embeddings=codec.encode(embeddings), model=model_info_to_proto(model)
    )


def models_status_to_proto(
    models: Sequence[ModelIdentity], default: str, loaded: ModelIdentity | None = None
) -> user_tower_pb2.ModelsStatus:
    """The models held and the default one; `loaded`: the model a LoadModel call just loaded."""
    return user_tower_pb2.ModelsStatus(
        models=[model_info_to_proto(m) for m in models],
        default_fingerprint=default,
        loaded=model_info_to_proto(loaded) if loaded is not None else None,
    )
