"""A submitted request: a `concurrent.futures.Future` (see `engine.py`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any

log = logging.getLogger("vedrt")


def owned(checked: Any, *given: Any) -> Any:
    """`checked` inputs the caller can no longer change: copies of the arrays that share memory
    with what it passed (a request waits in the queue; its buffer may be refilled meanwhile)."""
    import numpy as np

    sources = [g for g in given if isinstance(g, np.ndarray)]

    def own(array: Any) -> Any:
        if isinstance(array, np.ndarray) and any(np.shares_memory(array, g) for g in sources):
            return array.copy()
        return array

    if isinstance(checked, dict):
        return {name: own(array) for name, array in checked.items()}
    return own(checked)


def input_batch(inputs: Any) -> int:
    """How many images (pixel values) or texts ({"input_ids", ...}) a request's inputs hold."""
    return int((inputs["input_ids"] if isinstance(inputs, dict) else inputs).shape[0])


class EngineStopped(RuntimeError):
    """The request did not run to the end: cancelled, or the engine stopped without draining."""


_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class Handle(Future):
    """One request, a `concurrent.futures.Future`: `concurrent.futures.wait`, `as_completed`
    and `asyncio.wrap_future` take it as they take any future.

    Where it differs from a plain future, it says so: `cancel()` also stops a running request
    (at the engine's next step), and a cancelled request ends with an `EngineStopped` error
    (`cancelled()` is then true; awaited through `asyncio.wrap_future`, it raises asyncio's
    `CancelledError`, as any cancelled future does); `running()` means admitted to the
    engine's rows. Done callbacks run on the thread that finishes the request, after the
    engine lets go of its locks, so one may use the engine.

    `submitted_at`, `started_at` and `finished_at` are `time.monotonic()` stamps (queue time and
    latency for metrics); `started_at` is None until the request is admitted to the rows.
    """

    def __init__(self, inputs: Any, options: Any, rows: int):
        super().__init__()
        self.inputs = inputs  # pixel values [n, C, H, W], or {"input_ids", "attention_mask"}
        self.options = options  # the resolved GenerationOptions
        self.rows = rows
        self.batch = input_batch(inputs)  # how many images (or texts) the request holds
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested = False
        # set by the engine while the request waits: takes it out of the queue (True if it was)
        self.unqueue: Callable[[Handle], bool] | None = None
        self.encoded: Any = None  # (Encoded, first index) once encoded ahead of admission
        self._lock = threading.Lock()
        # ours, not the base class's list: the engine runs them once it holds no lock
        self._callbacks: list[Callable[[Handle], Any]] = []

    def __repr__(self) -> str:  # the base class's says "pending" for a running request
        if self.cancelled():
            state = "cancelled"
        elif self.done():
            state = "finished" if self._exception is None else f"failed ({self._exception!r})"
        else:
            state = "running" if self.running() else "waiting"
        return f"<Handle {state}: {self.batch} input(s), {self.rows} row(s)>"

    @property
    def pixel_values(self) -> Any:
        return self.inputs

    def done(self) -> bool:
        # the base class's state read without its lock: the engine asks ~30 times a step
        return self._state in _DONE

    def running(self) -> bool:
        """Admitted to the engine's rows and not finished."""
        return self.started_at is not None and not self.done()

    def cancelled(self) -> bool:
        """Finished because `cancel()` asked for it."""
        return self.done() and self.cancel_requested and isinstance(self._exception, EngineStopped)

    def result(self, timeout: float | None = None) -> Any:
        """What `generate()` returns for this request; raises its error, if it failed."""
        try:
            return super().result(timeout)
        except FutureTimeout:
            raise TimeoutError("the request did not finish in time") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except FutureTimeout:
            raise TimeoutError("the request did not finish in time") from None

    def cancel(self) -> bool:
        """Drop the request: one still waiting finishes at once (`EngineStopped`); a running
        one at the engine's next step, which frees its rows. False if it had finished."""
        with self._lock:  # against `_finish`: True here means the request ends cancelled
            if self.done():
                return False
            self.cancel_requested = True
            unqueue = self.unqueue
        if unqueue is not None and unqueue(self):
            self._finish(error=EngineStopped("the request was cancelled"))
        return True

    def add_done_callback(self, fn: Callable[[Handle], Any]) -> None:
        """Call `fn(handle)` when the request finishes (at once if it already has), on the
        thread that finishes it, with no engine lock held: keep it short (an event loop's
        `call_soon_threadsafe`). A callback's exception is logged, never raised."""
        with self._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def admitted(self) -> None:
        self.started_at = time.monotonic()

    def _finish(
        self, result: Any = None, error: BaseException | None = None, later: list | None = None
    ) -> None:
        """Settle the request. Its callbacks run now, or, with `later`, are appended there as
        (fn, handle) for the engine to run once it holds no lock (a callback may use it)."""
        with self._lock:
            if self.done():
                return
            self.finished_at = time.monotonic()
            self.inputs = None  # the request's inputs are not needed any more
            self.unqueue = None
            if self.cancel_requested and not isinstance(error, EngineStopped):
                # cancel() said True: whatever its last step gave, the request ends cancelled
                result, error = None, EngineStopped("the request was cancelled")
            # wakes `result()` and `concurrent.futures.wait`; the base class's own callback
            # list is empty (see `add_done_callback`), so no user code runs here
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(result)
            callbacks, self._callbacks = self._callbacks, []
        if later is not None:
            later.extend((fn, self) for fn in callbacks)
            return
        for fn in callbacks:
            _call(fn, self)


def _call(fn: Callable[[Handle], Any], handle: Handle) -> None:
    """A broken callback must not take the engine (or the caller) down: logged, as
    `concurrent.futures` does."""
    try:
        fn(handle)
    except Exception:
        log.exception("exception calling the done callback of %r", handle)


def run_callbacks(due: list) -> None:
    """Run the (fn, handle) pairs `Handle._finish(later=...)` collected: every one of them,
    even after one raises what `_call` lets through (`SystemExit`), which is raised after."""
    first: BaseException | None = None
    for fn, handle in due:
        try:
            _call(fn, handle)
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first
