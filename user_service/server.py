"""user_service server: bind -> start (health NOT_SERVING) -> load + warm up (SERVING) -> graceful stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from shared.server.bootstrap import create_grpc_server, graceful_stop
from shared.server.lifecycle import run_until_signal
from shared.threads import INTRA_OP
from twotower.v1 import user_tower_pb2, user_tower_pb2_grpc
from user_service.config import UserServiceConfig
from user_service.encoder import UserEncoder, load_encoder
from user_service.models import ModelControl, ModelRegistry
from user_service.onnx_tower import default_cache_dir
from user_service.service import EncodingService
from user_service.servicer import UserTowerServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = user_tower_pb2.DESCRIPTOR.services_by_name["UserTower"].full_name

EncoderFactory = Callable[[UserServiceConfig], UserEncoder]


def default_encoder_factory(config: UserServiceConfig) -> UserEncoder:
    return load_encoder(
        str(config.checkpoint), config.device, config.dtype, config.max_history_events,
        config.max_batch_size if config.cuda_graphs else 0, config.cpu_runtime,
        config.tower_cache_dir or default_cache_dir(),
    )  # fmt: skip


class UserServer:
    """The gRPC server plus the state readiness needs; in-process tests drive it on port 0.

    `load_encoder` is injectable so tests can slow or gate the model; it runs on a worker thread."""

    def __init__(self, config: UserServiceConfig, load_encoder: EncoderFactory = default_encoder_factory):
        self.config = config
        self._load_encoder = load_encoder
        self.models = ModelRegistry(config.max_models, config.state_file)
        self.service = EncodingService(
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            max_users_per_call=config.max_users_per_call,
            models=self.models,
        )
        servicer = UserTowerServicer(self.service, ModelControl(self.models, self._load_warm))
        self.server, self.port, self.health = create_grpc_server(
            config.server,
            [SERVICE_NAME],
            lambda s: user_tower_pb2_grpc.add_UserTowerServicer_to_server(servicer, s),
        )

    async def start(self) -> None:
        """Listen at once (health answers NOT_SERVING, EncodeUsers UNAVAILABLE) while loading."""
        # grpc's HealthServicer answers SERVING for "" until told otherwise: say NOT_SERVING first.
        await self.health.set_serving(False)
        self.service.start()
        await self.server.start()

    def _load_warm(self, checkpoint: str) -> UserEncoder:
        """Load one checkpoint and run the warm-up (blocking: called on a worker thread)."""
        encoder = self._load_encoder(dataclasses.replace(self.config, checkpoint=Path(checkpoint)))
        encoder.warm_up(sorted({1, self.config.max_batch_size}))
        return encoder

    async def load(self) -> None:
        """Load the model(s) (--checkpoint, or what the state file records) and warm them up off the
        event loop, then report SERVING."""
        await asyncio.to_thread(self.models.start, str(self.config.checkpoint), self._load_warm)
        await self.health.set_serving(True)
        logger.info("user tower ready on port %d, default model %s", self.port, self.models.identities()[1])

    async def stop(self, grace_seconds: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish (the batcher keeps running until the
        grace period ends), then stop the batcher."""
        grace = self.config.server.grace_seconds if grace_seconds is None else grace_seconds
        await graceful_stop(self.server, self.health, grace)
        await self.service.stop()


def create_server(
    config: UserServiceConfig, load_encoder: EncoderFactory = default_encoder_factory
) -> tuple[grpc.aio.Server, int, UserServer]:
    """Build (not start) the server; returns the grpc server, the bound port and the lifecycle object."""
    app = UserServer(config, load_encoder)
    return app.server, app.port, app


async def serve(config: UserServiceConfig) -> None:
    """Run until SIGTERM/SIGINT. Raises CheckpointError (after stopping) if the model cannot load."""
    INTRA_OP.configure(config.torch_threads)
    _server, port, app = create_server(config)
    await run_until_signal("user_service", app, port, config.server, config.port_file, app.load())
