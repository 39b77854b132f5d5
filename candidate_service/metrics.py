"""Prometheus metrics of candidate_service (module-level collectors, registered once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ITEMS = Gauge("candidate_corpus_items", "Live items in the corpus")
VERSION = Gauge("candidate_corpus_version", "Current corpus version")
WATCHERS = Gauge("candidate_watchers", "Open WatchCorpus streams")
ENCODE_SECONDS = Histogram(
    "candidate_encode_seconds",
    "Time of one candidate-tower forward pass (featurize + model)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
ENCODED_ITEMS = Counter("candidate_encoded_items_total", "Items encoded (rate() = throughput)")
ENCODE_THROUGHPUT = Gauge("candidate_encode_items_per_second", "Throughput of the last forward pass")
SNAPSHOTS_SENT = Counter("candidate_snapshots_sent_total", "Full snapshots streamed to watchers")
WATCHER_RESYNCS = Counter("candidate_watcher_resyncs_total", "Fresh snapshots because a watcher fell behind")
WATCHERS_REFUSED = Counter("candidate_watchers_refused_total", "WatchCorpus streams refused (--max-watchers)")
CHANGES_SINCE_CACHE = Gauge(
    "candidate_changes_since_cache",
    "Committed changes not yet in the embeddings cache (re-encoded at a start); -1 = no usable cache file",
)
STORE_WRITE_FAILURES = Counter(
    "candidate_store_write_failures_total",
    "Writes to the item store that failed (nothing applied)",
    ["error"],
)


def observe_encode(items: int, seconds: float) -> None:
    ENCODE_SECONDS.observe(seconds)
    ENCODED_ITEMS.inc(items)
    if seconds > 0:
        ENCODE_THROUGHPUT.set(items / seconds)


# Models and rollouts: which fingerprint is served (role="active") and which one a rollout encodes
# (role="rollout_target", while it runs); the rollout's state (1 for the current one), progress and
# the duration of each step of the last rollout.
MODEL = Gauge("candidate_model_info", "Models held (1), by fingerprint and role", ["fingerprint", "role"])
ROLLOUT_STATE = Gauge("candidate_rollout_state", "1 for the state the last rollout is in", ["state"])
ROLLOUT_ITEMS_ENCODED = Gauge("candidate_rollout_items_encoded", "Items the new model has encoded")
ROLLOUT_ITEMS_TOTAL = Gauge("candidate_rollout_items_total", "Items the new model has to encode")
ROLLOUT_STEP_SECONDS = Gauge(
    "candidate_rollout_step_seconds",
    "Duration of each step of the last rollout (load, encode, catch_up, switch: the write path held)",
    ["step"],
)
ROLLOUTS = Counter("candidate_rollouts_total", "Rollouts that ended, by outcome", ["outcome"])


def set_models(active: str, target: str | None = None) -> None:
    MODEL.clear()
    MODEL.labels(active, "active").set(1)
    if target:
        MODEL.labels(target, "rollout_target").set(1)


def set_rollout_state(state: str, states: list[str]) -> None:
    for name in states:
        ROLLOUT_STATE.labels(name).set(1 if name == state else 0)
