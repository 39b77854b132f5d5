"""CandidateTower servicer: validate -> convert -> delegate to CandidateCore -> convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np

from candidate_service import convert
from candidate_service.corpus import CandidateCore
from candidate_service.watch import SnapshotPart
from shared import codec
from shared.convert import item_columns_from_proto
from twotower.v1 import candidate_tower_pb2 as pb
from twotower.v1 import candidate_tower_pb2_grpc, common_pb2


class CandidateTowerServicer(candidate_tower_pb2_grpc.CandidateTowerServicer):
    def __init__(self, core: CandidateCore) -> None:
        self.core = core

    async def EncodeItems(self, request: pb.EncodeItemsRequest, context: grpc.aio.ServicerContext):
        post_ids, author_ids, _ = item_columns_from_proto(request.items, self.core.config.max_batch_items)
        embeddings, encoder = await self.core.encode(post_ids, author_ids)
        return pb.EncodeItemsResponse(
            embeddings=codec.encode(embeddings),
            model=common_pb2.ModelInfo(fingerprint=encoder.fingerprint, embedding_dim=encoder.dim),
        )

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.aio.ServicerContext):
        post_ids, author_ids, attributes = item_columns_from_proto(
            request.items, self.core.config.max_batch_items
        )
        result = await self.core.upsert(post_ids, author_ids, [a or None for a in attributes])
        return pb.UpsertItemsResponse(
            version=result.version, inserted=result.inserted, updated=result.updated
        )

    async def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.aio.ServicerContext):
        post_ids = np.fromiter(request.post_ids, dtype=np.int64, count=len(request.post_ids))
        result = await self.core.delete(post_ids)
        return pb.DeleteItemsResponse(
            version=result.version, deleted=result.deleted, unknown_post_ids=result.unknown_post_ids
        )

    async def GetCorpusInfo(self, request: pb.GetCorpusInfoRequest, context: grpc.aio.ServicerContext):
        return convert.corpus_info(self.core.info())

    async def WatchCorpus(
        self, request: pb.WatchCorpusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CorpusEvent]:
        # Registered before the headers (NotReady while loading, Overloaded past --max-watchers); headers
        # now, not with the first event: a watcher that is up to date gets no event for a while and must
        # still know that the stream is established.
        with self.core.watch(request.known_version, request.known_fingerprint) as events:
            await context.send_initial_metadata(())
            async for event in events:
                yield (
                    convert.snapshot_event(event) if isinstance(event, SnapshotPart) else convert.delta_event(event)
                )

    async def StartRollout(self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext):
        return convert.rollout_status(await self.core.start_rollout(request.checkpoint))

    async def GetRolloutStatus(self, request: pb.GetRolloutStatusRequest, context: grpc.aio.ServicerContext):
        return convert.rollout_status(self.core.rollout_status())

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: grpc.aio.ServicerContext):
        return convert.rollout_status(await self.core.abort_rollout())
