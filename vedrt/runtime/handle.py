"""A submitted request, `concurrent.futures.Future`-style (see `engine.py`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def input_batch(inputs: Any) -> int:
    """How many images (pixel values) or texts ({"input_ids", ...}) a request's inputs hold."""
    return int((inputs["input_ids"] if isinstance(inputs, dict) else inputs).shape[0])


class EngineStopped(RuntimeError):
    """The request did not run to the end: cancelled, or the engine stopped without draining."""


class Handle:
    """One request: `.done()`, `.result(timeout)`, `.cancel()`, `.add_done_callback(fn)`.

    `submitted_at`, `started_at` and `finished_at` are `time.monotonic()` stamps (queue time and latency
    for metrics); `started_at` is None until the request is admitted to the engine's rows.
    """

    def __init__(self, inputs: Any, options: Any, rows: int):
        self.inputs = inputs  # pixel values [n, C, H, W], or {"input_ids", "attention_mask"}
        self.options = options  # the resolved GenerationOptions
        self.rows = rows
        self.batch = input_batch(inputs)  # how many images (or texts) the request holds
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self.encoded: Any = None  # (Encoded, first index) once encoded ahead of admission
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Handle], Any]] = []
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def pixel_values(self) -> Any:
        return self.inputs

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """What `generate()` returns for this request; raises its error, if it failed."""
        if not self._event.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._event.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self._error

    def cancel(self) -> bool:
        """Ask the engine to drop the request; its rows are freed at the next step."""
        if self.done():
            return False
        self.cancelled = True
        return True

    def add_done_callback(self, fn: Callable[[Handle], Any]) -> None:
        """Call `fn(handle)` when the request finishes (at once if it already has), on the
        thread that finishes it: keep it short (an event loop's `call_soon_threadsafe`)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def admitted(self) -> None:
        self.started_at = time.monotonic()

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._result, self._error = result, error
            self.finished_at = time.monotonic()
            self.inputs = None  # the request's inputs are not needed any more
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a broken callback must not take the engine down
                pass
