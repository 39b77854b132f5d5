"""`twotower rollout --checkpoint DIR`: move a running stack from its model (A) to another (B), with
no failed request; rolling back is the same command with A's checkpoint.

Steps (each waits for the previous one; a failure before step 3 leaves A serving everywhere):
 1. every user_service loads B beside A (LoadModel): both models answer, A stays the default;
 2. candidate_service encodes the current corpus with B in the background while A serves (upserts and
    deletes go on and are carried over), then switches: every gateway receives B's snapshot, builds it
    aside and swaps it in atomically; from then on each gateway asks user_service for B embeddings
    (a request caught in the switch starts over with B);
 3. wait until every gateway serves B's corpus;
 4. every user_service makes B its default and unloads A.
The checkpoint path is read by the services, on their own filesystems.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from shared.tls import ClientTLS, sync_channel
from twotower.v1 import (
    candidate_tower_pb2,
    candidate_tower_pb2_grpc,
    retrieval_gateway_pb2,
    retrieval_gateway_pb2_grpc,
    user_tower_pb2,
    user_tower_pb2_grpc,
)

Rollout = candidate_tower_pb2.RolloutStatus


class RolloutFailed(Exception):
    """The rollout stopped; the message says why and what is serving now."""


@dataclass(frozen=True)
class RolloutTargets:
    user_services: Sequence[str]
    candidate: str
    gateways: Sequence[str]


def run_rollout(
    checkpoint: str,
    targets: RolloutTargets,
    *,
    tls: ClientTLS | None = None,
    call_timeout_s: float = 60.0,
    encode_timeout_s: float = 3600.0,
    switch_timeout_s: float = 300.0,
    poll_s: float = 0.5,
    report: Callable[[str], None] = print,
) -> str:
    """Run the four steps; returns B's fingerprint. Raises RolloutFailed with the reason."""
    channels: dict[str, grpc.Channel] = {}

    def channel(address: str) -> grpc.Channel:
        if address not in channels:
            channels[address] = sync_channel(address, (), tls)
        return channels[address]

    try:
        users = [user_tower_pb2_grpc.UserTowerStub(channel(a)) for a in targets.user_services]
        candidate = candidate_tower_pb2_grpc.CandidateTowerStub(channel(targets.candidate))
        gateways = [retrieval_gateway_pb2_grpc.RetrievalGatewayStub(channel(a)) for a in targets.gateways]
        previous = [u.GetModels(user_tower_pb2.GetModelsRequest(), timeout=call_timeout_s) for u in users]

        # 1. user_service(s) load B beside A
        target = ""
        loaded_here: list[int] = []
        for i, (stub, address) in enumerate(zip(users, targets.user_services, strict=True)):
            try:
                status = stub.LoadModel(
                    user_tower_pb2.LoadModelRequest(checkpoint=checkpoint), timeout=call_timeout_s
                )
            except grpc.RpcError as exc:
                _unload(users, loaded_here, previous, target, call_timeout_s)
                raise RolloutFailed(f"user_service {address} cannot load {checkpoint}: {_why(exc)}") from None
            if target and status.loaded.fingerprint != target:
                _unload(users, loaded_here, previous, target, call_timeout_s)  # what the others loaded
                if status.loaded.fingerprint not in {m.fingerprint for m in previous[i].models}:
                    _unload(users, [i], previous, status.loaded.fingerprint, call_timeout_s)
                raise RolloutFailed(
                    f"user_service {address} read another model at {checkpoint} "
                    f"({status.loaded.fingerprint} != {target}): the services must see the same checkpoint"
                )
            target = status.loaded.fingerprint
            if target not in {m.fingerprint for m in previous[i].models}:
                loaded_here.append(i)
            report(f"user_service {address}: holds {target} beside {previous[i].default_fingerprint}")

        # 2. candidate_service encodes the corpus with B, then switches
        try:
            status = candidate.StartRollout(
                candidate_tower_pb2.StartRolloutRequest(checkpoint=checkpoint), timeout=call_timeout_s
            )
            status = _wait_encoded(candidate, status, encode_timeout_s, poll_s, call_timeout_s, report)
        except (grpc.RpcError, RolloutFailed) as exc:
            why = _why(exc) if isinstance(exc, grpc.RpcError) else str(exc)
            # B may be retired from user_service only once candidate_service can no longer switch to
            # it: a StartRollout that timed out here may be running there.
            settled = _settle(candidate, call_timeout_s, poll_s)
            if settled is not None and settled.state == Rollout.DONE and settled.active.fingerprint == target:
                status = settled  # it switched after all: carry on
            elif settled is not None and settled.state in _ENDED_WITHOUT_SWITCH:
                _unload(users, loaded_here, previous, target, call_timeout_s)
                raise RolloutFailed(
                    f"candidate_service did not switch to {target}: {why}; A still serves"
                ) from None
            else:
                raise RolloutFailed(
                    f"candidate_service did not confirm the rollout's end ({why}); it may still switch to "
                    f"{target}, so user_service keeps {target} loaded beside A: run the command again to "
                    "finish, or roll back with A's checkpoint"
                ) from None
        if status.active.fingerprint != target:
            _unload(users, loaded_here, previous, target, call_timeout_s)
            raise RolloutFailed(
                f"candidate_service switched to {status.active.fingerprint}, but user_service loaded "
                f"{target} from the same path: the services must see the same checkpoint"
            )
        report(f"candidate_service: corpus of {target} live from version {status.switched_at_version}")

        # 3. every gateway serves B's corpus
        deadline = time.monotonic() + switch_timeout_s
        for stub, address in zip(gateways, targets.gateways, strict=True):
            serving = "?"
            while True:
                with contextlib.suppress(grpc.RpcError):
                    serving = stub.GetStatus(
                        retrieval_gateway_pb2.GetStatusRequest(), timeout=call_timeout_s
                    ).model_fingerprint
                if serving == target:
                    break
                if time.monotonic() > deadline:
                    raise RolloutFailed(
                        f"gateway {address} still serves {serving} after {switch_timeout_s} s; user_service "
                        "keeps both models, so it keeps answering; rerun the command to finish"
                    )
                time.sleep(poll_s)
            report(f"gateway {address}: serving {target}")

        # 4. B becomes the default everywhere; A is retired
        for stub, address, before in zip(users, targets.user_services, previous, strict=True):
            stub.SetDefaultModel(user_tower_pb2.ModelRef(fingerprint=target), timeout=call_timeout_s)
            for model in before.models:
                if model.fingerprint != target:
                    stub.UnloadModel(
                        user_tower_pb2.ModelRef(fingerprint=model.fingerprint), timeout=call_timeout_s
                    )
            retired = [m.fingerprint for m in before.models if m.fingerprint != target]
            report(f"user_service {address}: default {target}, retired {retired}")
        return target
    finally:
        for ch in channels.values():
            ch.close()


def _wait_encoded(
    candidate, status: Rollout, timeout_s: float, poll_s: float, call_timeout_s: float, report
) -> Rollout:
    """Poll until the rollout ends. A status call that fails (a timeout, a brief network error) is
    retried: giving up then would retire B from user_service while candidate_service may still switch
    to it. Past `timeout_s` the rollout is aborted, unless it is already switching (then it ends DONE)."""
    deadline = time.monotonic() + timeout_s
    last, last_t, aborted = -1, 0.0, False
    while status.state == Rollout.ENCODING:
        if time.monotonic() > deadline and not aborted:
            aborted = True
            try:
                status = candidate.AbortRollout(
                    candidate_tower_pb2.AbortRolloutRequest(), timeout=call_timeout_s
                )
                continue
            except grpc.RpcError as exc:  # switching already: too late to abort, it ends DONE
                report(f"candidate_service: not aborted ({_why(exc)}); waiting for the rollout to end")
        # a line per tenth of the corpus or per 10 s, not per poll: a large corpus takes minutes
        step = max(1, status.items_total // 10)
        if status.items_encoded != last and (
            last < 0 or status.items_encoded >= last + step or time.monotonic() - last_t >= 10
        ):
            report(f"candidate_service: encoding with {status.target.fingerprint}: "
                   f"{status.items_encoded}/{status.items_total} items")  # fmt: skip
            last, last_t = status.items_encoded, time.monotonic()
        time.sleep(poll_s)
        try:
            status = candidate.GetRolloutStatus(
                candidate_tower_pb2.GetRolloutStatusRequest(), timeout=call_timeout_s
            )
        except grpc.RpcError as exc:
            if time.monotonic() > deadline + call_timeout_s:
                raise
            report(f"candidate_service: no status ({_why(exc)}); retrying")
    if status.state == Rollout.DONE:
        return status
    if aborted and status.state == Rollout.ABORTED:
        raise RolloutFailed(f"encoding took longer than {timeout_s} s; aborted")
    if status.state == Rollout.IDLE:
        raise RolloutFailed(
            f"candidate_service restarted during the rollout and serves {status.active.fingerprint}; "
            "run the command again"
        )
    raise RolloutFailed(f"rollout {Rollout.State.Name(status.state)}: {status.error or 'no reason given'}")


_ENDED_WITHOUT_SWITCH = (Rollout.FAILED, Rollout.ABORTED, Rollout.IDLE)


def _settle(candidate, call_timeout_s: float, poll_s: float, attempts: int = 3) -> Rollout | None:
    """candidate_service's rollout state once it can no longer change by itself: an ENCODING rollout
    is aborted first. None when candidate_service does not answer (the state is unknown)."""
    status = None
    for _ in range(attempts):
        try:
            status = candidate.GetRolloutStatus(
                candidate_tower_pb2.GetRolloutStatusRequest(), timeout=call_timeout_s
            )
            if status.state != Rollout.ENCODING:
                return status
            candidate.AbortRollout(candidate_tower_pb2.AbortRolloutRequest(), timeout=call_timeout_s)
        except grpc.RpcError:
            pass
        time.sleep(poll_s)
    return None


def _unload(users, indexes: Sequence[int], previous, fingerprint: str, timeout: float) -> None:
    """Undo step 1 where it loaded B (best effort: a service that is away keeps both models)."""
    for i in indexes:
        if fingerprint and previous[i].default_fingerprint != fingerprint:
            with contextlib.suppress(grpc.RpcError):
                users[i].UnloadModel(user_tower_pb2.ModelRef(fingerprint=fingerprint), timeout=timeout)


def _why(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"
