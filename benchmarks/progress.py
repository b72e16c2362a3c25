"""A one-line progress bar on stderr: a full run takes many minutes on 2 cores."""

from __future__ import annotations

import sys
import time


class Progress:
    """`step(what)` after each unit of work; redraws `[####....] 12/40 1m05s what`."""

    def __init__(self, total: int, title: str, width: int = 24, stream=None):
        self.total, self.title, self.width = max(total, 1), title, width
        self.done, self.started = 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def step(self, what: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.started
        line = (
            f"{self.title} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{int(elapsed // 60)}m{int(elapsed % 60):02d}s {what}"
        )
        if self.live:
            self.stream.write("\r" + line[:120].ljust(120))
        else:  # a log file: one line per step
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
