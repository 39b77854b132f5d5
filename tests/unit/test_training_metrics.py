"""Metric functions against hand-computed cases, the shared top-k and the baselines on tiny data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.data import MovieLens, Ratings
from training.dataset import build_timelines, split
from training.evaluate import (
    Catalog,
    ItemKNNScorer,
    PopularityScorer,
    evaluate,
    format_table,
    metrics_from_ranks,
    ndcg_at_k,
    recall_at_k,
    target_ranks,
    top_k,
)


def test_target_ranks():
    top = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    assert target_ranks(top, np.array([3, 9, 6])).tolist() == [1, -1, 2]


def test_recall_by_hand():
    ranks = np.array([0, 9, 10, 49, -1])
    assert recall_at_k(ranks, 10) == pytest.approx(2 / 5)
    assert recall_at_k(ranks, 50) == pytest.approx(4 / 5)
    assert recall_at_k(ranks, 1) == pytest.approx(1 / 5)
    assert recall_at_k(np.zeros(0, dtype=np.int64), 10) == 0.0


def test_ndcg_by_hand():
    ranks = np.array([0, 1, 3, 10, -1])  # gains 1, 1/log2(3), 1/log2(5), 0 (outside 10), 0
    expected = (1 + 1 / math.log2(3) + 1 / math.log2(5)) / 5
    assert ndcg_at_k(ranks, 10) == pytest.approx(expected)
    assert ndcg_at_k(np.array([0, 0]), 10) == pytest.approx(1.0)
    assert ndcg_at_k(np.array([-1]), 10) == 0.0
    assert set(metrics_from_ranks(ranks)) == {"recall@10", "recall@50", "recall@100", "ndcg@10"}


def test_top_k_ranks_by_dot_product_and_never_returns_excluded():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corpus = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    exclude = torch.zeros(2, 4, dtype=torch.bool)
    assert top_k(users, corpus, 2, exclude).tolist() == [[3, 0], [2, 1]]
    exclude[0, 3] = True
    exclude[1, 2] = True
    assert top_k(users, corpus, 3, exclude).tolist() == [[0, 1, 2], [1, 0, 3]]
    assert top_k(users, corpus, 10, exclude).shape == (2, 4)  # k larger than the corpus


def _data(rows, n_items):
    u, i, r, t = (np.asarray(c) for c in zip(*rows, strict=True))
    ratings = Ratings(u.astype(np.int64), i.astype(np.int64), r.astype(np.float32), t.astype(np.int64))
    return MovieLens(ratings=ratings, movies=(), users={}, digests={}), Catalog(np.arange(1, n_items + 1))


def test_popularity_counts_training_events_only():
    # user 1: 1(5) 2(5) 3(5) 4(5): val target 3, test target 4 -> training events 1, 2
    # user 2: 2(5) 5(3) 5 never again -> all training; user 3: 2(5) 1(2) -> all training
    # users 4, 5: item 5 (3) -> item 5 is the most popular of the movies user 1 has not seen
    rows = [(1, i, 5, i) for i in (1, 2, 3, 4)] + [(2, 2, 5, 1), (2, 3, 3, 2), (3, 2, 5, 1), (3, 1, 2, 2)]
    rows += [(4, 5, 3, 1), (5, 5, 3, 1)]
    data, catalog = _data(rows, 5)
    s = split(build_timelines(data, 19))
    pop = PopularityScorer(s, catalog)
    assert pop.corpus()[:, 0].tolist() == [2, 3, 1, 0, 2]  # user 1's items 3 and 4 are targets: not counted
    # validation (user 1, target 3, history {1, 2} masked): ranking 5 (2), 3 (1), 4 (0) -> rank 1
    m = evaluate(pop, s, s.validation, catalog)
    assert m["recall@10"] == 1.0 and m["ndcg@10"] == pytest.approx(1 / math.log2(3))
    # test (target 4, history {1, 2, 3} masked): ranking 5 (2), 4 (0) -> rank 1 as well
    assert evaluate(pop, s, s.test, catalog)["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_item_knn_cosine_and_last_items():
    # training co-occurrence: users A{1,2}, B{1,2,3}, C{3,4}
    rows = [(10, 1, 3, 1), (10, 2, 3, 2), (11, 1, 3, 1), (11, 2, 3, 2), (11, 3, 3, 3), (12, 3, 3, 1)]
    rows += [(12, 4, 3, 2)]
    data, catalog = _data(rows, 4)
    s = split(build_timelines(data, 19))  # nobody has 3 positives: all events train
    sim = ItemKNNScorer(s, catalog).corpus()
    # |1|=2, |2|=2, |3|=2, |4|=1; co(1,2)=2 -> 1.0; co(1,3)=1 -> 0.5; co(3,4)=1 -> 1/sqrt(2)
    assert sim[0, 1].item() == pytest.approx(1.0)
    assert sim[0, 2].item() == pytest.approx(0.5)
    assert sim[2, 3].item() == pytest.approx(1 / math.sqrt(2))
    assert sim[0, 3].item() == 0.0 and sim[0, 0].item() == 0.0
    assert torch.equal(sim, sim.T)


def test_format_table_has_one_row_per_scorer():
    m = {"recall@10": 0.1, "recall@50": 0.5, "recall@100": 0.7, "ndcg@10": 0.05}
    table = format_table({"test": {"a": m, "b": m}})
    assert len(table.splitlines()) == 3 and "0.5000" in table


def test_item_knn_user_vector_is_the_last_10_history_items():
    rows = [(1, i, 3, i) for i in range(1, 13)] + [(1, 13, 5, 13), (1, 14, 5, 14), (1, 15, 5, 15)]
    data, catalog = _data(rows, 15)
    s = split(build_timelines(data, 19))
    case = s.validation[0]  # target 14 at position 13: history = items 1..13
    vector = ItemKNNScorer(s, catalog).users(s, [case])
    assert (torch.nonzero(vector[0]).flatten() + 1).tolist() == list(range(4, 14))
