"""The engine when its own threads meet a bug or a hostile callback: no request is lost, none
waits forever, and the engine says what happened (`engine.failure`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vedrt.runtime import EngineStopped, load

SCENES = Path(__file__).resolve().parents[1] / "vedrt" / "models" / "scenes"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LONG = {"num_beams": 4, "max_new_tokens": 30, "eos_token_id": None}

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def generator():
    return load(SCENES)


@pytest.fixture(scope="module")
def images(generator):
    return generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:2])


def exit_now(_handle):
    raise SystemExit(3)


def failure_of(engine, seconds: float = 30.0):
    """The engine's failure, once its loop has recorded it (requests are answered first)."""
    deadline = time.monotonic() + seconds
    while engine.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.failure


def fail_first_encode(monkeypatch) -> None:
    """The encoder thread's first batch raises; later ones encode as usual."""
    import vedrt.runtime.ahead as ahead

    real, calls = ahead.encode_requests, []

    def fails_once(executor, chosen):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("encoder failed")
        return real(executor, chosen)

    monkeypatch.setattr(ahead, "encode_requests", fails_once)


def test_every_callback_of_a_step_runs_even_after_one_raises(generator, images):
    """Two requests finish on the same step; the first one's callback raises SystemExit. The
    second one's callback still runs (an asyncio awaiter of it would otherwise hang)."""
    engine = generator.engine(max_rows=8)
    first = engine.submit(images[:1], max_new_tokens=1)
    second = engine.submit(images[1:2], max_new_tokens=1)
    seen = []
    first.add_done_callback(exit_now)
    second.add_done_callback(seen.append)
    with pytest.raises(SystemExit):
        engine.step()
    assert seen == [second] and first.done() and second.done()


def test_abandoning_settles_every_request_though_their_callbacks_raise(generator, images):
    """A dead loop fails what it holds; a SystemExit from one of those requests' callbacks
    does not stop the others from being settled."""
    engine = generator.engine(max_rows=16)
    trigger = engine.submit(images[:1], max_new_tokens=1)
    others = [engine.submit(images[1:2], **LONG) for _ in range(3)]
    trigger.add_done_callback(exit_now)
    for handle in others:
        handle.add_done_callback(exit_now)
    engine.start()
    for handle in others:
        assert isinstance(handle.exception(timeout=60), EngineStopped)
    assert isinstance(failure_of(engine), SystemExit) and engine.active_rows == 0


def test_a_request_taken_for_admission_is_answered_when_admission_breaks(
    generator, images, monkeypatch
):
    """A bug between leaving the queue and joining the rows: the request fails with the cause
    (it was in neither the queue nor the rows, so nothing else would ever answer it)."""
    engine = generator.engine(max_rows=8)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in place()")

    monkeypatch.setattr(engine._rows, "place", broken)
    handle = engine.submit(images[:1])
    engine.start()
    error = handle.exception(timeout=60)
    assert isinstance(error, EngineStopped) and "a bug in place()" in str(error)
    assert isinstance(failure_of(engine), RuntimeError)


def test_a_dead_encoder_thread_fails_the_engine_instead_of_stalling_it(
    generator, images, monkeypatch
):
    """Encoding ahead: a callback raising SystemExit on the encoder thread (after a failed
    encode) ends that thread; the engine notices, fails what waits, and refuses new requests."""
    fail_first_encode(monkeypatch)
    engine = generator.engine(max_rows=8, encode_ahead=True)
    bad = engine.submit(images[:1], max_new_tokens=3)
    bad.add_done_callback(exit_now)
    engine.start()
    assert isinstance(bad.exception(timeout=30), RuntimeError)
    assert isinstance(failure_of(engine), SystemExit)
    with pytest.raises(EngineStopped, match="failed"):
        engine.submit(images[1:2], max_new_tokens=3)


def test_draining_waits_for_the_encoder_without_spinning(generator, images, monkeypatch):
    """stop(drain=True) while the only request is still being encoded ahead: the loop waits to
    be woken (it called step() hundreds of thousands of times a second before)."""
    import vedrt.runtime.ahead as ahead

    real = ahead.encode_requests

    def slow(executor, chosen):
        time.sleep(0.5)
        return real(executor, chosen)

    monkeypatch.setattr(ahead, "encode_requests", slow)
    engine = generator.engine(max_rows=8, encode_ahead=True).start()
    handle = engine.submit(images[:1], max_new_tokens=3)
    time.sleep(0.1)
    calls, step = [0], engine.step

    def counting():
        calls[0] += 1
        return step()

    engine.step = counting
    engine.stop(drain=True, timeout=60)
    assert handle.result(0).shape[0] == 1
    assert calls[0] < 50


def test_stop_from_a_callback_on_the_encoder_thread_returns(generator, images, monkeypatch):
    """A request that fails to encode runs its callbacks on the encoder thread; one calling
    engine.stop() (drain) must not wait for the loop, which waits for that very thread."""
    fail_first_encode(monkeypatch)
    engine = generator.engine(max_rows=8, encode_ahead=True)
    bad = engine.submit(images[:1], max_new_tokens=3)
    tail = engine.submit(images[1:2], max_new_tokens=3)
    bad.add_done_callback(lambda _h: engine.stop(drain=True))
    engine.start()
    assert tail.result(timeout=60).shape[0] == 1
    assert engine.failure is None
