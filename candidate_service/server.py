"""candidate_service server: bind -> start (NOT_SERVING) -> load model + corpus (SERVING) -> graceful stop
-> close the item store.

Loading runs on a worker thread after the server listens, so health can be probed while a large corpus
is encoded; EncodeItems works as soon as the model is loaded, the corpus RPCs once the corpus is.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from candidate_service.config import CandidateConfig
from candidate_service.corpus import CandidateCore
from candidate_service.item_store import SqliteItemStore
from candidate_service.loading import StoreOpener
from candidate_service.servicer import CandidateTowerServicer
from shared.server.bootstrap import create_grpc_server, graceful_stop
from shared.server.lifecycle import run_until_signal
from twotower.v1 import candidate_tower_pb2, candidate_tower_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = candidate_tower_pb2.DESCRIPTOR.services_by_name["CandidateTower"].full_name


class CandidateServer:
    """The gRPC server plus the core and its readiness; in-process tests drive it on port 0."""

    def __init__(self, config: CandidateConfig, open_store: StoreOpener = SqliteItemStore.open) -> None:
        self.config = config
        self.core = CandidateCore(config, open_store)
        servicer = CandidateTowerServicer(self.core)
        self.server, self.port, self.health = create_grpc_server(
            config.server,
            [SERVICE_NAME],
            lambda s: candidate_tower_pb2_grpc.add_CandidateTowerServicer_to_server(servicer, s),
        )

    async def start(self) -> None:
        # grpc's HealthServicer answers SERVING for "" until told otherwise: say NOT_SERVING first.
        await self.health.set_serving(False)
        await self.server.start()

    async def load(self) -> None:
        """Load the model, then load or build the corpus (off the event loop), then report SERVING."""
        await asyncio.to_thread(self.core.load_model)
        await asyncio.to_thread(self.core.load_corpus)
        await self.health.set_serving(True)
        info = self.core.info()
        logger.info(
            "candidate corpus ready on port %d: %d items, version %d, model %s",
            self.port, info.num_items, info.version, info.fingerprint,
        )  # fmt: skip

    async def stop(self, grace_seconds: float | None = None) -> None:
        grace = self.config.server.grace_seconds if grace_seconds is None else grace_seconds
        self.core.request_stop()  # watch streams end now rather than at the end of the grace period
        await graceful_stop(self.server, self.health, grace)
        await self.core.aclose()


def create_server(
    config: CandidateConfig, open_store: StoreOpener = SqliteItemStore.open
) -> tuple[grpc.aio.Server, int, CandidateServer]:
    """Build (not start) the server; returns the grpc server, the bound port and the lifecycle object.
    `open_store` opens the item store (tests inject faults through it)."""
    app = CandidateServer(config, open_store)
    return app.server, app.port, app


async def serve(config: CandidateConfig) -> None:
    """Run until SIGTERM/SIGINT. A load failure (checkpoint, item store, items file) is re-raised after
    stopping."""
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    _server, port, app = create_server(config)
    await run_until_signal("candidate_service", app, port, config.server, config.port_file, app.load())
