"""shared/progress.py: a live tqdm bar on a terminal; elsewhere one plain line (a log record when given a
logger) at most once an interval and a last one at the end, with count/total, rate and the time left."""

from __future__ import annotations

import io
import itertools
import json
import logging
import time

from tqdm import tqdm

from shared.progress import print_above, progress_bar, progress_over
from shared.server.logs import configure_logging

EVERY_S = 0.05


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _messages(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


def test_off_a_terminal_lines_are_logged_at_most_once_an_interval_plus_the_last(caplog):
    caplog.set_level(logging.INFO, logger="probe.progress")
    log = logging.getLogger("probe.progress")
    with progress_bar(100, "corpus encoded", unit="item", logger=log, every_s=EVERY_S) as bar:
        for _ in range(25):
            time.sleep(0.01)
            bar.update(4)  # one update per batch
    records = _messages(caplog, "probe.progress")
    *during, last = records
    assert len(during) >= 2, [r.getMessage() for r in records]
    for r in records:
        assert r.getMessage().startswith("corpus encoded: ") and "item/s" in r.getMessage()
        assert "\r" not in r.getMessage() and "\n" not in r.getMessage()
    for r in during:
        assert " left" in r.getMessage() and "? left" not in r.getMessage()  # a rate, so a time left
    gaps = [b.created - a.created for a, b in itertools.pairwise(during)]
    assert all(gap >= EVERY_S - 0.01 for gap in gaps), gaps
    assert last.getMessage().startswith("corpus encoded: 100/100 (100%) in 00:00, ")
    assert last.getMessage().endswith("item/s, 00:00 left")


def test_a_job_shorter_than_an_interval_logs_only_its_last_line_with_the_postfix(caplog):
    caplog.set_level(logging.INFO, logger="probe.short")
    bar = progress_bar(3, "epoch  1/20", unit="step", logger=logging.getLogger("probe.short"))
    for step in range(3):
        bar.set_postfix_str(f"loss {step}", refresh=False)
        bar.update()
    bar.close()
    (record,) = _messages(caplog, "probe.short")  # no 0/3 line at the start
    assert record.getMessage().startswith("epoch 1/20: 3/3 (100%) in 00:00, ")
    assert record.getMessage().endswith(" left, loss 2")


def test_with_json_logs_each_progress_line_is_one_json_object(capsys):
    configure_logging("INFO", "json")
    try:
        with progress_bar(10, "snapshot v3", unit="item", logger=logging.getLogger("probe.json")) as bar:
            bar.update(10)
        lines = capsys.readouterr().err.splitlines()
    finally:
        configure_logging("INFO", "plain")
    (line,) = lines
    record = json.loads(line)
    assert record["logger"] == "probe.json" and record["message"].startswith("snapshot v3: 10/10 (100%)")


def test_off_a_terminal_without_a_logger_lines_go_to_the_stream():
    stream = io.StringIO()
    with progress_bar(5, "upserted", unit="item", stream=stream) as bar:
        bar.update(5)
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 1
    assert text.startswith("upserted: 5/5 (100%) in 00:00, ") and text.endswith(" left\n")


def test_on_a_terminal_the_bar_is_a_live_tqdm_bar_redrawn_in_place():
    stream = _Terminal()
    with progress_bar(4, "epoch  1/20", unit="step", stream=stream) as bar:
        assert isinstance(bar, tqdm)
        bar.update(4)
    text = stream.getvalue()
    assert "\r" in text and "epoch  1/20: 100%|" in text and "4/4 [" in text


def test_a_disabled_bar_writes_nothing(caplog):
    stream = _Terminal()
    with progress_bar(4, "live", stream=stream, disable=True) as bar:
        bar.update(4)
    with progress_bar(4, "lines", logger=logging.getLogger("probe.off"), disable=True) as bar:
        bar.update(4)
    assert stream.getvalue() == "" and not _messages(caplog, "probe.off")


def test_levels_iterated_under_a_bar_are_counted_as_each_loop_body_ends(caplog):
    caplog.set_level(logging.INFO, logger="probe.levels")
    log = logging.getLogger("probe.levels")
    seen = list(progress_over([1, 8, 64], "e2e levels", unit="level", logger=log))
    (last,) = _messages(caplog, "probe.levels")  # the bar closes when the loop ends
    assert seen == [1, 8, 64] and last.getMessage().startswith("e2e levels: 3/3 (100%) in ")


def test_a_line_printed_above_a_live_bar_clears_it_and_redraws_it_below():
    terminal = _Terminal()
    with progress_bar(2, "levels", unit="level", stream=terminal) as bar:
        bar.update()
        before = len(terminal.getvalue())
        print_above("c=1: 100 QPS", file=terminal)
        after = terminal.getvalue()[before:]
    cleared, _, redrawn = after.partition("c=1: 100 QPS\n")
    assert cleared.startswith("\r") and not cleared.strip()  # the bar line blanked first
    assert redrawn.startswith("\rlevels:  50%|")


def test_the_last_line_is_not_repeated_unless_it_says_something_new(caplog):
    caplog.set_level(logging.INFO, logger="probe.last")
    log = logging.getLogger("probe.last")
    with progress_bar(3, "levels", unit="level", logger=log, every_s=0) as bar:  # a line per update
        bar.update(3)
    with progress_bar(3, "epoch  1/20", unit="step", logger=log, every_s=0) as bar:
        bar.update(3)
        bar.set_postfix_str("val R@10 0.1", refresh=False)  # known only at the end: a last line
    lines = [r.getMessage() for r in _messages(caplog, "probe.last")]
    assert [line.split(" in ")[0] for line in lines] == [
        "levels: 3/3 (100%)", "epoch 1/20: 3/3 (100%)", "epoch 1/20: 3/3 (100%)"
    ]  # fmt: skip
    assert lines[-1].endswith(", val R@10 0.1")
