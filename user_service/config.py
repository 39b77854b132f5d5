"""The one configuration dataclass of user_service; its fields declare the flags of __main__."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.model.features import DEFAULT_MAX_HISTORY_EVENTS
from shared.server.bootstrap import ServerOptions
from shared.server.settings import setting

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16")
CPU_TOWERS = ("onnx", "compile", "eager")


@dataclass(frozen=True)
class UserServiceConfig:
    """Each `setting` field is a flag of `python -m user_service` with env `USER_SERVICE_<FIELD>`
    (shared/server/settings.py); `port_file` and `server` come from the flags every service shares."""

    checkpoint: Path = field(
        metadata=setting(
            "checkpoint directory (model.safetensors + config.json)", env="TWOTOWER_CHECKPOINT", metavar="DIR"
        )
    )
    device: str = field(
        default="auto", metadata=setting("auto = cuda when present, else cpu", choices=DEVICES)
    )
    # fp32: weights and outputs float32 (DTYPE_FLOAT32 on the wire);
    # bf16: weights and outputs bfloat16 (DTYPE_BFLOAT16 on the wire, half the bytes).
    dtype: str = field(
        default="fp32",
        metadata=setting(
            "weights and returned embeddings: fp32 -> DTYPE_FLOAT32, bf16 -> DTYPE_BFLOAT16", choices=DTYPES
        ),
    )
    max_batch_size: int = field(default=64, metadata=setting("users per forward pass; 1 turns batching off"))
    # How long the first queued user waits for others to join its batch. 0 by default: under load,
    # users queue while the previous batch computes and the next batch takes them all, so a wait
    # only adds latency when the service is idle (bench: +3.8 ms per request at concurrency 1).
    max_wait_ms: float = field(
        default=0.0,
        metadata=setting(
            "how long a batch waits for more users after its first (0: batches still form from the users "
            "that queue while the previous batch computes)"
        ),
    )
    max_queue: int = field(
        default=1024, metadata=setting("users waiting for compute; beyond it calls get RESOURCE_EXHAUSTED")
    )
    max_users_per_call: int = field(
        default=256, metadata=setting("users in one EncodeUsers request; more is INVALID_ARGUMENT")
    )
    max_history_events: int = field(
        default=DEFAULT_MAX_HISTORY_EVENTS,
        metadata=setting("events accepted per user (only the last S reach the model); more is rejected"),
    )
    torch_threads: int | None = field(
        default=None,
        metadata=setting(
            "most intra-op threads of one batch, which uses as many as its size pays for "
            "(shared/threads.py); not given: torch's count (OMP_NUM_THREADS or the cores), within the "
            "CPU quota"
        ),
    )
    # cuda only: the user tower replays CUDA graphs captured per batch-size bucket (launch overhead of
    # a few hundred small kernels gone at small batches); ignored on cpu.
    cuda_graphs: bool = field(
        default=True,
        metadata=setting(
            "cuda: replay the user tower from CUDA graphs captured per batch size (1, 2, 4, ... max batch) "
            "instead of launching every op"
        ),
    )
    # cpu only: how the user tower runs. onnx (the default): its dense part on ONNX Runtime
    # (user_service/onnx_tower.py), 0.45 ms instead of 2.6-3.0 ms eager for one MovieLens user, fp32
    # only (bf16 runs eagerly); the export takes seconds at the first start per model and is cached.
    # compile: torch.compile, ~1 min of compiling per model, needs a C++ compiler. Any failure: eager.
    cpu_tower: str = field(
        default="onnx",
        metadata=setting(
            "cpu: how the user tower runs: onnx (ONNX Runtime, exported at the first start per model and "
            "cached), compile (torch.compile; about a minute per model, needs a C++ compiler) or eager",
            choices=CPU_TOWERS,
        ),
    )
    compile_user_tower: bool = field(  # kept for deployments that set it before --cpu-tower existed
        default=False, metadata=setting("same as --cpu-tower compile (kept for existing deployments)")
    )
    tower_cache_dir: Path | None = field(
        default=None,
        metadata=setting(
            "where exported ONNX user towers are cached (one file per model and library versions; "
            "rebuilt when missing or unreadable); not given: $XDG_CACHE_HOME/twotower/user-tower, "
            "else ~/.cache/twotower/user-tower",
            metavar="DIR",
        ),
    )
    port_file: Path | None = None  # the bound port is written here once listening
    # Model control (rollouts): the default model and the models held are recorded here, so that a
    # restart comes back on the rolled-out model. None: model control is refused.
    state_file: Path | None = field(
        default=None,
        metadata=setting(
            "JSON record of the models held and the default one (model control / rollouts need it; a "
            "restart comes back on the recorded models)",
            metavar="FILE",
        ),
    )
    max_models: int = field(default=2, metadata=setting("models held at once, two during a rollout"))
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.cpu_tower not in CPU_TOWERS:
            raise ValueError(f"cpu_tower must be one of {', '.join(CPU_TOWERS)}, got {self.cpu_tower!r}")
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

    @property
    def cpu_runtime(self) -> str:
        """cpu_tower, or "compile" where the older --compile-user-tower is set."""
        return "compile" if self.compile_user_tower else self.cpu_tower
