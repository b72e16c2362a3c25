"""The serving benchmark's baselines: vedrt's Engine interface with other scheduling policies.

`OneAtATime` answers requests in arrival order, one generate() each; `DynamicBatcher` is what
Triton's and Ray Serve's dynamic batchers do: wait a few ms for company, then one generate() for
the group, everyone waiting for the longest.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np


class _QueueEngine:
    """submit/start/stop/pending/active_rows like vedrt's Engine; `_run(batch)` is the policy."""

    def __init__(self, generator: Any, max_rows: int):
        self.gen, self.max_rows = generator, max_rows
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.active_rows = 0
        self.stats = {"steps": 0, "row_steps": 0}
        self.failure: BaseException | None = None  # as Engine's: what the server checks

    def submit_resolved(self, pixel_values: Any, o: Any) -> Any:
        """As vedrt's Engine: inputs checked and options resolved (`GenerationOptions`)."""
        from vedrt.runtime.engine import Handle
        from vedrt.runtime.search import rows_needed

        handle = Handle(pixel_values, o, rows_needed(o, pixel_values.shape[0]))
        with self._cond:
            self._queue.append(handle)
            self._cond.notify()
        return handle

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(60)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait(0.1)
                if self._stop and not self._queue:
                    return
            batch = [h for h in self._take() if not h.cancel_requested]
            if batch:
                self._run(batch)

    def _take(self) -> list:
        with self._cond:
            return [self._queue.popleft()]

    def _run(self, batch: list) -> None:
        handle = batch[0]
        handle.started_at = time.monotonic()
        try:
            handle._finish(self.gen.generate_resolved(handle.pixel_values, handle.options))
        except Exception as exc:
            handle._finish(error=exc)


class OneAtATime(_QueueEngine):
    """The same server answering one request at a time."""


class DynamicBatcher(_QueueEngine):
    """Wait up to `window` seconds for more requests, then one generate() for the group."""

    window = 0.005

    def _take(self) -> list:
        deadline = time.monotonic() + self.window
        with self._cond:
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            while rows < self.max_rows:
                left = deadline - time.monotonic()
                if not self._queue:
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    continue
                nxt = self._queue[0]
                if nxt.options != first.options or rows + nxt.rows > self.max_rows:
                    break
                batch.append(self._queue.popleft())
                rows += nxt.rows
            return batch

    def _run(self, batch: list) -> None:
        now = time.monotonic()
        for handle in batch:
            handle.started_at = now
        try:
            pixels = np.concatenate([h.pixel_values for h in batch])
            sequences = self.gen.generate_resolved(pixels, batch[0].options)
        except Exception as exc:
            for handle in batch:
                handle._finish(error=exc)
            return
        per_image = batch[0].options.num_return_sequences
        start = 0
        for handle in batch:
            count = handle.pixel_values.shape[0] * per_image
            handle._finish(sequences[start : start + count])
            start += count
