"""The gateway's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from retrieval_gateway.index import DTYPES
from retrieval_gateway.topk import DEFAULT_MAX_SCORE_ELEMENTS
from shared.server.bootstrap import ServerOptions
from shared.tls import ClientTLS

DEFAULT_MAX_K = 2048
DEFAULT_MAX_EXCLUSIONS = 10_000  # per list (post ids, author ids), as documented in the proto
DEFAULT_MAX_HISTORY_EVENTS = 1024  # same limit as user_service: longer is INVALID_ARGUMENT here already


@dataclass(frozen=True)
class GatewayConfig:
    user_service: str  # HOST:PORT of user_service
    candidate_service: str  # HOST:PORT of candidate_service
    server: ServerOptions = field(default_factory=ServerOptions)
    device: str = "auto"  # auto = cuda when present, else cpu
    dtype: str = "fp32"  # corpus matrix storage: fp32 or bf16 (scores are always computed in fp32)
    # CPU, single queries: a torch.compile'd fused kernel instead of BLAS gemv (needs a C++ compiler;
    # compiles once, at the first snapshot). bf16 gains most (no widened copy). Off: torch.mm.
    fused_gemv: bool = False
    max_k: int = DEFAULT_MAX_K
    max_exclusions: int = DEFAULT_MAX_EXCLUSIONS
    max_history_events: int = DEFAULT_MAX_HISTORY_EVENTS
    max_batch_size: int = 32  # queries per matmul
    max_wait_ms: float = 0.0  # longest a query waits for others to join its batch (see user_service)
    # Longest a scoring batch stays open for requests on their way to it (at most half the last
    # batch's compute; 0 = never): merges cohorts of concurrent requests on expensive corpora.
    max_linger_ms: float = 100.0
    max_queue: int = 1024  # queued queries beyond this are RESOURCE_EXHAUSTED at once
    # EncodeUsers calls to user_service in flight at once (each carries up to max_batch_size users)
    max_user_calls_in_flight: int = 4
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS  # scores materialised at once (B x chunk)
    user_timeout_s: float = 5.0  # user_service call timeout when the caller sets no deadline
    max_corpus_items: int = 100_000_000  # a snapshot announcing more is refused (memory guard)
    reconnect_initial_s: float = 0.1  # WatchCorpus backoff: first wait, doubled per failure ...
    reconnect_max_s: float = 5.0  # ... up to this, with full jitter
    health_poll_s: float = 1.0  # how often user_service's health is checked
    port_file: str | None = None  # the bound port is written here once listening
    # TLS of the channels to user_service and candidate_service (None = plaintext); with a client cert
    # and key the gateway authenticates itself to towers that require mutual TLS.
    upstream_tls: ClientTLS | None = None

    def __post_init__(self) -> None:
        for name in ("user_service", "candidate_service"):
            if ":" not in getattr(self, name):
                raise ValueError(f"{name} must be HOST:PORT, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        positive = ("max_k", "max_batch_size", "max_queue", "max_score_elements", "max_corpus_items",
                    "max_history_events", "user_timeout_s", "max_user_calls_in_flight", "reconnect_initial_s",
                    "health_poll_s")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_exclusions < 0 or self.max_linger_ms < 0:
            raise ValueError("max_wait_ms, max_linger_ms and max_exclusions must be >= 0")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
