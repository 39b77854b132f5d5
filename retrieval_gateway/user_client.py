"""Client of user_service: user contexts -> (embeddings [B, D] fp32, fingerprint), errors mapped to
the gateway's domain errors, and a health probe for readiness."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import torch

from shared import codec
from shared.channels import RECONNECT_OPTIONS, balanced_options
from shared.convert import user_batch_to_proto
from shared.errors import DeadlineExpired, InvalidInput, ModelMismatch, NotReady, Overloaded
from shared.health import is_serving
from shared.model.features import UserContext
from shared.tls import ClientTLS, aio_channel
from twotower.v1 import common_pb2, user_tower_pb2, user_tower_pb2_grpc

logger = logging.getLogger(__name__)

_SERVICE = user_tower_pb2.DESCRIPTOR.services_by_name["UserTower"].full_name
_EMBEDDING_DTYPES = (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16)


class UserServiceClient:
    def __init__(
        self, address: str, channel_options: list[tuple[str, int]], tls: ClientTLS | None = None
    ) -> None:
        self.address = address
        # `address` is a gRPC target: several replicas share the calls (round_robin, health-checked),
        # and an EncodeUsers caught by a replica's death is sent again to another (shared/channels.py).
        balanced = balanced_options(_SERVICE, ["EncodeUsers", "GetModels"])
        # a restarted user_service is used again within 2 s (every Retrieve needs it), not gRPC's 120 s
        self._channel = aio_channel(address, [*channel_options, *RECONNECT_OPTIONS, *balanced], tls)
        self._stub = user_tower_pb2_grpc.UserTowerStub(self._channel)
        self.reachable = False  # last known: user_service answered (health SERVING or a good call)

    async def close(self) -> None:
        await self._channel.close()

    async def encode(
        self, users: Sequence[UserContext], timeout: float, fingerprint: str = ""
    ) -> tuple[torch.Tensor, str]:
        """Embeddings [B, D] fp32 of B parsed users (one call, sent in columns) by the model of this
        fingerprint (empty: user_service's default) and the fingerprint of the model that made them."""
        request = user_tower_pb2.EncodeUsersRequest(
            batch=user_batch_to_proto(users), model_fingerprint=fingerprint
        )
        try:
            response = await self._stub.EncodeUsers(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._map_error(exc) from None
        self.reachable = True
        try:
            shape = (len(users), None)
            emb = codec.decode_torch(response.embeddings, "user embedding", _EMBEDDING_DTYPES, shape)
        except InvalidInput as exc:
            # user_service's fault, not the caller's: INVALID_ARGUMENT would say "fix your request".
            logger.warning("user_service at %s sent a malformed embedding: %s", self.address, exc)
            raise NotReady(f"user_service at {self.address} returned a malformed embedding: {exc}") from None
        return emb.float(), response.model.fingerprint

    def _map_error(self, exc: grpc.aio.AioRpcError) -> Exception:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(details)  # the user context broke a model limit (e.g. a feature id)
        if code == grpc.StatusCode.FAILED_PRECONDITION:  # the corpus's model is not loaded there
            return ModelMismatch(f"user_service at {self.address}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExpired(f"deadline passed while user_service encoded the user ({details})")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"user_service is overloaded: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            self.reachable = False
            return NotReady(f"user_service at {self.address} is unavailable: {details}")
        logger.warning("user_service EncodeUsers failed: %s %s", code.name, details)
        return NotReady(f"user_service at {self.address} failed to encode the user ({code.name})")

    async def probe(self, timeout: float) -> bool:
        """True when user_service reports SERVING; updates `reachable`."""
        self.reachable = await is_serving(self._channel, timeout)
        return self.reachable
