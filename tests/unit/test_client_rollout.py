"""The rollout driver's wait for candidate_service (shared/client/rollout.py `_wait_encoded`) against a
scripted stub: a failed status call is retried (giving up would retire B while candidate_service may
still switch to it), a timeout aborts unless the switch is under way, and a restart is named."""

from __future__ import annotations

import grpc
import pytest

from shared.client.rollout import Rollout, RolloutFailed, _wait_encoded
from twotower.v1 import common_pb2, user_tower_pb2


class Unavailable(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, details: str = "down") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def status(state, encoded: int = 0, error: str = "") -> Rollout:
    a, b = common_pb2.ModelInfo(fingerprint="a"), common_pb2.ModelInfo(fingerprint="b")
    return Rollout(state=state, items_encoded=encoded, items_total=10, error=error, active=a, target=b)


class Candidate:
    """Answers GetRolloutStatus and AbortRollout from scripts (an exception in a script is raised)."""

    def __init__(self, statuses: list, aborts: list | None = None) -> None:
        self.statuses, self.aborts = list(statuses), list(aborts or [])
        self.abort_calls = 0

    def GetRolloutStatus(self, request, timeout):
        return self._next(self.statuses)

    def AbortRollout(self, request, timeout):
        self.abort_calls += 1
        return self._next(self.aborts)

    @staticmethod
    def _next(script: list):
        item = script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def wait(candidate: Candidate, timeout_s: float = 60.0) -> tuple[Rollout, list[str]]:
    lines: list[str] = []
    done = _wait_encoded(candidate, status(Rollout.ENCODING), timeout_s, 0.0, 1.0, lines.append)
    return done, lines


def test_a_failed_status_call_is_retried_until_the_rollout_ends():
    candidate = Candidate(
        [Unavailable(), status(Rollout.ENCODING, 5), Unavailable(), status(Rollout.DONE, 10)]
    )
    done, lines = wait(candidate)
    assert done.state == Rollout.DONE and candidate.statuses == []
    assert sum("no status (UNAVAILABLE: down); retrying" in line for line in lines) == 2


def test_past_the_timeout_the_rollout_is_aborted():
    candidate = Candidate([], aborts=[status(Rollout.ABORTED, error="aborted by AbortRollout")])
    with pytest.raises(RolloutFailed, match=r"took longer than 0\.0 s; aborted"):
        wait(candidate, timeout_s=0.0)
    assert candidate.abort_calls == 1


def test_a_refused_abort_waits_for_the_switch_to_finish():
    too_late = Unavailable(grpc.StatusCode.FAILED_PRECONDITION, "the rollout is switching")
    candidate = Candidate([status(Rollout.ENCODING, 10), status(Rollout.DONE, 10)], aborts=[too_late])
    done, lines = wait(candidate, timeout_s=0.0)
    assert done.state == Rollout.DONE and candidate.abort_calls == 1
    assert any("not aborted (FAILED_PRECONDITION: the rollout is switching)" in line for line in lines)


@pytest.mark.parametrize(
    ("final", "message"),
    [
        (status(Rollout.FAILED, error="MemoryError: no room; model a still serves"), "FAILED: MemoryError"),
        (status(Rollout.IDLE), "restarted during the rollout and serves a"),
    ],
)
def test_a_rollout_that_ends_otherwise_says_why(final, message):
    with pytest.raises(RolloutFailed, match=message):
        wait(Candidate([final]))


# ---- run_rollout: what user_service keeps when the rollout stops early -----------------------------
class FakeUsers:
    def __init__(self, loads: str, held: tuple[str, ...] = ("a",)) -> None:
        self.loads, self.held, self.unloaded = loads, held, []

    def GetModels(self, request, timeout):
        models = [common_pb2.ModelInfo(fingerprint=f) for f in self.held]
        return user_tower_pb2.ModelsStatus(models=models, default_fingerprint=self.held[0])

    def LoadModel(self, request, timeout):
        return user_tower_pb2.ModelsStatus(loaded=common_pb2.ModelInfo(fingerprint=self.loads))

    def UnloadModel(self, request, timeout):
        self.unloaded.append(request.fingerprint)


class FakeCandidate(Candidate):
    def __init__(self, start, statuses: list, aborts: list | None = None) -> None:
        super().__init__(statuses, aborts)
        self.start = start

    def StartRollout(self, request, timeout):
        return self._next([self.start])


def _drive(monkeypatch, users: list[FakeUsers], candidate: FakeCandidate) -> str:
    import shared.client.rollout as rollout

    class Channel:
        def close(self) -> None:
            pass

    queue = list(users)
    monkeypatch.setattr(rollout, "sync_channel", lambda *a, **k: Channel())
    monkeypatch.setattr(rollout.user_tower_pb2_grpc, "UserTowerStub", lambda ch: queue.pop(0))
    monkeypatch.setattr(rollout.candidate_tower_pb2_grpc, "CandidateTowerStub", lambda ch: candidate)
    targets = rollout.RolloutTargets([f"u{i}:1" for i in range(len(users))], "c:1", [])
    with pytest.raises(RolloutFailed) as info:
        rollout.run_rollout("/ckpt", targets, poll_s=0.0, report=lambda line: None)
    return str(info.value)


def test_b_is_retired_only_once_candidate_service_cannot_switch_to_it(monkeypatch):
    # StartRollout timed out here but runs there: abort it, and retire B only once it is ABORTED
    users = FakeUsers("b")
    statuses = [status(Rollout.ENCODING), status(Rollout.ABORTED)]
    timed_out = Unavailable(grpc.StatusCode.DEADLINE_EXCEEDED)
    candidate = FakeCandidate(timed_out, statuses, [status(Rollout.ABORTED)])
    assert "A still serves" in _drive(monkeypatch, [users], candidate)
    assert candidate.abort_calls == 1 and users.unloaded == ["b"]


def test_b_stays_loaded_while_candidate_service_state_is_unknown(monkeypatch):
    users = FakeUsers("b")
    candidate = FakeCandidate(Unavailable(), [Unavailable()] * 3)
    assert "run the command again" in _drive(monkeypatch, [users], candidate)
    assert users.unloaded == []  # candidate_service may still switch to B


def test_replicas_that_read_different_models_each_unload_what_they_loaded(monkeypatch):
    first, second = FakeUsers("b"), FakeUsers("c")
    message = _drive(monkeypatch, [first, second], FakeCandidate(None, []))
    assert "must see the same checkpoint" in message
    assert first.unloaded == ["b"] and second.unloaded == ["c"]
