"""Prometheus metrics of user_service. RPC counts and errors by status code come from the shared
interceptor (`twotower_rpc_total{method, code}`); these add what only the batcher sees."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.batching import BatchReport

USERS = Counter("twotower_user_encode_users_total", "Users accepted for encoding (all calls)")
BATCH_SIZE = Histogram(
    "twotower_user_batch_size",
    "Users per forward pass of the user tower",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
QUEUE_WAIT = Histogram(
    "twotower_user_queue_wait_seconds",
    "Wait of the oldest user of a batch between queueing and the start of its forward pass",
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
COMPUTE = Histogram(
    "twotower_user_compute_seconds",
    "Featurization + forward pass time of one batch",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)

MODELS = Gauge(
    "twotower_user_model_info",
    'Models held (1), by fingerprint; default="true" for the one requests without a fingerprint get; '
    "runtime: how its tower runs (onnx, compile, cuda-graphs or eager)",
    ["fingerprint", "default", "runtime"],
)


def set_models(runtimes: dict[str, str], default: str) -> None:
    """runtimes: fingerprint -> runtime of every model held."""
    MODELS.clear()
    for fingerprint, runtime in runtimes.items():
        MODELS.labels(fingerprint, "true" if fingerprint == default else "false", runtime).set(1)


def observe_batch(report: BatchReport) -> None:
    """MicroBatcher's on_batch hook (runs on the event loop, after each forward pass)."""
    BATCH_SIZE.observe(report.size)
    QUEUE_WAIT.observe(report.queue_wait_s)
    COMPUTE.observe(report.compute_s)
