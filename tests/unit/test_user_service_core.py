"""user_service core without grpc: config limits, the encoder, and the micro-batched EncodingService."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from shared.device import resolve_device
from shared.errors import CheckpointError, DeadlineExpired, InvalidInput, NotReady, Overloaded
from shared.model.checkpoint import load_checkpoint
from shared.model.features import UserContext, featurize_users
from shared.threads import INTRA_OP
from user_service.__main__ import config_from_args, parse_args
from user_service.config import UserServiceConfig
from user_service.encoder import UserEncoder
from user_service.service import EncodingService


def _user(uid: int, n: int = 3) -> UserContext:
    return UserContext.build(uid, post_ids=[uid * 10 + i for i in range(1, n + 1)],
                             actions=[[i % 19] for i in range(n)])  # fmt: skip


def _reference(model, contexts) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_users(featurize_users(contexts, model.config))


class RecordingEncoder(UserEncoder):
    """A real encoder that records each batch's user ids and can be held at a gate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[int]] = []
        self.fail_ids: set[int] = set()  # a batch holding one of these users raises

    def encode(self, contexts):
        self.batches.append([c.user_id for c in contexts])
        assert self.gate.wait(10), "test gate never opened"
        if self.fail_ids & {c.user_id for c in contexts}:
            raise RuntimeError("injected failure")
        return super().encode(contexts)


@pytest.fixture
def encoder(tiny_checkpoint) -> RecordingEncoder:
    loaded = load_checkpoint(tiny_checkpoint)
    return RecordingEncoder(loaded.model, loaded.fingerprint, torch.device("cpu"), torch.float32, 1024)


def _service(**overrides) -> EncodingService:
    options = dict(max_batch_size=64, max_wait_s=0.0, max_queue=64, max_users_per_call=8) | overrides
    return EncodingService(**options)


async def _until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


# -- config and CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("device", "tpu"), ("dtype", "fp16"), ("max_batch_size", 0), ("max_queue", 0), ("max_wait_ms", -1),
     ("max_users_per_call", 0), ("max_history_events", 0), ("torch_threads", 0)],
)  # fmt: skip
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        UserServiceConfig(checkpoint=Path("x"), **{field: value})


def test_config_needs_queue_room_for_the_largest_call():
    with pytest.raises(ValueError, match="max_queue"):
        UserServiceConfig(checkpoint=Path("x"), max_queue=10, max_users_per_call=11)


def test_cli_flags_and_env_fallbacks(monkeypatch):
    monkeypatch.setenv("TWOTOWER_CHECKPOINT", "/ckpt")
    monkeypatch.setenv("USER_SERVICE_MAX_BATCH_SIZE", "8")
    config = config_from_args(parse_args(["--dtype", "bf16", "--max-wait-ms", "0.5", "--port", "0"]))
    assert config.checkpoint == Path("/ckpt") and config.max_batch_size == 8 and config.dtype == "bf16"
    assert config.max_wait_ms == 0.5 and config.server.port == 0 and config.server.metrics_port is None
    monkeypatch.setenv("USER_SERVICE_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit):
        parse_args([])


# -- encoder ---------------------------------------------------------------------------------------
def test_encoder_matches_the_model_and_keeps_the_last_s_events(encoder, tiny_model):
    s = tiny_model.config.history_len
    long_user, short_user = _user(3, n=s + 5), _user(4, n=2)
    got = encoder.encode([long_user, short_user])
    assert got.shape == (2, tiny_model.config.emb_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(tiny_model, [long_user, short_user]), atol=1e-5, rtol=1e-5)
    last_s = UserContext.build(3, post_ids=long_user.post_ids[-s:].tolist(),
                               actions=[[i % 19] for i in range(5, s + 5)])  # fmt: skip
    torch.testing.assert_close(got[:1], encoder.encode([last_s]), atol=1e-6, rtol=1e-6)


def test_bf16_encoder_returns_bf16_close_to_fp32(tiny_checkpoint, tiny_model):
    loaded = load_checkpoint(tiny_checkpoint)
    bf16 = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.bfloat16, 1024)
    got = bf16.encode([_user(5)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _reference(tiny_model, [_user(5)]), atol=3e-2, rtol=0)


def test_a_small_batch_runs_the_tower_on_one_thread(tiny_checkpoint, tiny_model, monkeypatch):
    """shared/threads.py: the batch's largest matmul decides; one user's is far below a thread's work."""
    loaded = load_checkpoint(tiny_checkpoint)
    cpu = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.float32, 1024)
    asked: list[int] = []
    monkeypatch.setattr(INTRA_OP, "limit", 4)
    monkeypatch.setattr(INTRA_OP, "use_for", lambda work: asked.append(INTRA_OP.threads_for(work)))
    cfg = tiny_model.config
    monkeypatch.setattr("shared.threads.WORK_PER_THREAD", (1 + cfg.history_len) * cfg.emb_dim * cfg.ffn_dim)
    cpu.encode([_user(1)])
    cpu.encode([_user(i) for i in range(1, 4)])  # three users: three threads' worth
    cpu.encode([_user(i) for i in range(1, 9)])  # eight: capped at the limit
    assert asked == [1, 3, 4]


def test_warm_up_runs_each_batch_size(encoder):
    encoder.warm_up([1, 4])
    assert [len(b) for b in encoder.batches] == [1, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_startup_error():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(CheckpointError, match="no CUDA device"):
        resolve_device("cuda")


# -- EncodingService ---------------------------------------------------------------------------------
def test_not_ready_until_an_encoder_is_set(encoder):
    async def main():
        service = _service()
        service.start()
        try:
            with pytest.raises(NotReady, match="loading"):
                await service.encode([_user(1)])
            service.set_encoder(encoder)
            out, identity = await service.encode([_user(1)])
            assert out.shape == (1, encoder.config.emb_dim) and identity == encoder.identity
        finally:
            await service.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("n, message", [(0, "empty"), (9, "9 users in one call; the limit is 8")])
def test_call_size_limits(n, message):
    with pytest.raises(InvalidInput, match=message):
        _service().check_call_size(n)


def test_queued_callers_are_coalesced_and_each_gets_its_row(encoder, tiny_model):
    async def main():
        service = _service()
        service.set_encoder(encoder)
        service.start()
        try:
            encoder.gate.clear()
            first = asyncio.ensure_future(service.encode([_user(1)]))
            await _until(lambda: encoder.batches == [[1]])  # the worker holds user 1 at the gate
            others = [asyncio.ensure_future(service.encode([_user(u)])) for u in (2, 3, 4, 5)]
            await _until(lambda: service.queued == 4)
            encoder.gate.set()
            results = await asyncio.gather(first, *others)
        finally:
            encoder.gate.set()
            await service.stop()
        assert encoder.batches == [[1], [2, 3, 4, 5]]
        assert service.stats.sizes == [1, 4]
        for uid, (row, _) in zip((1, 2, 3, 4, 5), results, strict=True):
            torch.testing.assert_close(row, _reference(tiny_model, [_user(uid)]), atol=1e-5, rtol=1e-5)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_big_call_is_split_into_batches_and_reassembled_in_order(encoder, tiny_model):
    async def main():
        service = _service(max_batch_size=2)
        service.set_encoder(encoder)
        service.start()
        try:
            users = [_user(u) for u in (11, 12, 13, 14, 15)]
            out, _ = await service.encode(users)
        finally:
            await service.stop()
        assert max(len(b) for b in encoder.batches) == 2 and [u for b in encoder.batches for u in b] == [
            11,
            12,
            13,
            14,
            15,
        ]
        torch.testing.assert_close(out, _reference(tiny_model, users), atol=1e-5, rtol=1e-5)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_full_queue_rejects_the_whole_call_at_once(encoder):
    async def main():
        service = _service(max_batch_size=1, max_queue=3, max_users_per_call=3)
        service.set_encoder(encoder)
        service.start()
        try:
            encoder.gate.clear()
            held = asyncio.ensure_future(service.encode([_user(1)]))
            await _until(lambda: encoder.batches == [[1]])
            queued = asyncio.ensure_future(service.encode([_user(2), _user(3)]))
            await _until(lambda: service.queued == 2)
            with pytest.raises(Overloaded, match="queue is full"):
                await service.encode([_user(4), _user(5)])  # 2 + 2 > 3: none of it is queued
            assert service.queued == 2
            encoder.gate.set()
            await asyncio.gather(held, queued)
        finally:
            encoder.gate.set()
            await service.stop()
        assert [u for b in encoder.batches for u in b] == [1, 2, 3]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_expired_users_are_dropped_before_compute_and_the_rest_of_the_call_cancelled(encoder):
    async def main():
        service = _service(max_batch_size=1)
        service.set_encoder(encoder)
        service.start()
        loop = asyncio.get_running_loop()
        try:
            encoder.gate.clear()
            held = asyncio.ensure_future(service.encode([_user(1)]))
            await _until(lambda: encoder.batches == [[1]])
            late = asyncio.ensure_future(service.encode([_user(2), _user(3)], deadline=loop.time() + 0.05))
            await asyncio.sleep(0.1)  # the deadline passes while user 1 holds the worker
            encoder.gate.set()
            await held
            with pytest.raises(DeadlineExpired):
                await late
            after = asyncio.ensure_future(service.encode([_user(4)]))
            await after
        finally:
            encoder.gate.set()
            await service.stop()
        assert encoder.batches == [[1], [4]]  # neither user 2 nor user 3 cost a forward pass
        assert service.stats.expired >= 1

    asyncio.run(asyncio.wait_for(main(), 30))


def test_when_one_user_of_a_call_fails_its_queued_siblings_are_cancelled(encoder):
    async def main():
        service = _service(max_batch_size=1)
        service.set_encoder(encoder)
        service.start()
        encoder.fail_ids = {2}
        try:
            encoder.gate.clear()
            held = asyncio.ensure_future(service.encode([_user(1)]))
            await _until(lambda: encoder.batches == [[1]])
            call = asyncio.ensure_future(service.encode([_user(u) for u in (2, 3, 4, 5)]))
            await _until(lambda: service.queued == 4)
            encoder.gate.set()
            await held
            with pytest.raises(RuntimeError, match="injected"):
                await call
            await service.encode([_user(6)])  # the worker is past whatever it had already collected
        finally:
            encoder.gate.set()
            await service.stop()
        computed = [u for b in encoder.batches for u in b]
        # user 3 may already be in the worker's hands when user 2 fails; 4 and 5 must never be computed
        assert computed[:2] == [1, 2] and computed[-1] == 6 and not {4, 5} & set(computed)

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.cuda
def test_cuda_encoder_matches_cpu(tiny_checkpoint, tiny_model):
    loaded = load_checkpoint(tiny_checkpoint)
    gpu = UserEncoder.from_loaded(loaded, torch.device("cuda"), torch.float32, 1024)
    got = gpu.encode([_user(1), _user(2, n=12)])
    assert got.device.type == "cpu"  # results always come back to the host for the codec
    torch.testing.assert_close(got, _reference(tiny_model, [_user(1), _user(2, n=12)]), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_tower_matches_eager_for_every_bucket_and_above(tiny_checkpoint, tiny_model):
    loaded = load_checkpoint(tiny_checkpoint)
    gpu = UserEncoder.from_loaded(loaded, torch.device("cuda"), torch.float32, 1024, cuda_graph_max_batch=8)
    gpu.warm_up([1, 8])
    assert gpu.cuda_graphs  # captured, and the warm-up's own check found graphs == eager
    # sizes inside buckets, on bucket edges, above the largest bucket (eager), then small again: a
    # replay must not see a previous, bigger batch's rows
    for b in (1, 3, 4, 5, 8, 11, 2):
        users = [_user(i + 1, n=1 + (i * 5) % 20) for i in range(b)]
        torch.testing.assert_close(gpu.encode(users), _reference(tiny_model, users), atol=1e-4, rtol=1e-4)


def test_cuda_graph_buckets_are_powers_of_two_then_the_maximum():
    from user_service.cuda_graphs import buckets_up_to

    assert buckets_up_to(1) == [1]
    assert buckets_up_to(8) == [1, 2, 4, 8]
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_up_to(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_cuda_graph_option_is_ignored_on_cpu(tiny_checkpoint, tiny_model):
    loaded = load_checkpoint(tiny_checkpoint)
    cpu = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.float32, 1024, cuda_graph_max_batch=8)
    cpu.warm_up([1])
    assert not cpu.cuda_graphs
    users = [_user(1), _user(2, n=12)]
    torch.testing.assert_close(cpu.encode(users), _reference(tiny_model, users), atol=1e-5, rtol=1e-5)


class _FakeCompiled:
    """Stands in for torch.compile (seconds per shape): the eager tower, or a wrong or failing one."""

    calls = 0

    def __init__(self, model, mode="eager"):
        self.model, self.mode = model, mode

    def encode_users(self, features, threads=1):
        type(self).calls += 1
        if self.mode == "raise":
            raise RuntimeError("no C++ compiler")
        out = self.model.encode_users(features)
        return out + 1.0 if self.mode == "wrong" else out


@pytest.mark.parametrize("mode", ["eager", "wrong", "raise"])
def test_compiled_tower_serves_only_when_it_matches_eager(tiny_checkpoint, tiny_model, monkeypatch, mode):
    from user_service import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "CompiledUserTower", lambda model: _FakeCompiled(model, mode))
    _FakeCompiled.calls = 0
    loaded = load_checkpoint(tiny_checkpoint)
    cpu = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.float32, 1024, cpu_tower="compile")
    cpu.warm_up([1, 8])  # compiles and checks B = 1, 2, 8 against eager
    assert (cpu._fast is not None) == (mode == "eager")
    assert cpu.runtime == ("compile" if mode == "eager" else "eager")
    before = _FakeCompiled.calls
    users = [_user(1), _user(2, n=12)]
    torch.testing.assert_close(cpu.encode(users), _reference(tiny_model, users), atol=1e-5, rtol=1e-5)
    assert (_FakeCompiled.calls > before) == (mode == "eager")  # requests go through it only if it matched


def test_the_library_encoder_is_eager_and_the_service_runs_onnx_by_default(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    encoder = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.float32, 1024)
    encoder.warm_up([1])
    assert encoder.runtime == "eager" and encoder._fast is None
    assert UserServiceConfig(checkpoint=Path("x")).cpu_tower == "onnx"


@pytest.mark.slow
def test_real_torch_compile_matches_eager(tiny_checkpoint, tiny_model):
    loaded = load_checkpoint(tiny_checkpoint)
    cpu = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.float32, 1024, cpu_tower="compile")
    cpu.warm_up([1])
    assert cpu._fast is not None
    for b in (1, 3, 5):
        users = [_user(i + 1, n=1 + 3 * i) for i in range(b)]
        torch.testing.assert_close(cpu.encode(users), _reference(tiny_model, users), atol=1e-5, rtol=1e-5)


def test_a_compiled_tower_failing_while_serving_falls_back_to_eager(tiny_checkpoint, tiny_model, monkeypatch):
    from user_service import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "CompiledUserTower", lambda model: _FakeCompiled(model, "eager"))
    loaded = load_checkpoint(tiny_checkpoint)
    cpu = UserEncoder.from_loaded(loaded, torch.device("cpu"), torch.float32, 1024, cpu_tower="compile")
    cpu.warm_up([1])
    cpu._fast.mode = "raise"  # e.g. a recompile for a new batch size fails
    users = [_user(1), _user(2, n=12), _user(3)]
    torch.testing.assert_close(cpu.encode(users), _reference(tiny_model, users), atol=1e-5, rtol=1e-5)
    assert cpu._fast is None and cpu.runtime == "eager"
