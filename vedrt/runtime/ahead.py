"""Encoding ahead: the encoder and cross K/V of waiting requests on a thread of their own.

With the engine's background loop, admission would otherwise run the encoder inside a step,
and every active row would wait for it. Requests also arrive one by one, so each admission
would encode one or two images, the encoder's least efficient batch. Here a second thread
encodes whatever has queued while the decoder steps (ONNX Runtime releases the GIL while it
runs), in one batch per round, so arrivals batch themselves without a timer. The engine then
admits requests already encoded, still first in, first out.

Encoded requests waiting for rows hold their cross K/V in memory, so at most `limit` decoder rows'
worth of requests (the engine's `max_rows`: one pool's worth) are encoded ahead of admission.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .encoding import encode_requests
from .handle import Handle


class EncodeAhead:
    """The encoder stage of an engine; `Handle.encoded` is set to (Encoded, first index)."""

    def __init__(self, engine: Any, limit: int):
        self.engine = engine
        self.limit = limit
        # most images per encoder run: a request arriving during a run waits for it, so
        # smaller runs cut the tail; on the scene model, closed loop at 16 clients, 8 gave
        # 318 img/s and p99 92 ms, 32 gave 317 and 105 ms, 4 gave 277 and 82 ms. With the
        # encoder folded at export (2026-12-06: batch 1 1.9 ms, batch 8 1.7 ms an image) 2, 4
        # and 8 are within the run-to-run noise at 4, 8 and 16 clients (benchmarks.serve)
        self.round_images = min(limit, 8)
        self.encoded_rows = 0  # rows of the requests encoded, not yet admitted (under the lock)
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="vedrt-encoder", daemon=True)
        self.thread.start()

    def _pending(self) -> list[Handle]:
        """Waiting requests to encode now, first in first out, within the budget. While the
        rows are full and enough is encoded to fill the ones that free up, wait for a whole
        round: one image at a time costs the encoder more per image (scene model: 1.9 vs 1.7 ms)."""
        # an idle decoder gets its first request as soon as one is encoded; the rest follow
        idle = not self.engine.active_rows and not self.encoded_rows
        round_images = 1 if idle else self.round_images
        rows, images, chosen = self.limit - self.encoded_rows, round_images, []
        for handle in self.engine._waiting:
            if handle.encoded is not None or handle.done() or handle.cancel_requested:
                continue
            if (handle.rows > rows or handle.batch > images) and (chosen or self.encoded_rows):
                break
            chosen.append(handle)
            rows, images = rows - handle.rows, images - handle.batch
        ready = sum(h.rows for h in self.engine._waiting if h.encoded is not None)
        starving = ready < self.engine.max_rows - self.engine.active_rows
        if chosen and not starving and sum(h.batch for h in chosen) < round_images:
            return []
        return chosen

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug, or a callback's SystemExit: the engine fails all
            logging.getLogger("vedrt").exception("the engine's encoder thread failed")
            self.engine.fail(exc)

    def _run(self) -> None:
        wake = self.engine._wake
        while True:
            with wake:
                while not self._stopping and not (chosen := self._pending()):
                    wake.wait(self.engine.poll_seconds)
                if self._stopping:
                    return
            done = self._encode(chosen)
            with wake:  # set and counted together, so `admitted` always undoes what was added
                for handle, value in done:
                    if not (
                        handle.done() or handle.cancel_requested
                    ):  # else it left (or leaves) as is
                        handle.encoded = value
                        self.encoded_rows += handle.rows
                wake.notify_all()

    def _encode(self, chosen: list[Handle]) -> list[tuple[Handle, Any]]:
        """Encode `chosen` in one batch; if that fails, one by one, so that only the request
        that fails is answered with the error. Returns (handle, (Encoded, first index))."""
        try:
            encoded, where = encode_requests(self.engine.executor, chosen)
        except Exception as exc:
            if len(chosen) > 1:
                return [pair for one in chosen for pair in self._encode([one])]
            chosen[0]._finish(error=exc)
            return []
        out = []
        for handle in chosen:
            part, first = where[id(handle)]
            out.append((handle, (encoded[part], first)))
        return out

    def admitted(self, handles: list[Handle]) -> None:
        """These left the queue (admitted, failed or cancelled): their budget is free again."""
        self.encoded_rows -= sum(h.rows for h in handles if h.encoded is not None)

    def stop(self) -> None:
        with self.engine._wake:
            self._stopping = True
            self.engine._wake.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)
