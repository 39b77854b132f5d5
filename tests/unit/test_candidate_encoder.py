"""ItemEncoder's progress: a labelled encode (the corpus on a cold cache, a rollout) logs tqdm progress
lines through the service's logger, the last one with the count, rate and time left; an unlabelled
one (a write's few items) logs nothing; a corpus read from the cache encodes nothing and logs no bar."""

from __future__ import annotations

import logging

import numpy as np

from candidate_service.embedding_cache import CachedEmbeddings, cache_file, write_cache
from candidate_service.encoder import ItemEncoder
from candidate_service.loading import derive_embeddings
from shared.model.checkpoint import load_checkpoint

LOGGER = "candidate_service.encoder"
N = 40


def _ids(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    post_ids = np.arange(1, n + 1, dtype=np.int64)
    return post_ids, post_ids % 5


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_labelled_encode_logs_its_progress_through_the_service_logger(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    encoder = ItemEncoder(load_checkpoint(tiny_checkpoint), batch_size=8)
    done: list[int] = []
    out = encoder.encode(*_ids(), label="corpus (abc)", progress=done.append)
    assert out.shape == (N, encoder.dim) and done == [8, 16, 24, 32, 40]  # the callback is unchanged
    *_, last = _lines(caplog)
    assert last.startswith(f"corpus (abc) encoded: {N}/{N} (100%) in ")
    assert "item/s" in last and last.endswith(" left")


def test_an_unlabelled_encode_logs_nothing(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    ItemEncoder(load_checkpoint(tiny_checkpoint), batch_size=8).encode(*_ids())
    assert _lines(caplog) == []


def test_only_a_cold_cache_shows_encoding_progress(tiny_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    encoder = ItemEncoder(load_checkpoint(tiny_checkpoint), batch_size=16)
    post_ids, author_ids = _ids()
    cold = derive_embeddings(post_ids, author_ids, 1, encoder, tmp_path)
    (line,) = _lines(caplog)
    assert line.startswith(f"corpus ({encoder.fingerprint}) encoded: {N}/{N} (100%)")
    caplog.clear()
    cached = CachedEmbeddings(1, post_ids, author_ids, cold.embeddings)
    write_cache(cache_file(tmp_path, encoder.fingerprint), encoder.fingerprint, cached)
    warm = derive_embeddings(post_ids, author_ids, 1, encoder, tmp_path)
    assert warm.from_cache == N and _lines(caplog) == []
