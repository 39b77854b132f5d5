"""CandidateTower servicer: validate -> convert -> delegate to CandidateCore -> convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from candidate_service import convert
from candidate_service.corpus import CandidateCore
from candidate_service.watch import SnapshotPart
from twotower.v1 import candidate_tower_pb2 as pb
from twotower.v1 import candidate_tower_pb2_grpc


class CandidateTowerServicer(candidate_tower_pb2_grpc.CandidateTowerServicer):
    def __init__(self, core: CandidateCore) -> None:
        self.core = core

    async def EncodeItems(self, request: pb.EncodeItemsRequest, context: grpc.aio.ServicerContext):
        post_ids, author_ids, _ = convert.item_columns_from_proto(
            request.items, self.core.config.max_batch_items
        )
        embeddings, encoder = await self.core.encode(post_ids, author_ids)
        return convert.encode_response_to_proto(embeddings, encoder)

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.aio.ServicerContext):
        post_ids, author_ids, attributes = convert.item_columns_from_proto(
            request.items, self.core.config.max_batch_items
        )
        result = await self.core.upsert(post_ids, author_ids, [a or None for a in attributes])
        return convert.upsert_result_to_proto(result)

    async def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.aio.ServicerContext):
        result = await self.core.delete(convert.post_ids_from_proto(request))
        return convert.delete_result_to_proto(result)

    async def GetCorpusInfo(self, request: pb.GetCorpusInfoRequest, context: grpc.aio.ServicerContext):
        return convert.corpus_summary_to_proto(self.core.info())

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
                    convert.snapshot_part_to_proto(event)
                    if isinstance(event, SnapshotPart)
                    else convert.delta_to_proto(event)
                )

    async def StartRollout(self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext):
        return convert.rollout_status_to_proto(await self.core.start_rollout(request.checkpoint))

    async def GetRolloutStatus(self, request: pb.GetRolloutStatusRequest, context: grpc.aio.ServicerContext):
        return convert.rollout_status_to_proto(self.core.rollout_status())

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: grpc.aio.ServicerContext):
        return convert.rollout_status_to_proto(await self.core.abort_rollout())
