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
