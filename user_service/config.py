"""The one configuration dataclass of user_service (built by __main__ from flags and env vars)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.model.features import DEFAULT_MAX_HISTORY_EVENTS
from shared.server.bootstrap import ServerOptions

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class UserServiceConfig:
    checkpoint: Path  # checkpoint directory (model.safetensors + config.json)
    device: str = "auto"  # auto = cuda when present, else cpu
    # fp32: weights and outputs float32 (DTYPE_FLOAT32 on the wire);
    # bf16: weights and outputs bfloat16 (DTYPE_BFLOAT16 on the wire, half the bytes).
    dtype: str = "fp32"
    max_batch_size: int = 64  # users per forward pass (1 = batching off)
    # How long the first queued user waits for others to join its batch. 0 by default: under load,
    # users queue while the previous batch computes and the next batch takes them all, so a wait
    # only adds latency when the service is idle (bench: +3.8 ms per request at concurrency 1).
    max_wait_ms: float = 0.0
    max_queue: int = 1024  # users waiting for a forward pass; beyond it callers get RESOURCE_EXHAUSTED
    max_users_per_call: int = 256  # users in one EncodeUsers request (proto: max_batch_users)
    max_history_events: int = DEFAULT_MAX_HISTORY_EVENTS  # per user; more is INVALID_ARGUMENT
    torch_threads: int | None = None  # torch intra-op threads; None = torch's default
    # cuda only: the user tower replays CUDA graphs captured per batch-size bucket (launch overhead of
    # a few hundred small kernels gone at small batches); ignored on cpu.
    cuda_graphs: bool = True
    port_file: Path | None = None  # the bound port is written here once listening
    # Model control (rollouts): the default model and the models held are recorded here, so that a
    # restart comes back on the rolled-out model. None: model control is refused.
    state_file: Path | None = None
    max_models: int = 2  # models held at once (two during a rollout)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_queue", "max_users_per_call", "max_history_events", "max_models"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < self.max_users_per_call:
            # A call is admitted whole or not at all, so a bigger call could never be admitted.
            raise ValueError(
                f"max_queue ({self.max_queue}) must be >= max_users_per_call ({self.max_users_per_call})"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
