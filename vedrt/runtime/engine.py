"""The engine: many requests stepped together (interface first; see issue #10).

    engine = gen.engine(max_rows=32)
    handle = engine.submit(pixel_values, num_beams=4)   # thread-safe
    engine.step()                                        # or engine.start() for a background loop
    handle.result(timeout=None)                          # what gen.generate(...) returns

This first version runs each admitted request's whole generation inside one `step()`; the
continuous-batching implementation replaces the body of `step()` without changing the interface.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import InputError


class EngineStopped(RuntimeError):
    """The engine stopped before the request ran (stop(drain=False), or submit after stop)."""


class Handle:
    """One submitted request, `concurrent.futures.Future`-style."""

    def __init__(self, pixel_values: Any, options: dict[str, Any], rows: int):
        self.pixel_values = pixel_values
        self.options = options
        self.rows = rows
        self._event = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.cancelled = False
        # Serving hooks (vedrt.serve): when the request got its rows, and who to tell when done.
        self.started_at: float | None = None  # time.monotonic() at admission into the batch
        self._callbacks: list[Callable[[Handle], None]] = []

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> Any:
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
        """Ask the engine to drop the request (frees its rows at the next step)."""
        if self.done():
            return False
        self.cancelled = True
        return True

    def add_done_callback(self, fn: Callable[[Handle], None]) -> None:
        """Call `fn(handle)` once the request finishes (at once if it already has).

        It runs on the engine's thread, so it must be quick (a server hands the result over to its
        event loop with `loop.call_soon_threadsafe`).
        """
        with _CALLBACK_LOCK:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        with _CALLBACK_LOCK:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a listener's bug must not stop the engine
                pass


_CALLBACK_LOCK = threading.Lock()


class Engine:
    """A pool of `max_rows` decoder rows that requests join and leave at step boundaries."""

    def __init__(self, generator: Any, max_rows: int = 32):
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise InputError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.gen = generator
        self.max_rows = max_rows
        self._waiting: deque[Handle] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        # Counters for monitoring (vedrt.serve's /metrics): steps run and rows they advanced.
        self.stats: dict[str, int] = {"steps": 0, "row_steps": 0}

    # -- requests -------------------------------------------------------------------------
    def submit(self, pixel_values: Any, **options: Any) -> Handle:
        o = self.gen.options(**options)
        pixel_values = self.gen.check_pixel_values(pixel_values)
        per_image = max(o.num_beams, o.num_return_sequences)
        rows = pixel_values.shape[0] * per_image
        if rows > self.max_rows:
            raise InputError(
                f"the request needs {rows} decoder rows ({pixel_values.shape[0]} images x "
                f"{per_image}), more than this engine's max_rows={self.max_rows}"
            )
        handle = Handle(pixel_values, options, rows)
        with self._wake:
            if self._closed:
                raise EngineStopped("the engine is stopped and accepts no new requests")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return 0

    def step(self) -> list[Handle]:
        """Admit what fits and advance every active request by one step; returns the finished."""
        with self._lock:
            handle = self._waiting.popleft() if self._waiting else None
        if handle is None:
            return []
        if handle.cancelled:
            handle._finish(error=EngineStopped("cancelled"))
            return [handle]
        handle.started_at = time.monotonic()
        self.stats["steps"] += 1
        self.stats["row_steps"] += handle.rows
        try:
            handle._finish(self.gen.generate(handle.pixel_values, **handle.options))
        except Exception as exc:  # one request's failure is its own
            handle._finish(error=exc)
        return [handle]

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting

    # -- background loop ------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="vedrt-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait(0.1)
                if self._stopping and (not self._waiting or not self._drain):
                    break
            self.step()
        with self._lock:
            left = list(self._waiting)
            self._waiting.clear()
        for handle in left:
            handle._finish(error=EngineStopped("the engine stopped before this request ran"))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with drain, finish every accepted one first."""
        with self._wake:
            self._closed = True
            self._stopping = True
            self._drain = drain
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        elif drain:
            while not self.idle():
                self.step()
