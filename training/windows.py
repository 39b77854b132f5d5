"""Training windows for dense next-item supervision (the two-tower's dense objective and SASRec).

A user's training events [0, train_end) are cut into windows of at most S consecutive events. A window
[w, w + n) feeds the sequence model; position p (0 = before any event of the window) is asked to
predict event w + p, and the last position p = n the event right after the window when there is one.
So every event of a training prefix but the first is predicted once per epoch from a context of the
events before it, in one forward pass per window: ~90k targets per epoch on MovieLens-100K instead of
one example per positive.

Position 0 of a window that does not start a timeline is not supervised: at serving time a context
with no events means a user with no history at all, which the window does not describe.

Each epoch shifts the window grid by a random offset so the same event is seen after different amounts
of context. Targets: every next event ("all"), or only those rated positive ("positive": the events
evaluated are positives, the others still feed the context).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.model.features import UserContext
from training.dataset import POSITIVE_RATING, PRODUCT_SURFACE, Split

TARGET_MODES = ("all", "positive")


@dataclass(frozen=True)
class Window:
    user: int  # index into Split.timelines
    start: int  # first event of the window
    end: int  # exclusive; end - start <= S


def epoch_windows(split: Split, length: int, rng: np.random.Generator | None) -> list[Window]:
    """Windows of <= `length` events tiling each user's training prefix (grid shifted by a random
    offset per user when rng is given, else aligned at 0); users with no training event have none."""
    windows = []
    for u in range(len(split.timelines)):
        end = int(split.train_end[u])
        if end < 1:
            continue
        offset = int(rng.integers(length)) if rng is not None else 0
        starts = [0, *list(range(offset or length, end, length))]
        for a, b in zip(starts, [*starts[1:], end], strict=True):
            if b > a:
                windows.append(Window(u, a, b))
    return windows


def window_context(split: Split, window: Window, num_features: int) -> UserContext:
    """The user context made of the window's events (what a server would see as that history)."""
    t = split.timelines[window.user]
    events = slice(window.start, window.end)
    n = window.end - window.start
    return UserContext(
        user_id=t.user_id,
        post_ids=t.post_ids[events],
        author_ids=np.zeros(n, dtype=np.int64),
        actions=t.actions[events],
        surfaces=np.full(n, PRODUCT_SURFACE, dtype=np.int64),
        user_features=t.user_features[:num_features],
    )


def window_targets(split: Split, windows: list[Window], length: int, mode: str) -> np.ndarray:
    """[B, length + 1] post id each position must predict, 0 where nothing is supervised."""
    if mode not in TARGET_MODES:
        raise ValueError(f"target mode must be one of {TARGET_MODES}, got {mode!r}")
    out = np.zeros((len(windows), length + 1), dtype=np.int64)
    for b, w in enumerate(windows):
        t = split.timelines[w.user]
        last = min(w.end + 1, int(split.train_end[w.user]))  # the event after the window, if training
        first = w.start if w.start == 0 else w.start + 1  # position 0 only at a timeline's start
        idx = np.arange(first, last)
        keep = idx if mode == "all" else idx[t.ratings[idx] >= POSITIVE_RATING]
        out[b, keep - w.start] = t.post_ids[keep]
    return out
