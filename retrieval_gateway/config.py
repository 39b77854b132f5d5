"""The gateway's configuration: one frozen dataclass, validated on construction; its fields declare the
flags and env vars of __main__."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval_gateway.index import DTYPES
from shared.model.features import DEFAULT_MAX_HISTORY_EVENTS  # user_service's default too
from shared.server.bootstrap import ServerOptions
from shared.server.settings import setting
from shared.tls import ClientTLS

DEFAULT_MAX_K = 2048
DEFAULT_MAX_EXCLUSIONS = 10_000  # per list (post ids, author ids), as documented in the proto


ROLES = ("single", "shard", "router")
TARGET_HELP = "gRPC target (HOST:PORT, dns:///name:port, ipv4:a:p,b:p, unix:/path)"


def check_grpc_target(name: str, target: str) -> None:
    """A gRPC target: HOST:PORT, dns:///name:port, ipv4:a:p,b:p, unix:/path ... (grpc resolves it).
    Every form has a ':'; a bare name would mean port 443, never what is meant here."""
    if not target or ":" not in target or any(c.isspace() for c in target):
        raise ValueError(
            f"{name} must be HOST:PORT or another gRPC target (dns:///name:port, ipv4:a:p,b:p, "
            f"unix:/path), got {target!r}"
        )


@dataclass(frozen=True)
class GatewayConfig:
    """Each `setting` field is a flag of `python -m retrieval_gateway` with env `GATEWAY_<FIELD>`
    (shared/server/settings.py); `port_file`, `server` and `upstream_tls` come from shared flags."""

    user_service: str = field(metadata=setting(f"{TARGET_HELP} of user_service", metavar="TARGET"))
    # Unused by a router (its shards watch the corpus), so only a router may leave it empty.
    candidate_service: str = field(
        default="",
        metadata=setting(
            f"{TARGET_HELP} of candidate_service; required unless --role router", metavar="TARGET"
        ),
    )
    server: ServerOptions = field(default_factory=ServerOptions)
    # single: today's gateway, the whole corpus. shard: scores its slice of the corpus (shard_index of
    # num_shards). router: fans a request out to shard_addresses (shard i at shard_addresses[i]) and
    # merges their top k.
    role: str = field(
        default="single",
        metadata=setting(
            "single: the whole corpus; shard: its slice (--shard-index of --num-shards); router: asks "
            "every --shard-addresses target and merges",
            choices=ROLES,
        ),
    )
    shard_index: int = field(
        default=0, metadata=setting("this shard's slice of the corpus, in [0, --num-shards) (role shard)")
    )
    num_shards: int = field(
        default=1,
        metadata=setting(
            "shards the corpus is split into (role shard; a router has one per --shard-addresses target)"
        ),
    )
    shard_addresses: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            "role router: the shards' gRPC targets, shard 0 first (required for a router only)",
            metavar="TARGET",
        ),
    )
    device: str = field(default="auto", metadata=setting("auto | cpu | cuda[:N]; auto = cuda when present"))
    dtype: str = field(
        default="auto",
        metadata=setting(
            "corpus matrix storage (scores are computed in fp32 either way); auto = bf16 on cuda, fp32 on "
            "cpu (docs/decisions.md)",
            choices=("auto", *DTYPES),
        ),
    )
    # CPU, single queries: a torch.compile'd fused kernel instead of BLAS gemv (needs a C++ compiler;
    # compiles once, at the first snapshot). bf16 gains most (no widened copy). Off: torch.mm.
    fused_gemv: bool = field(
        default=False,
        metadata=setting("CPU: compile a fused kernel for single queries (needs a C++ compiler)"),
    )
    torch_threads: int | None = field(
        default=None,
        metadata=setting(
            "CPU: most intra-op threads of one scoring batch, which uses as many as its size pays for "
            "(shared/threads.py); not given: torch's count (OMP_NUM_THREADS or the cores), within the "
            "CPU quota"
        ),
    )
    max_k: int = field(default=DEFAULT_MAX_K, metadata=setting("largest k accepted"))
    max_exclusions: int = field(
        default=DEFAULT_MAX_EXCLUSIONS, metadata=setting("ids per exclusion list (posts, authors)")
    )
    max_history_events: int = field(
        default=DEFAULT_MAX_HISTORY_EVENTS,
        metadata=setting("history events per Retrieve; more is INVALID_ARGUMENT"),
    )
    max_batch_size: int = field(default=32, metadata=setting("queries per matmul"))
    # 0 by default for the reason given in user_service/config.py
    max_wait_ms: float = field(
        default=0.0,
        metadata=setting(
            "how long a batch waits for more queries after its first (0: batches form from what queues "
            "while the previous batch runs)"
        ),
    )
    # Longest a scoring batch stays open for requests on their way to it (at most half the last
    # batch's compute; 0 = never): merges cohorts of concurrent requests on expensive corpora.
    max_linger_ms: float = field(
        default=100.0,
        metadata=setting(
            "longest a scoring batch stays open for requests on their way to it, at most half the last "
            "batch's compute; 0 = never"
        ),
    )
    max_queue: int = field(
        default=1024, metadata=setting("queries waiting for scoring; beyond it calls get RESOURCE_EXHAUSTED")
    )
    max_user_calls_in_flight: int = field(
        default=2,
        metadata=setting(
            "EncodeUsers calls to user_service in flight at once, each carrying up to --max-batch-size users"
        ),
    )
    # scores materialised at once (B x chunk); None = per device (topk.DEVICE_MAX_SCORE_ELEMENTS: 16 MiB
    # on cpu, 1 GiB on cuda, where a loop of small chunks costs more than the memory)
    max_score_elements: int | None = None
    user_timeout_s: float = field(
        default=5.0, metadata=setting("user_service call timeout when the caller sets no deadline")
    )
    max_corpus_items: int = field(
        default=100_000_000,
        metadata=setting("a corpus snapshot announcing more items is refused (memory guard)"),
    )
    # WatchCorpus backoff: the first wait, doubled per failure up to reconnect_max_s, with full jitter.
    reconnect_initial_s: float = 0.1
    reconnect_max_s: float = field(
        default=5.0, metadata=setting("longest wait between WatchCorpus reconnects")
    )
    health_poll_s: float = 1.0  # how often user_service's health is checked
    port_file: Path | None = None  # the bound port is written here once listening
    # TLS of the channels to user_service and candidate_service (None = plaintext); with a client cert
    # and key the gateway authenticates itself to towers that require mutual TLS.
    upstream_tls: ClientTLS | None = None

    def __post_init__(self) -> None:
        check_grpc_target("user_service", self.user_service)
        if self.candidate_service or self.role != "router":
            check_grpc_target("candidate_service", self.candidate_service)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"shard_index must be in [0, num_shards={self.num_shards}), got {self.shard_index}"
            )
        if self.role == "router":
            if not self.shard_addresses:
                raise ValueError("role router needs shard_addresses (one gRPC target per shard)")
            for i, target in enumerate(self.shard_addresses):
                check_grpc_target(f"shard_addresses[{i}]", target)
            if self.num_shards not in (1, len(self.shard_addresses)):
                raise ValueError(
                    f"num_shards ({self.num_shards}) must match the {len(self.shard_addresses)} "
                    "shard_addresses of a router"
                )
        elif self.shard_addresses:
            raise ValueError(f"shard_addresses are for role router, not {self.role!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.max_score_elements is not None and self.max_score_elements <= 0:
            raise ValueError(f"max_score_elements must be > 0, got {self.max_score_elements}")
        positive = ("max_k", "max_batch_size", "max_queue", "max_corpus_items",
                    "max_history_events", "user_timeout_s", "max_user_calls_in_flight", "reconnect_initial_s",
                    "health_poll_s")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_exclusions < 0 or self.max_linger_ms < 0:
            raise ValueError("max_wait_ms, max_linger_ms and max_exclusions must be >= 0")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
