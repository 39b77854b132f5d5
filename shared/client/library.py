"""`TwoTowerClient`: retrieve from the gateway, change the corpus, read status (health: shared/health.py).

    from shared.client import HistoryEvent, TwoTowerClient

    with TwoTowerClient(gateway="127.0.0.1:50051", candidate="127.0.0.1:50053") as client:
        result = client.retrieve(user_id=42, history=[HistoryEvent(post_id=50, actions=("favorite",))], k=10)
        for item in result.items:
            print(item.post_id, item.score, item.attributes.get("title"))
        client.upsert([{"post_id": 5000, "attributes": {"title": "New movie"}}])

Errors come back as `grpc.RpcError` with the server's status code and message.

TLS: pass `tls=ClientTLS(ca=Path("ca.pem"))` to verify the servers, plus `cert=` and `key=` for
servers that require client certificates (mutual TLS); the same settings are used for both addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from shared.channels import balanced_options
from shared.server.bootstrap import DEFAULT_MAX_MESSAGE_BYTES
from shared.tls import ClientTLS, sync_channel
from twotower.v1 import (
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    common_pb2,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
)

_GATEWAY = retrieval_gateway_pb2.DESCRIPTOR.services_by_name["RetrievalGateway"].full_name
_CANDIDATE = candidate_tower_pb2.DESCRIPTOR.services_by_name["CandidateTower"].full_name


@dataclass(frozen=True)
class HistoryEvent:
    post_id: int
    author_id: int = 0
    actions: Sequence[str | int] = ()  # action names ("favorite") or ids (0..18)
    product_surface: int = 0
    timestamp_ms: int = 0

    def to_proto(self) -> common_pb2.Engagement:
        return common_pb2.Engagement(
            post_id=self.post_id,
            author_id=self.author_id,
            action_names=[a for a in self.actions if isinstance(a, str)],
            action_ids=[a for a in self.actions if not isinstance(a, str)],
            product_surface=self.product_surface,
            timestamp_ms=self.timestamp_ms,
        )


@dataclass(frozen=True)
class RetrievedItem:
    post_id: int
    author_id: int
    score: float
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrieveResult:
    items: list[RetrievedItem]
    corpus_version: int
    model_fingerprint: str


def _item_proto(item: Mapping | common_pb2.Item) -> common_pb2.Item:
    if isinstance(item, common_pb2.Item):
        return item
    return common_pb2.Item(
        post_id=int(item["post_id"]),
        author_id=int(item.get("author_id", 0)),
        attributes={str(k): str(v) for k, v in (item.get("attributes") or {}).items()},
    )


class TwoTowerClient:
    """Blocking client. `gateway` is needed for retrieve/status, `candidate` for upsert/delete."""

    def __init__(
        self,
        gateway: str | None = "127.0.0.1:50051",
        candidate: str | None = None,
        timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: ClientTLS | None = None,
    ) -> None:
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channels: dict[str, grpc.Channel] = {}
        # Addresses are gRPC targets (several gateways: `dns:///gateway:50051`, `ipv4:a:p,b:p`): calls
        # are spread round_robin and the reads are retried on another backend when one goes away
        # (shared/channels.py). Writes are not retried: the caller decides. Retrieve goes only to
        # gateways that report SERVING; status calls reach any (a NOT_SERVING gateway is the one whose
        # status tells why), and so do candidate_service's calls (one writer of record).
        balanced = {
            "gateway": balanced_options(_GATEWAY, ["Retrieve", "GetStatus"]),
            "gateway-status": balanced_options(_GATEWAY, ["GetStatus"], health_check=False),
            "candidate": balanced_options(
                _CANDIDATE, ["GetCorpusInfo", "GetRolloutStatus"], health_check=False
            ),
        }
        for name, address in (("gateway", gateway), ("gateway-status", gateway), ("candidate", candidate)):
            if address:
                self._channels[name] = sync_channel(address, [*options, *balanced[name]], tls)

    def _channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            raise ValueError(f"no {name} address was given to TwoTowerClient")
        return self._channels[name]

    def retrieve(
        self,
        user_id: int,
        history: Iterable[HistoryEvent] = (),
        k: int = 10,
        exclude_post_ids: Iterable[int] = (),
        exclude_history: bool = False,
        exclude_author_ids: Iterable[int] = (),
        user_features: Iterable[int] = (),
    ) -> RetrieveResult:
        stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(self._channel("gateway"))
        request = retrieval_gateway_pb2.RetrieveRequest(
            user=common_pb2.UserContext(
                user_id=user_id, history=[e.to_proto() for e in history], user_features=list(user_features)
            ),
            k=k,
            exclude_post_ids=list(exclude_post_ids),
            exclude_history=exclude_history,
            exclude_author_ids=list(exclude_author_ids),
        )
        response = stub.Retrieve(request, timeout=self.timeout)
        return RetrieveResult(
            items=[
                RetrievedItem(it.post_id, it.author_id, it.score, dict(it.attributes))
                for it in response.items
            ],
            corpus_version=response.corpus_version,
            model_fingerprint=response.model_fingerprint,
        )

    def upsert(self, items: Iterable[Mapping | common_pb2.Item]) -> candidate_tower_pb2.UpsertItemsResponse:
        stub = candidate_tower_pb2_grpc.CandidateTowerStub(self._channel("candidate"))
        request = candidate_tower_pb2.UpsertItemsRequest(items=[_item_proto(it) for it in items])
        return stub.UpsertItems(request, timeout=self.timeout)

    def delete(self, post_ids: Iterable[int]) -> candidate_tower_pb2.DeleteItemsResponse:
        stub = candidate_tower_pb2_grpc.CandidateTowerStub(self._channel("candidate"))
        request = candidate_tower_pb2.DeleteItemsRequest(post_ids=list(post_ids))
        return stub.DeleteItems(request, timeout=self.timeout)

    def corpus_info(self) -> candidate_tower_pb2.CorpusInfo:
        stub = candidate_tower_pb2_grpc.CandidateTowerStub(self._channel("candidate"))
        return stub.GetCorpusInfo(candidate_tower_pb2.GetCorpusInfoRequest(), timeout=self.timeout)

    def gateway_status(self) -> retrieval_gateway_pb2.GatewayStatus:
        stub = retrieval_gateway_pb2_grpc.RetrievalGatewayStub(self._channel("gateway-status"))
        return stub.GetStatus(retrieval_gateway_pb2.GetStatusRequest(), timeout=self.timeout)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> TwoTowerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
