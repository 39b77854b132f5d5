"""RetrievalGateway servicer: thin (validate -> convert -> delegate -> convert)."""

from __future__ import annotations

import grpc

from retrieval_gateway.convert import result_to_proto, retrieve_spec_from_proto, status_to_proto
from retrieval_gateway.gateway import Gateway
from retrieval_gateway.shard_client import queries_from_request, score_response
from shared.server.bootstrap import Health
from twotower.v1 import retrieval_gateway_pb2, retrieval_gateway_pb2_grpc


class RetrievalGatewayServicer(retrieval_gateway_pb2_grpc.RetrievalGatewayServicer):
    def __init__(self, gateway: Gateway, health: Health | None = None) -> None:
        self.gateway = gateway
        self.health = health  # set once the server exists (the servicer is registered before)

    async def Retrieve(
        self, request: retrieval_gateway_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_gateway_pb2.RetrieveResponse:
        gateway, cfg, remaining = self.gateway, self.gateway.config, context.time_remaining()
        with gateway.request_outcome():
            spec = retrieve_spec_from_proto(request, cfg.max_k, cfg.max_exclusions, cfg.max_history_events)
            result = await gateway.retrieve(spec, remaining)
        return result_to_proto(result)

    async def GetStatus(
        self, request: retrieval_gateway_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_gateway_pb2.GatewayStatus:
        return status_to_proto(self.gateway.status(serving=self.health is not None and self.health.serving))


class ShardScorerServicer(retrieval_gateway_pb2_grpc.ShardScorerServicer):
    """What a router asks a shard (--role shard): thin, like the client-facing servicer."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ScoreShard(
        self, request: retrieval_gateway_pb2.ScoreShardRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_gateway_pb2.ScoreShardResponse:
        queries = queries_from_request(request, self.gateway.config.max_k)
        results, version, fingerprint = await self.gateway.score_shard(
            queries, request.shard_index, request.num_shards
        )
        return score_response(results, self.gateway.config.shard_index, version, fingerprint)
