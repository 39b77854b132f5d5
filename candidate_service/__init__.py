"""candidate_service: keeps the corpus of record (items in SQLite), encodes it once per model (embeddings
cached on disk), takes upserts and deletes, and streams snapshots and deltas to a bounded number of
gateways (WatchCorpus)."""
