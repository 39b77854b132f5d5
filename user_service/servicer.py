"""UserTower gRPC servicer: validate -> convert -> delegate to EncodingService -> encode the tensor."""

from __future__ import annotations

import asyncio

import grpc

from shared import codec
from shared.convert import user_batch_from_proto, user_context_from_proto
from shared.errors import InvalidInput
from shared.model.features import UserContext, validate_user
from twotower.v1 import common_pb2, user_tower_pb2, user_tower_pb2_grpc
from user_service.encoder import UserEncoder
from user_service.models import ModelControl
from user_service.service import EncodingService

_Models = user_tower_pb2.ModelsStatus


class UserTowerServicer(user_tower_pb2_grpc.UserTowerServicer):
    def __init__(self, service: EncodingService, control: ModelControl) -> None:
        self._service = service
        self._control = control

    # ---- model control (rollouts) --------------------------------------------------------------
    async def LoadModel(self, request: user_tower_pb2.LoadModelRequest, context) -> _Models:
        identity = await self._control.load(request.checkpoint)
        status = self._models_status()
        status.loaded.fingerprint, status.loaded.embedding_dim = identity.fingerprint, identity.embedding_dim
        return status

    async def SetDefaultModel(self, request: user_tower_pb2.ModelRef, context) -> user_tower_pb2.ModelsStatus:
        await self._control.set_default(request.fingerprint)
        return self._models_status()

    async def UnloadModel(self, request: user_tower_pb2.ModelRef, context) -> user_tower_pb2.ModelsStatus:
        await self._control.unload(request.fingerprint)
        return self._models_status()

    async def GetModels(self, request: user_tower_pb2.GetModelsRequest, context) -> _Models:
        return self._models_status()

    def _models_status(self) -> user_tower_pb2.ModelsStatus:
        identities, default = self._service.models.identities()
        return user_tower_pb2.ModelsStatus(
            models=[common_pb2.ModelInfo(fingerprint=m.fingerprint, embedding_dim=m.embedding_dim)
                    for m in identities],
            default_fingerprint=default,
        )  # fmt: skip

    async def EncodeUsers(
        self, request: user_tower_pb2.EncodeUsersRequest, context: grpc.aio.ServicerContext
    ) -> user_tower_pb2.EncodeUsersResponse:
        encoder, contexts = self._contexts(request)
        remaining = context.time_remaining()  # seconds, None without a client deadline
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        # the model the contexts were checked against (one lookup: a default switching meanwhile
        # cannot validate with one model and encode with another)
        embeddings, model = await self._service.encode(contexts, deadline, encoder)
        # fp32 servers answer DTYPE_FLOAT32, bf16 servers DTYPE_BFLOAT16 (the codec picks from the tensor).
        return user_tower_pb2.EncodeUsersResponse(
            embeddings=codec.encode(embeddings),
            model=common_pb2.ModelInfo(fingerprint=model.fingerprint, embedding_dim=model.embedding_dim),
        )

    def _contexts(self, request: user_tower_pb2.EncodeUsersRequest) -> tuple[UserEncoder, list[UserContext]]:
        """Every user is checked here, before it can join a batch: a bad call fails alone."""
        batch = request.batch if request.HasField("batch") else None
        if batch is not None and len(request.users):
            raise InvalidInput("EncodeUsersRequest: send either users or batch, not both")
        shape = list(batch.user_ids.shape) if batch is not None else [len(request.users)]
        if len(shape) == 1:  # the call's size before any per-user work (a bad shape fails decoding)
            self._service.check_call_size(shape[0])
        # NotReady (UNAVAILABLE) while loading, ModelMismatch (FAILED_PRECONDITION) for a model not held
        encoder = self._service.models.get(request.model_fingerprint)
        cfg, limit = encoder.config, encoder.max_history_events
        if batch is not None:
            contexts = user_batch_from_proto(batch, cfg.num_actions, limit, cfg.num_user_features)
        else:
            contexts = [
                user_context_from_proto(msg, cfg.num_actions, limit, where=f"users[{i}]")
                for i, msg in enumerate(request.users)
            ]
        for i, ctx in enumerate(contexts):
            validate_user(ctx, cfg, limit, where=f"users[{i}]")
        return encoder, contexts
