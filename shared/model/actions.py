"""The engagement actions of Phoenix's retrieval model, in index order."""

from __future__ import annotations

ACTION_NAMES: tuple[str, ...] = (
    "favorite",
    "reply",
    "repost",
    "photo_expand",
    "click",
    "profile_click",
    "vqv",
    "share",
    "share_via_dm",
    "share_via_copy_link",
    "dwell",
    "quote",
    "quoted_click",
    "follow_author",
    "not_interested",
    "block_author",
    "mute_author",
    "report",
    "dwell_time",
)
ACTION_IDS: dict[str, int] = {name: i for i, name in enumerate(ACTION_NAMES)}
