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


def test_callbacks_may_use_the_engine_and_a_waiting_request_cancels_at_once():
    """A done callback runs with no engine lock held: one reading `pending`, submitting, or even
    stepping no longer deadlocks the engine. Cancelling a request that waits behind another
    finishes it at once (it waited until it reached the head of the queue)."""
    gen = load(MODEL, threads=1)
    pixels = gen.preprocess(IMAGES[:2])
    engine = gen.engine(max_rows=4)
    first = engine.submit(pixels[:1], num_beams=4)  # holds every row
    waiting = engine.submit(pixels[1:], num_beams=4)
    later = engine.submit(pixels[1:], num_beams=4)
    seen: list = []
    waiting.add_done_callback(lambda h: seen.append(engine.pending))
    engine.step()  # `first` admitted; the other two wait for rows
    assert waiting.cancel() and waiting.done() and waiting.cancelled() and not later.done()
    assert seen == [1] and engine.pending == 1  # the callback read the engine without a hang
    follow: list = []
    first.add_done_callback(lambda h: follow.append(engine.submit(pixels[:1])))
    first.add_done_callback(lambda h: engine.step())  # re-entrant stepping from a callback
    for _ in range(200):  # bounded: both finish within max_length steps each
        engine.step()
        if later.done() and follow and follow[0].done():
            break
    np.testing.assert_array_equal(later.result(0), gen.generate(pixels[1:], num_beams=4))
    np.testing.assert_array_equal(follow[0].result(0), gen.generate(pixels[:1]))
    assert first.done() and not first.cancelled() and not first.running()


def test_a_started_engine_survives_callbacks_that_use_it():
    gen = load(MODEL, threads=1)
    pixels = gen.preprocess(IMAGES[:1])
    engine = gen.engine(max_rows=4, encode_ahead=True).start()
    try:
        head = engine.submit(pixels, num_beams=4)
        queued = engine.submit(pixels, num_beams=4)
        queued.add_done_callback(lambda h: (engine.pending, engine.idle()))
        queued.cancel()
        assert head.result(60) is not None and queued.done()
        assert engine.submit(pixels).result(60) is not None  # the engine still answers
    finally:
        engine.stop(drain=True, timeout=60)


def test_overflowing_requests_among_many_cost_nobody_else():
    """Threads submit good requests and ones that overflow inside the model to one started
    engine that encodes ahead: every good answer equals its solo run, every bad one fails."""
    import pytest

    from vedrt.runtime import InputError

    gen = load(MODEL, threads=1)
    pixels = gen.preprocess(IMAGES)
    huge = np.full_like(pixels[:1], 3e38)
    solo = {i: gen.generate(pixels[i : i + 1], num_beams=2) for i in range(len(IMAGES))}
    engine = gen.engine(max_rows=8, encode_ahead=True).start()
    handles: list = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(8):  # bounded
            i = int(rng.integers(len(IMAGES)))
            bad = bool(rng.random() < 0.3)
            request = huge if bad else pixels[i : i + 1]
            handles.append((i, bad, engine.submit(request, num_beams=2)))

    try:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, bad, handle in handles:
            if bad:
                with pytest.raises(InputError, match="NaN or infinite"):
                    handle.result(60)
            else:
                np.testing.assert_array_equal(handle.result(60), solo[i])
    finally:
        engine.stop(drain=True, timeout=60)
    assert sum(bad for _, bad, _ in handles) > 0 and len(handles) == 32
