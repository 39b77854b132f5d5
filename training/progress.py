"""A dependency-free progress bar on stderr (redrawn in place on a terminal, one line per bar otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 28
REDRAW_SECONDS = 0.2  # redrawing on every step would cost more than a small training step


class ProgressBar:
    def __init__(self, total: int, desc: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.done, self.postfix = 0, ""
        self.start = self.last_draw = time.monotonic()

    def update(self, steps: int = 1, postfix: str = "") -> None:
        self.done = min(self.done + steps, self.total)
        self.postfix = postfix or self.postfix
        now = time.monotonic()
        if self.enabled and self.interactive and now - self.last_draw >= REDRAW_SECONDS:
            self.last_draw = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def close(self, postfix: str = "") -> None:
        self.postfix = postfix or self.postfix
        if self.enabled:
            self.stream.write(("\r" if self.interactive else "") + self._line(time.monotonic()) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        filled = BAR_WIDTH * self.done // self.total
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return f"{self.desc} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {rate:5.1f}it/s {self.postfix}"
