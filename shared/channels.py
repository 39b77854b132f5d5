"""Channel options that spread calls over every backend a gRPC target resolves to.

An address flag is a gRPC target: `HOST:PORT`, `dns:///user-service:50052` (every A record, e.g. a
Kubernetes headless Service), `ipv4:127.0.0.1:5001,127.0.0.1:5002`, `unix:/path`. gRPC resolves it and
the service config below does the rest, with nothing home-made:

- `round_robin` over every resolved backend (gRPC's default, pick_first, would send everything to one);
- per-backend health checking (`grpc.health.v1` Watch of the server's overall status): a backend that reports
  NOT_SERVING (loading a model, draining on SIGTERM) gets no new calls until it is SERVING again;
- retries of UNAVAILABLE for the idempotent methods named by the caller (a replica killed while a
  call was on its way: the call goes to another one), with gRPC's own retry throttling.

See https://github.com/grpc/grpc/blob/master/doc/service_config.md and doc/health-checking.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

MAX_ATTEMPTS = 3  # one call and two retries on another backend
_HEALTH = "grpc.health.v1.Health"
# gRPC's reconnect backoff grows to 120 s by default: a backend back from an outage (a restarted shard
# or replica) would wait up to two minutes for its clients to try it again. Capped for the callers that
# must use it again within seconds (measured: a shard down 30 s was used again 17 s after it was back).
RECONNECT_OPTIONS: list[tuple[str, object]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def service_config(service: str, idempotent_methods: Sequence[str] = (), health_check: bool = True) -> str:
    """The JSON service config for calls to `service` (full name, e.g. twotower.v1.UserTower)."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        # "": the server as a whole, which every server of this project reports (with its own service
        # name); a server that does not implement grpc.health.v1 at all counts as healthy.
        config["healthCheckConfig"] = {"serviceName": ""}
    # grpc.health.v1 Check is retried too: it is idempotent, and it is how callers probe a target (a
    # gateway's readiness asks user_service). A probe caught by one replica's death must not report the
    # whole target down while the others serve (measured: of ~3,000 probes from 8 concurrent probers,
    # 2-4 in flight at a replica's SIGKILL failed; one such probe turns a gateway NOT_SERVING).
    names = [{"service": service, "method": m} for m in idempotent_methods]
    config["methodConfig"] = [
        {
            "name": [*names, {"service": _HEALTH, "method": "Check"}],
            "retryPolicy": {
                "maxAttempts": MAX_ATTEMPTS,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
    # A burst of failures must not turn into a storm of retries: gRPC stops retrying while more than
    # half of the token bucket is spent (each failure costs 1 token, each success gives 0.1).
    config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.1}
    return json.dumps(config, separators=(",", ":"))


def balanced_options(
    service: str, idempotent_methods: Sequence[str] = (), health_check: bool = True
) -> list[tuple[str, object]]:
    """Channel options: the service config above, retries on. health_check=False where a backend's
    own health must not gate the channel (the corpus stream: candidate_service is one writer, and
    the follower has its own reconnect and resync logic)."""
    return [
        ("grpc.service_config", service_config(service, idempotent_methods, health_check)),
        ("grpc.enable_retries", 1),
    ]
