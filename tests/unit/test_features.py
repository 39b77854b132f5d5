import numpy as np
import pytest

from candidate_service.convert import item_columns_from_proto
from shared.convert import user_context_from_proto, user_context_to_proto
from shared.errors import InvalidInput
from shared.model.actions import ACTION_IDS
from shared.model.features import UserContext, featurize_items, featurize_users
from twotower.v1 import common_pb2


def _proto(**kw):
    msg = common_pb2.UserContext(user_id=kw.pop("user_id", 1))
    for event in kw.pop("history", []):
        msg.history.add(**event)
    return msg


def test_proto_conversion_merges_names_and_ids():
    msg = _proto(history=[{"post_id": 5, "author_id": 2, "action_names": ["favorite", "click"],
                           "action_ids": [4, 10], "product_surface": 3}])  # fmt: skip
    ctx = user_context_from_proto(msg, num_actions=19)
    assert np.flatnonzero(ctx.actions[0]).tolist() == [0, 4, 10]
    assert ctx.post_ids.tolist() == [5] and ctx.surfaces.tolist() == [3]
    back = user_context_to_proto(ctx)
    assert user_context_from_proto(back, 19).actions.tolist() == ctx.actions.tolist()


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([{"post_id": 1, "action_names": ["lik"]}], r"history\[0\].action_names: unknown action 'lik'"),
        ([{"post_id": 1}, {"post_id": 2, "action_ids": [19]}], r"history\[1\].action_ids: 19 out of range"),
        ([{"post_id": 1, "action_ids": [-1]}], "out of range"),
        ([{"post_id": 1, "timestamp_ms": 5}, {"post_id": 2, "timestamp_ms": 4}], "goes back in time"),
        ([{"post_id": 1, "timestamp_ms": 5}, {"post_id": 2}], "unset or negative"),
        # the event of a bad action among others' (names and ids are flattened across events)
        (
            [
                {"post_id": 1, "action_names": ["favorite", "click"]},
                {"post_id": 2},
                {"post_id": 3, "action_ids": [1], "action_names": ["reply", "lik"]},
            ],
            r"history\[2\].action_names: unknown action 'lik'",
        ),
        (
            [{"post_id": 1, "action_ids": [1, 2]}, {"post_id": 2, "action_ids": [3, 19]}],
            r"history\[1\].action_ids: 19 out of range",
        ),
        (
            [{"post_id": 1}, {"post_id": 2, "action_ids": [1] * 40, "action_names": ["favorite"] * 25}],
            r"history\[1\] has 65 action_names \+ action_ids; the limit is 64",
        ),
    ],
)
def test_proto_rejections(history, message):
    with pytest.raises(InvalidInput, match=message):
        user_context_from_proto(_proto(history=history), num_actions=19)


def test_absurd_history_rejected_before_work():
    msg = _proto(history=[{"post_id": 1}] * 11)
    with pytest.raises(InvalidInput, match="11 events; the limit is 10"):
        user_context_from_proto(msg, 19, max_history_events=10)


@pytest.mark.parametrize(
    ("ctx", "message"),
    [
        (UserContext.build(0), "user_id must be > 0"),
        (UserContext.build(-3), "user_id must be > 0"),
        (UserContext.build(1, [1, 0]), r"history\[1\].post_id must be >= 1"),
        (UserContext.build(1, [1], [-2]), r"history\[0\].author_id must be >= 0"),
        (UserContext.build(1, [1], surfaces=[16]), r"product_surface 16 out of range \[0, 16\)"),
        (UserContext.build(1, user_features=[3]), "user_features has 1 values"),
    ],
)
def test_featurizer_rejections(tiny_config, ctx, message):
    with pytest.raises(InvalidInput, match=message):
        featurize_users([ctx], tiny_config)


def test_featurizer_names_the_user_in_a_batch(tiny_config):
    with pytest.raises(InvalidInput, match=r"users\[1\].user_id"):
        featurize_users([UserContext.build(1), UserContext.build(0)], tiny_config)
    with pytest.raises(InvalidInput, match="no users"):
        featurize_users([], tiny_config)


def test_item_validation(tiny_config):
    with pytest.raises(InvalidInput, match=r"items\[1\].post_id must be > 0"):
        featurize_items(np.array([3, 0]), np.array([1, 1]), tiny_config)
    with pytest.raises(InvalidInput, match=r"items\[0\].author_id must be >= 0"):
        featurize_items(np.array([3]), np.array([-1]), tiny_config)
    items = [common_pb2.Item(post_id=1), common_pb2.Item(post_id=1)]
    with pytest.raises(InvalidInput, match="duplicate id 1"):
        item_columns_from_proto(items, max_items=10)
    with pytest.raises(InvalidInput, match="3 items in one request; the limit is 2"):
        item_columns_from_proto([common_pb2.Item(post_id=i) for i in (1, 2, 3)], max_items=2)
    with pytest.raises(InvalidInput, match="no items"):
        item_columns_from_proto([], max_items=2)
    long_value = [common_pb2.Item(post_id=1, attributes={"title": "x" * 2000})]
    with pytest.raises(InvalidInput, match="value over 1024 bytes"):
        item_columns_from_proto(long_value, max_items=2)


def test_proto_conversion_matches_event_by_event_reading():
    rng = np.random.default_rng(3)
    names = list(ACTION_IDS)
    history = []
    for i in range(50):
        picked = rng.choice(19, rng.integers(0, 4), replace=False)
        history.append({"post_id": i + 1, "author_id": int(rng.integers(0, 99)), "product_surface": i % 5,
                        "timestamp_ms": 1000 + i, "action_names": [names[a] for a in picked[::2]],
                        "action_ids": [int(a) for a in picked[1::2]]})  # fmt: skip
    ctx = user_context_from_proto(_proto(history=history), num_actions=19)
    for i, event in enumerate(history):
        want = sorted([ACTION_IDS[n] for n in event["action_names"]] + event["action_ids"])
        assert np.flatnonzero(ctx.actions[i]).tolist() == want
        assert (ctx.post_ids[i], ctx.author_ids[i], ctx.surfaces[i]) == (
            event["post_id"],
            event["author_id"],
            event["product_surface"],
        )
