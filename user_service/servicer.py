"""UserTower gRPC servicer: validate -> convert -> delegate to EncodingService -> encode the tensor."""

from __future__ import annotations

import asyncio

import grpc

from shared import codec
from shared.convert import user_context_from_proto
from shared.model.features import UserContext, validate_user
from twotower.v1 import common_pb2, user_tower_pb2, user_tower_pb2_grpc
from user_service.service import EncodingService


class UserTowerServicer(user_tower_pb2_grpc.UserTowerServicer):
    def __init__(self, service: EncodingService) -> None:
        self._service = service

    async def EncodeUsers(
        self, request: user_tower_pb2.EncodeUsersRequest, context: grpc.aio.ServicerContext
    ) -> user_tower_pb2.EncodeUsersResponse:
        contexts = self._contexts(request.users)
        remaining = context.time_remaining()  # seconds, None without a client deadline
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        embeddings, model = await self._service.encode(contexts, deadline)
        # fp32 servers answer DTYPE_FLOAT32, bf16 servers DTYPE_BFLOAT16 (the codec picks from the tensor).
        return user_tower_pb2.EncodeUsersResponse(
            embeddings=codec.encode(embeddings),
            model=common_pb2.ModelInfo(fingerprint=model.fingerprint, embedding_dim=model.embedding_dim),
        )

    def _contexts(self, users) -> list[UserContext]:
        """Every user is checked here, before it can join a batch: a bad call fails alone."""
        self._service.check_call_size(len(users))
        encoder = self._service.encoder  # NotReady (UNAVAILABLE) while loading
        cfg, limit = encoder.config, encoder.max_history_events
        contexts = []
        for i, msg in enumerate(users):
            where = f"users[{i}]"
            ctx = user_context_from_proto(msg, cfg.num_actions, limit, where=where)
            validate_user(ctx, cfg, limit, where=where)
            contexts.append(ctx)
        return contexts
