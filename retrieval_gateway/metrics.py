"""Prometheus metrics of the gateway (exposed with --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)

REQUESTS = Counter("twotower_gateway_requests_total", "Retrieve calls by outcome", ["outcome"])
LATENCY = Histogram(
    "twotower_gateway_latency_seconds",
    "Retrieve latency by stage: user_encode (user_service call), scoring (queue + matmul + top-k), total",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "twotower_gateway_batch_size", "Queries scored together", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_COMPUTE = Histogram(
    "twotower_gateway_batch_compute_seconds", "Matmul + top-k time of one batch", buckets=_LATENCY_BUCKETS
)
CORPUS_VERSION = Gauge("twotower_gateway_corpus_version", "Version of the corpus being served")
CORPUS_SIZE = Gauge("twotower_gateway_corpus_items", "Live items in the corpus being served")
FINGERPRINT_MISMATCH = Counter(
    "twotower_gateway_fingerprint_mismatch_total",
    "Retrieve calls refused because the user embedding's model differs from the corpus's",
)
SNAPSHOTS = Counter("twotower_gateway_snapshots_total", "Complete corpus snapshots swapped in")
DELTAS = Counter("twotower_gateway_deltas_total", "Corpus deltas applied in place")
RECONNECTS = Counter(
    "twotower_gateway_watch_reconnects_total", "WatchCorpus streams (re)opened after an error", ["reason"]
)
CANDIDATE_CONNECTED = Gauge("twotower_gateway_candidate_connected", "1 while watching candidate_service")
FOLLOWER_ERRORS = Counter(
    "twotower_gateway_follower_errors_total",
    "Unexpected corpus-follower failures (each followed by a fresh snapshot), by exception type",
    ["type"],
)
USER_CALLS_IN_FLIGHT = Gauge("twotower_gateway_user_calls_in_flight", "EncodeUsers calls now in flight")
MODEL_SWITCH_RETRIES = Counter(
    "twotower_gateway_model_switch_retries_total",
    "Retrieve calls restarted because the corpus moved to another model while they were in flight",
)
MODEL = Gauge(
    "twotower_gateway_model_info", "Model of the corpus being served (1), by fingerprint", ["fingerprint"]
)


_model = [""]  # the fingerprint MODEL shows (the corpus changes far more often than its model)


def set_model(fingerprint: str) -> None:
    if fingerprint != _model[0]:
        MODEL.clear()
        MODEL.labels(fingerprint).set(1)
        _model[0] = fingerprint
