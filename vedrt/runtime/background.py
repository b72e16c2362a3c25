"""The engine's background loop: `step()` on a thread of its own, for servers.

`Engine` inherits it; it drives the engine only through `step()`, the queue and the locks the
engine owns. A loop that dies (a bug, a done callback raising `SystemExit`) fails every request
it held with `EngineStopped` and closes the engine, so no caller waits forever on a dead thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .ahead import EncodeAhead
from .handle import EngineStopped, run_callbacks


class BackgroundLoop:
    """`start()` / `stop()` for `Engine` (which provides the attributes used here)."""

    _lock: Any
    _wake: Any
    _step_lock: Any

    def start(self) -> Any:
        """Run `step()` on a background thread until `stop()`; returns the engine."""
        with self._lock:
            if self._closed:
                raise EngineStopped("the engine was stopped: make a new one with gen.engine()")
            if self.encode_ahead and self._ahead is None:
                self._ahead = EncodeAhead(self, limit=self.max_rows)
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="vedrt-engine", daemon=True)
                self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._head_ready() and not self._active and not self._over():
                        self._wake.wait(self.poll_seconds)  # draining too: the encoder wakes it
                    if self._over():
                        break
                self.step()
        except BaseException as exc:  # a bug, or a callback's SystemExit: fail all, hang none
            logging.getLogger("vedrt").exception("the engine's loop failed")
            self.fail(exc)
        try:
            self._abandon()
        except BaseException:  # from a done callback; every request is settled by then
            logging.getLogger("vedrt").exception("a done callback raised as the engine stopped")

    def _over(self) -> bool:
        """Stopping, and nothing left that it should finish first (under the lock)."""
        return self._stopping and (
            not self._drain or (not self._waiting and not self._active) or self.failure is not None
        )

    def _abandon(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None
        with self._lock:
            left = list(self._waiting)
            self._waiting.clear()
        with self._step_lock:
            left += [h for a in self._active for h, _ in a.open_members()]
            try:
                self._rows.release([*self._active])
            except Exception:  # after a failed step the rows may not add up: answer anyway
                logging.getLogger("vedrt").exception("releasing the engine's rows failed")
        why = "the engine stopped before this request finished"
        if self.failure is not None:
            why = f"the engine failed ({type(self.failure).__name__}: {self.failure})"
        due: list = []
        for handle in left:  # every one settled before any callback runs (one may raise)
            handle._finish(error=EngineStopped(why), later=due)
        run_callbacks(due)

    def fail(self, exc: BaseException) -> None:
        """A thread of the engine died of `exc`: closed, and the loop fails what it holds."""
        with self._wake:
            if self.failure is None:
                self.failure = exc
            self._closed = self._stopping = True
            self._wake.notify_all()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with `drain`, finish every accepted one first, else fail
        them with `EngineStopped`."""
        with self._wake:
            self._closed = True
            self._stopping = True
            self._drain = drain
            self._wake.notify_all()
        thread = self._thread
        if threading.current_thread() in (thread, getattr(self._ahead, "thread", None)):
            return  # from a done callback on the engine's own threads: the loop ends itself
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                self._thread = None
        elif drain:
            while not self.idle():
                self.step()
        else:
            self._abandon()
