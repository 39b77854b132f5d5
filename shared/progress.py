"""Progress of long jobs (training epochs, a corpus encode, a snapshot stream, an upsert file, benchmark
levels): one tqdm bar, shown in one of two ways.

- On a terminal: tqdm's live bar on stderr, redrawn in place.
- Elsewhere (a log file, a pipe, a service under a supervisor): one plain line at most every `every_s`
  seconds, and a last one when the bar closes, with count/total, elapsed time, rate and the time left:
      corpus (3f2a9c) encoded: 40960/120000 (34%) in 00:05, 8192.00item/s, 00:09 left
  Given a logger, each line is one log record (so `--log-format json` still yields one JSON object a
  line); without one, a line on the stream.

Services always take the second form (`live=False`): their stderr carries log lines from several
threads, which a redrawn bar would interleave with. Callers update per batch or chunk, never per item:
an update is a counter add and, at most once an interval, a clock read. A tool that prints results
while a live bar shows prints them with `print_above` (tqdm.write: the bar is cleared, the line
written, the bar redrawn below it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINE_EVERY_S = 5.0  # a plain progress line at most this often
LINE_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) in {elapsed}, {rate_fmt}, {remaining} left{postfix}"
)


class _LineBar(tqdm):
    # Lines need no monitor thread: that thread only forces redraws of bars whose dynamic `miniters`
    # grew large, and a line bar checks the clock on every update (miniters=1).
    monitor_interval = 0
    shown: tuple | None = None  # (count, postfix) of the last line written

    def display(self, msg=None, pos=None):
        self.shown = (self.n, self.postfix)
        return super().display(msg, pos)

    def close(self) -> None:
        # The last line only when it says something new: a line written just before (the last
        # update fell after an interval) already gives the final count.
        if not self.disable and self.shown == (self.n, self.postfix):
            self.leave = False
        super().close()


class _Lines:
    """The file a line bar writes to. tqdm writes each display as "\\r" + text + padding and a "\\n"
    at close; here each display becomes one whole line (a log record, or a line on `stream`)."""

    def __init__(self, logger: logging.Logger | None, stream: TextIO, level: int) -> None:
        self.logger, self.stream, self.level = logger, stream, level
        # tqdm displays a new bar once as it constructs it (0/N, no rate yet): that line is dropped, so
        # a log's first line comes one interval in, and a short job logs only its last line.
        self.started = False

    def write(self, text: str) -> None:
        line = " ".join(text.split())  # also the padding inside tqdm's fields (" 3.33it/s")
        if not line or not self.started:
            return
        if self.logger is not None:
            self.logger.log(self.level, "%s", line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self) -> None:
        pass


def progress_bar(
    total: int,
    desc: str,
    *,
    unit: str = "it",
    logger: logging.Logger | None = None,
    live: bool | None = None,
    every_s: float = LINE_EVERY_S,
    stream: TextIO | None = None,
    disable: bool = False,
    level: int = logging.INFO,
    iterable: Sequence | None = None,
) -> tqdm:
    """A tqdm bar over `total` units (use it as a context manager, or close it). `live=None`: a live
    bar when `stream` (default stderr) is a terminal, plain lines otherwise (through `logger` when
    given). Postfixes (`bar.set_postfix_str(s, refresh=False)`) end each line. With `iterable`,
    iterating the bar yields its items and counts each when the loop body is done."""
    stream = sys.stderr if stream is None else stream
    if live is None:
        live = _isatty(stream)
    if live:
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=True,
            disable=disable,
        )  # fmt: skip
    lines = _Lines(logger, stream, level)
    bar = _LineBar(
        iterable, total=total, desc=desc, unit=unit, file=lines, disable=disable, bar_format=LINE_FORMAT,
        mininterval=every_s, miniters=1,  # the clock decides, not a count of updates
        leave=True, position=0,  # position 0: never a cursor move written into a log line
    )  # fmt: skip
    lines.started = True
    bar.shown = None  # the display tqdm made while constructing the bar was not written
    return bar


def progress_over(items: Sequence[T], desc: str, **kwargs) -> Iterable[T]:
    """`for level in progress_over(levels, "e2e levels", unit="level")`: a benchmark's levels one by one
    under a progress bar (closed when the loop ends); keyword arguments as for `progress_bar`."""
    return progress_bar(len(items), desc, iterable=items, **kwargs)


def print_above(line: str, file: TextIO | None = None) -> None:
    """Print a line (to stdout by default) above any live bar instead of through it, and flush (a
    benchmark's results show as each level ends, in a pipe too)."""
    out = sys.stdout if file is None else file
    tqdm.write(line, file=out)
    out.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
