"""The engine hooks vedrt serve relies on: done callbacks, admission time, step counters.

They are part of the engine's interface for servers; these tests keep them through engine rewrites.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from vedrt.runtime import load

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "vedrt" / "models" / "scenes"
IMAGES = sorted((ROOT / "examples").glob("scene*.*"))


def test_done_callbacks_started_at_and_stats():
    gen = load(MODEL, threads=1)
    engine = gen.engine(max_rows=8)
    pixels = gen.preprocess(IMAGES[:2])
    calls: list = []
    before = time.monotonic()
    handle = engine.submit(pixels, num_beams=4)
    handle.add_done_callback(lambda h: calls.append((h, threading.current_thread().name)))
    assert calls == [] and handle.started_at is None
    for _ in range(1000):  # bounded: a request finishes within max_length steps
        engine.step()
        if handle.done():
            break
    assert handle.done() and len(calls) == 1 and calls[0][0] is handle
    np.testing.assert_array_equal(handle.result(0), gen.generate(pixels, num_beams=4))
    assert handle.started_at is not None and handle.started_at >= before
    assert engine.stats["steps"] >= 1 and engine.stats["row_steps"] >= 8
    late: list = []
    handle.add_done_callback(late.append)  # already done: called at once
    assert late == [handle]


def test_callback_runs_for_cancelled_and_failing_listeners_do_not_stop_the_engine():
    gen = load(MODEL, threads=1)
    engine = gen.engine(max_rows=4)
    pixels = gen.preprocess(IMAGES[:1])
    cancelled = engine.submit(pixels)
    good = engine.submit(pixels)
    seen: list = []
    cancelled.add_done_callback(lambda h: 1 / 0)
    cancelled.add_done_callback(seen.append)
    good.add_done_callback(seen.append)
    assert cancelled.cancel()
    engine.start()
    try:
        assert good.result(60) is not None
        assert cancelled.exception(60) is not None
    finally:
        engine.stop(drain=True, timeout=60)
    assert cancelled in seen and good in seen
