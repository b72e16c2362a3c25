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
from .handle import EngineStopped


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
                    while not self._head_ready() and not self._active and not self._stopping:
                        self._wake.wait(self.poll_seconds)
                    if self._stopping and (
                        not self._drain or (not self._waiting and not self._active)
                    ):
                        break
                self.step()
        except BaseException as exc:  # a bug, or a callback's SystemExit: fail all, hang none
            logging.getLogger("vedrt").exception("the engine's loop failed")
            self.failure = exc
            with self._lock:
                self._closed = True
            self._abandon(f"the engine failed ({type(exc).__name__}: {exc})")
            return
        self._abandon()

    def _abandon(self, why: str = "the engine stopped before this request finished") -> None:
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
        for handle in left:
            handle._finish(error=EngineStopped(why))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with `drain`, finish every accepted one first, else fail
        them with `EngineStopped`."""
        with self._wake:
            self._closed = True
            self._stopping = True
            self._drain = drain
            self._wake.notify_all()
        thread = self._thread
        if thread is threading.current_thread():  # from a done callback: the loop ends itself
            return
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                self._thread = None
        elif drain:
            while not self.idle():
                self.step()
        else:
            self._abandon()
