"""UserTower gRPC servicer: validate -> convert -> delegate to EncodingService -> encode the tensor."""

from __future__ import annotations

import asyncio

import grpc

from twotower.v1 import user_tower_pb2, user_tower_pb2_grpc
from user_service import convert
from user_service.encoder import ModelIdentity
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
        return self._models_status(loaded=identity)

    async def SetDefaultModel(self, request: user_tower_pb2.ModelRef, context) -> user_tower_pb2.ModelsStatus:
        await self._control.set_default(request.fingerprint)
        return self._models_status()

    async def UnloadModel(self, request: user_tower_pb2.ModelRef, context) -> user_tower_pb2.ModelsStatus:
        await self._control.unload(request.fingerprint)
        return self._models_status()

    async def GetModels(self, request: user_tower_pb2.GetModelsRequest, context) -> _Models:
        return self._models_status()

    def _models_status(self, loaded: ModelIdentity | None = None) -> user_tower_pb2.ModelsStatus:
        identities, default = self._service.models.identities()
        return convert.models_status_to_proto(identities, default, loaded)

    async def EncodeUsers(
        self, request: user_tower_pb2.EncodeUsersRequest, context: grpc.aio.ServicerContext
    ) -> user_tower_pb2.EncodeUsersResponse:
        n = convert.call_size_from_proto(request)
        if n is not None:  # the call's size before any per-user work (a bad shape fails decoding)
            self._service.check_call_size(n)
        # NotReady (UNAVAILABLE) while loading, ModelMismatch (FAILED_PRECONDITION) for a model not held
        encoder = self._service.models.get(request.model_fingerprint)
        contexts = convert.users_from_proto(request, encoder.config, encoder.max_history_events)
        remaining = context.time_remaining()  # seconds, None without a client deadline
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        # the model the contexts were checked against (one lookup: a default switching meanwhile
        # cannot validate with one model and encode with another)
        embeddings, model = await self._service.encode(contexts, deadline, encoder)
        return convert.encode_response_to_proto(embeddings, model)
