"""The mapping to engagement events and the fixed split protocol: no target ever leaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.model.actions import ACTION_IDS
from training.data import MovieLens, Ratings, load_from_dir
from training.dataset import (
    build_timelines,
    feature_id,
    rating_actions,
    split,
    training_examples,
    training_interactions,
    user_feature_ids,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "synthetic"


@pytest.fixture(scope="module")
def fixture_split():
    return split(build_timelines(load_from_dir(FIXTURE, "synth"), 19))


def _data(rows):
    """rows of (user, item, rating, timestamp) -> MovieLens without item/user files."""
    u, i, r, t = (np.asarray(c) for c in zip(*rows, strict=True))
    ratings = Ratings(u.astype(np.int64), i.astype(np.int64), r.astype(np.float32), t.astype(np.int64))
    return MovieLens(ratings=ratings, movies=(), users={}, digests={})


@pytest.mark.parametrize(
    ("rating", "names"),
    [
        (5, {"click", "dwell", "favorite"}),
        (4, {"click", "dwell", "favorite"}),
        (3, {"click", "dwell"}),
        (2, {"click", "dwell", "not_interested"}),
        (1, {"click", "dwell", "not_interested"}),
    ],
)
def test_rating_to_actions(rating, names):
    assert set(rating_actions(rating)) == {ACTION_IDS[n] for n in names}


def test_events_sorted_by_timestamp_then_item_id():
    data = _data([(1, 9, 5, 200), (1, 3, 4, 100), (1, 7, 2, 200), (1, 5, 3, 200), (2, 1, 5, 50)])
    (t1, t2) = build_timelines(data, 19)
    assert t1.user_id == 1 and t1.post_ids.tolist() == [3, 5, 7, 9]
    assert t1.ratings.tolist() == [4, 3, 2, 5] and t1.timestamps.tolist() == [100, 200, 200, 200]
    assert t1.actions[0, ACTION_IDS["favorite"]] and t1.actions[2, ACTION_IDS["not_interested"]]
    assert t2.post_ids.tolist() == [1]


def test_a_movie_rated_twice_is_rejected():
    with pytest.raises(ValueError, match="user 1 rates a movie twice"):
        build_timelines(_data([(1, 3, 4, 100), (1, 3, 5, 200)]), 19)


def test_targets_are_the_last_two_positives():
    # user 1 order: 10(5) 11(2) 12(4) 13(3) 14(5) 15(1); positives at 0, 2, 4
    rows = [(1, 10 + k, r, 100 + k) for k, r in enumerate([5, 2, 4, 3, 5, 1])]
    rows += [(2, 20, 5, 100), (2, 21, 4, 101), (2, 22, 3, 102)]  # only 2 positives: no target
    s = split(build_timelines(_data(rows), 19))
    assert [(c.user, c.cut, c.target) for c in s.validation] == [(0, 2, 12)]
    assert [(c.user, c.cut, c.target) for c in s.test] == [(0, 4, 14)]
    assert s.train_end.tolist() == [2, 3]  # user 1: events before the validation target; user 2: all
    assert training_examples(s).tolist() == [[0, 0], [1, 0], [1, 1]]  # positives inside the prefixes
    users, posts = training_interactions(s)
    assert users.tolist() == [0, 0, 1, 1, 1] and posts.tolist() == [10, 11, 20, 21, 22]


def test_no_target_leaks_on_the_fixture(fixture_split):
    s = fixture_split
    assert len(s.test) == 23 and len(s.validation) == 23  # user 24 has only 2 positives
    examples = training_examples(s)
    for val, test in zip(s.validation, s.test, strict=True):
        t = s.timelines[val.user]
        assert val.user == test.user and val.cut < test.cut
        assert t.post_ids[val.cut] == val.target and t.post_ids[test.cut] == test.target
        positives_after = np.flatnonzero(t.ratings[test.cut + 1 :] >= 4)
        assert positives_after.size == 0  # the test target is the last positive
        assert val.target not in t.post_ids[: val.cut] and test.target not in t.post_ids[: test.cut]
        # training sees this user's events strictly before the validation target, nothing later
        assert s.train_end[val.user] == val.cut
        mine = examples[examples[:, 0] == val.user, 1]
        assert mine.size and mine.max() < val.cut
        assert all(t.ratings[i] >= 4 for i in mine)
    users, posts = training_interactions(s)
    for case in (*s.validation, *s.test):
        assert not np.any((users == case.user) & (posts == case.target))


def test_history_contexts_stop_before_the_target(fixture_split):
    s = fixture_split
    case = s.test[0]
    ctx = s.timelines[case.user].context(case.cut)
    assert len(ctx.post_ids) == case.cut and case.target not in ctx.post_ids.tolist()
    assert ctx.author_ids.tolist() == [0] * case.cut and ctx.surfaces.tolist() == [0] * case.cut
    assert len(ctx.user_features) == 3 and s.timelines[case.user].context(case.cut, 0).user_features == ()


def test_user_feature_ids_are_stable_and_positive():
    assert feature_id("gender", "F") == feature_id("gender", "F") != feature_id("gender", "M")
    assert feature_id("gender", "F") > 0
    assert user_feature_ids(None) == (0, 0, 0)
