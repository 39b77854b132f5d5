"""retrieval_gateway server: bind -> start (NOT_SERVING) -> follow corpus + probe user_service
(SERVING when both are there) -> graceful stop."""

from __future__ import annotations

import logging

import grpc

from retrieval_gateway.config import GatewayConfig
from retrieval_gateway.gateway import Gateway
from retrieval_gateway.servicer import RetrievalGatewayServicer, ShardScorerServicer
from shared.server.bootstrap import create_grpc_server, graceful_stop
from shared.server.lifecycle import run_until_signal
from shared.threads import INTRA_OP
from twotower.v1 import retrieval_gateway_pb2, retrieval_gateway_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = retrieval_gateway_pb2.DESCRIPTOR.services_by_name["RetrievalGateway"].full_name
SHARD_SERVICE_NAME = retrieval_gateway_pb2.DESCRIPTOR.services_by_name["ShardScorer"].full_name


class GatewayServer:
    """The grpc server plus the gateway's background work; in-process tests drive it on port 0."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.gateway = Gateway(config)
        servicer = RetrievalGatewayServicer(self.gateway)
        shard_servicer = ShardScorerServicer(self.gateway)

        def register(server: grpc.aio.Server) -> None:
            retrieval_gateway_pb2_grpc.add_RetrievalGatewayServicer_to_server(servicer, server)
            if config.role == "shard":
                retrieval_gateway_pb2_grpc.add_ShardScorerServicer_to_server(shard_servicer, server)

        names = [SERVICE_NAME, SHARD_SERVICE_NAME] if config.role == "shard" else [SERVICE_NAME]
        self.server, self.port, self.health = create_grpc_server(config.server, names, register)
        servicer.health = self.health

    async def start(self) -> None:
        # grpc's HealthServicer answers SERVING for "" until told otherwise: say NOT_SERVING first.
        await self.health.set_serving(False)
        await self.server.start()
        self.gateway.start(self.health)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish, then stop the background work."""
        grace = self.config.server.grace_seconds if grace_seconds is None else grace_seconds
        await graceful_stop(self.server, self.health, grace)
        await self.gateway.stop()


def create_server(config: GatewayConfig) -> tuple[grpc.aio.Server, int, GatewayServer]:
    """Build (not start) the server; returns the grpc server, the bound port and the lifecycle object."""
    app = GatewayServer(config)
    return app.server, app.port, app


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT."""
    INTRA_OP.configure(config.torch_threads)
    _server, port, app = create_server(config)
    logger.info(
        "retrieval_gateway: device %s, %s; user_service %s, candidate_service %s",
        app.gateway.device, config.dtype, config.user_service, config.candidate_service,
    )  # fmt: skip
    await run_until_signal("retrieval_gateway", app, port, config.server, config.port_file)
