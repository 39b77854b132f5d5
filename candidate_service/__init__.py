"""candidate_service: encodes the corpus once per model, caches it on disk, takes upserts and deletes,
and streams snapshots and deltas to any number of gateways (WatchCorpus)."""
