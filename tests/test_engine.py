"""The engine: requests of different options joining and leaving one batch at every decoder step.

Each request's result must be what `generate()` gives it alone. On the shipped scene model that
holds exactly. On tiny random-weight models a request batched beside others can see logits that
differ from its solo run in the last float bits (matrix products of other shapes), so the test
counts identical results and shows that every difference starts at a near-tie: a step where two
of the scores the search ranked were within 1e-4 in the solo run.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from vedrt.runtime import EngineStopped, InputError, load
from vedrt.runtime.ops import NumpyOps
from vedrt.runtime.options import PROMPT_LEN

SCENES = Path(__file__).resolve().parents[1] / "vedrt" / "models" / "scenes"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEAR_TIE = 1e-4

# (images, options, step at which it is submitted)
MIX = [
    (1, {}, 0),
    (1, {"num_beams": 4}, 0),
    (2, {"num_beams": 2, "max_new_tokens": 7}, 0),  # a multi-image request
    (1, {"num_beams": 5, "num_return_sequences": 3}, 1),
    (1, {"num_beams": 3, "no_repeat_ngram_size": 2}, 2),
    (1, {"max_new_tokens": 4}, 2),
    (1, {"num_beams": 4, "max_new_tokens": 25, "length_penalty": 0.5}, 3),  # grows the cache
    (1, {"num_beams": 2, "num_return_sequences": 2, "early_stopping": True}, 5),
    (2, {}, 6),
    (1, {"do_sample": True, "seed": 7, "num_return_sequences": 2}, 6),
]


def run_mix(generator, images: np.ndarray, max_rows: int, mix=MIX):
    """Submit `mix` at its steps into one engine; returns [(pixel_values, options, handle)]."""
    engine = generator.engine(max_rows=max_rows)
    submitted, cursor, step = [], 0, 0
    waited = False
    while step < 500:
        for count, options, at in mix:
            if at == step:
                pv = images[cursor % len(images) : cursor % len(images) + count]
                if len(pv) < count:
                    pv = images[:count]
                cursor += count
                submitted.append((pv, options, engine.submit(pv, **options)))
        waited |= engine.pending > 0
        engine.step()
        step += 1
        if step > max(at for *_, at in mix) and engine.idle():
            break
    assert engine.idle(), "the engine did not finish every request"
    assert waited, "the engine was meant to be small enough that some requests waited"
    return submitted


@pytest.mark.runtime
def test_mixed_requests_on_the_scene_model_equal_their_solo_runs():
    generator = load(SCENES)
    paths = sorted(EXAMPLES.glob("*.png")) + sorted(EXAMPLES.glob("*.jpg"))
    images = generator.preprocess(paths)
    for pv, options, handle in run_mix(generator, images, max_rows=10):
        solo = generator.generate(pv, **options)
        np.testing.assert_array_equal(handle.result(), solo, err_msg=str(options))


class RecordingOps(NumpyOps):
    """Numpy ops that remember, per step, the smallest gap between the ranked scores."""

    def __init__(self):
        self.gaps: list[float] = []

    def _gap(self, values: np.ndarray) -> None:
        """Smallest gap between adjacent ranked scores of any row, among the real scores (not
        the -1e9 / -inf placeholders of masked candidates)."""
        gaps = [1.0]
        for row in values:
            real = row[row > -1e8]
            if len(real) > 1:
                gaps.append(float(np.min(-np.diff(real))))
        self.gaps.append(min(gaps))

    def topk(self, x, k):
        values, idx = super().topk(x, min(k + 1, x.shape[-1]))
        self._gap(values)
        return values[:, :k], idx[:, :k]

    def argmax(self, x):
        self._gap(-np.sort(-x, axis=-1)[:, :2])
        return super().argmax(x)


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first generated position (0-based, after the prompt) where two id arrays differ."""
    length = min(a.shape[1], b.shape[1])
    diff = np.nonzero((a[:, :length] != b[:, :length]).any(axis=0))[0]
    if len(diff):
        return int(diff[0]) - PROMPT_LEN
    return None if a.shape == b.shape else length - PROMPT_LEN


@pytest.mark.parametrize("family", [("vit", "gpt2"), ("deit", "trocr")], ids="-".join)
def test_mixed_requests_on_random_models_differ_only_at_near_ties(family, tmp_path):
    pytest.importorskip("torch")
    from test_runtime_parity import eos_ids, spread_model

    from vedrt.export import export_model

    model = spread_model(*family)
    export_model(model, tmp_path / "export", validate=False)
    generator = load(tmp_path / "export")
    images = np.random.RandomState(3).randn(6, 3, 32, 32).astype(np.float32)
    eos = eos_ids(model, images)[0]
    mix = [(n, {**o, "eos_token_id": eos}, at) for n, o, at in MIX]
    identical, report = 0, []
    for pv, options, handle in run_mix(generator, images, max_rows=10, mix=mix):
        ours = handle.result()
        recording = RecordingOps()
        generator.executor.ops = recording  # the solo run, with its ranking gaps recorded
        try:
            solo = generator.generate(pv, **options)
        finally:
            del generator.executor.ops
        position = first_difference(ours, solo)
        if position is None:
            identical += 1
            continue
        calls = 3 if options.get("num_beams", 1) > 1 else 1  # beam search ranks 3 times a step
        gaps = recording.gaps[: (position + 1) * calls]
        report.append((options, position, min(gaps)))
        assert min(gaps) < NEAR_TIE, f"{options}: differs at {position} without a near-tie"
    print(f"{family}: {identical}/{len(mix)} identical to their solo runs; differences: {report}")
    assert identical >= len(mix) // 2


def assert_equals_solo(generator, pv, options: dict, ours) -> None:
    """`ours` is what `generate(pv, **options)` alone returns (beam indices and scores too)."""
    solo = generator.generate(pv, **options)
    if options.get("return_dict"):
        np.testing.assert_array_equal(ours.beam_indices, solo.beam_indices)
        np.testing.assert_allclose(ours.sequences_scores, solo.sequences_scores, atol=1e-6)
        solo, ours = solo.sequences, ours.sequences
    np.testing.assert_array_equal(ours, solo)


@pytest.mark.runtime
@pytest.mark.parametrize("options", [{}, {"num_beams": 3}, {"num_beams": 2, "return_dict": True}])
def test_requests_admitted_together_share_one_search(options):
    """Equal options, admitted on the same step: one cohort search, each request answered as
    soon as its own images are done, with exactly its solo result."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png")) + sorted(EXAMPLES.glob("*.jpg")))
    engine = generator.engine(max_rows=32)
    handles = [engine.submit(images[i : i + 1], **options) for i in range(4)]
    handles.append(engine.submit(images[4:6], **options))  # a two-image member
    cancelled = engine.submit(images[:1], **options)
    engine.step()
    assert engine.active_requests == 1  # one search for all six
    assert cancelled.cancel()
    answered_at = {}
    for step in range(100):
        for handle in engine.step():
            answered_at[id(handle)] = step
        if engine.idle():
            break
    assert len(set(answered_at.values())) > 1, "members should finish at their own steps"
    for i, handle in enumerate(handles):
        pv = images[i : i + 1] if i < 4 else images[4:6]
        assert_equals_solo(generator, pv, options, handle.result())
    with pytest.raises(EngineStopped):
        cancelled.result()


@pytest.mark.runtime
def test_groups_read_their_slots_in_place_until_a_request_leaves():
    """Requests admitted together: group g reads slot g, so the decoder gets the pool's slots in
    place (no copy of any image's K/V). After the first leaves, the others' slots (1, 2) are no
    longer groups (0, 1): their K/V are gathered once for that layout, and every result is still
    exactly its solo one."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:3])
    engine = generator.engine(max_rows=32)
    options = [
        {"num_beams": 4, "max_new_tokens": 1},
        {"num_beams": 4},
        {"num_beams": 4, "length_penalty": 0.5},
    ]
    handles = [engine.submit(images[i : i + 1], **o) for i, o in enumerate(options)]
    engine.step()
    pool = engine.pool
    assert pool.in_place and pool.group_cross is None
    while not handles[0].done():
        engine.step()
    engine.step()
    assert not pool.in_place and pool.group_slots[:2].tolist() == [1, 2]
    np.testing.assert_array_equal(pool.group_cross[:, :2], pool.cross[:, 1:3])
    while not engine.idle():
        engine.step()
    for i, (handle, o) in enumerate(zip(handles, options, strict=True)):
        assert_equals_solo(generator, images[i : i + 1], o, handle.result())


@pytest.mark.runtime
@pytest.mark.parametrize(
    "options",
    [{}, {"num_beams": 4}, {"num_beams": 3, "return_dict": True, "length_penalty": 0.7}],
)
def test_requests_arriving_at_different_steps_join_one_search(options):
    """Equal options without processors: a request arriving while others run joins their
    search at its own length, leaves it when done (its rows freed at once), and gets exactly its
    solo result. A request of other options in between makes the joined cohort a middle one."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png")) + sorted(EXAMPLES.glob("*.jpg")))
    engine = generator.engine(max_rows=20)
    plan = {0: [images[0:1]], 1: [images[1:2]], 2: [images[2:4]], 4: [images[4:5]]}
    submitted, other, cancelled, rows_seen = [], None, None, []
    for step in range(200):
        for pv in plan.get(step, []):
            submitted.append((pv, engine.submit(pv, **options)))
        if step == 1:
            other = engine.submit(images[5:6], num_beams=2, no_repeat_ngram_size=2)
            cancelled = engine.submit(images[0:1], **options)
        if step == 3:
            assert engine.active_requests == 2  # one search per option set, not per request
            assert cancelled.cancel()
        engine.step()
        rows_seen.append(engine.active_rows)
        if step > 4 and engine.idle():
            break
    assert engine.idle()
    assert len(set(rows_seen)) > 3, "rows should be freed as each request leaves"
    for pv, handle in submitted:
        assert_equals_solo(generator, pv, options, handle.result())
    ngram = generator.generate(images[5:6], num_beams=2, no_repeat_ngram_size=2)
    np.testing.assert_array_equal(other.result(), ngram)
    with pytest.raises(EngineStopped):
        cancelled.result()


@pytest.mark.runtime
def test_engine_limits_order_and_cancellation():
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:3])
    engine = generator.engine(max_rows=4)
    with pytest.raises(InputError, match="max_rows=4"):
        engine.submit(images[:2], num_beams=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        engine.submit(images[:1], beams=2)
    first = engine.submit(images[:1], num_beams=3)  # 3 rows
    big = engine.submit(images[1:2], num_beams=4)  # 4 rows: waits for the first
    small = engine.submit(images[2:3])  # 1 row: would fit, but does not overtake `big`
    engine.step()
    assert engine.active_rows == 3 and engine.pending == 2
    assert repr(first) == "<Handle running: 1 input(s), 3 row(s)>"
    assert repr(big) == "<Handle waiting: 1 input(s), 4 row(s)>"
    gone = engine.submit(images[:1])
    assert gone.cancel()
    assert repr(gone) == "<Handle cancelled: 1 input(s), 1 row(s)>"
    while not first.done():
        engine.step()
    engine.step()
    assert big.done() or engine.active_rows >= 4
    while not engine.idle():
        engine.step()
    assert [h.done() for h in (first, big, small, gone)] == [True] * 4
    with pytest.raises(EngineStopped):
        gone.result()
    np.testing.assert_array_equal(small.result(), generator.generate(images[2:3]))
    assert repr(small) == "<Handle finished: 1 input(s), 1 row(s)>"


@pytest.mark.runtime
def test_background_loop_threads_and_stop():
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png")))
    solo = [generator.generate(images[i : i + 1], num_beams=2) for i in range(len(images))]
    engine = generator.engine(max_rows=6).start()
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        results[i] = engine.submit(images[i : i + 1], num_beams=2).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    for i in range(len(images)):
        np.testing.assert_array_equal(results[i], solo[i])
    engine.stop(drain=True, timeout=30)
    with pytest.raises(EngineStopped):
        engine.submit(images[:1])
    stopped = generator.engine(max_rows=1)
    waiting = [stopped.submit(images[:1]) for _ in range(3)]
    stopped.stop(drain=False)
    assert all(isinstance(h.exception(timeout=1), EngineStopped) for h in waiting)


@pytest.mark.runtime
def test_encoding_ahead_on_a_second_thread():
    """The background loop with the encoder on its own thread: concurrent requests get their
    solo results; a request whose encoding fails gets the error alone, even when it was in one
    encoder batch with others."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png")) + sorted(EXAMPLES.glob("*.jpg")))
    bad = np.full_like(images[:1], 0.5)
    encode = generator.executor.encode

    def failing(pixels):
        if any(np.all(p == 0.5) for p in pixels):
            raise RuntimeError("this image breaks the encoder")
        return encode(pixels)

    generator.executor.encode = failing
    plans = [(images[i % len(images)][None], {"num_beams": 1 + i % 3}) for i in range(12)]
    solo = [generator.generate(pv, **options) for pv, options in plans]
    engine = generator.engine(max_rows=8, encode_ahead=True)
    handles = [engine.submit(pv, **options) for pv, options in plans[:6]]
    broken = engine.submit(bad)
    handles += [engine.submit(pv, **options) for pv, options in plans[6:]]
    engine.start()
    try:
        for handle, expected in zip(handles, solo, strict=True):
            np.testing.assert_array_equal(handle.result(timeout=60), expected)
        with pytest.raises(RuntimeError, match="breaks the encoder"):
            broken.result(timeout=60)
    finally:
        engine.stop(drain=True, timeout=30)
    assert engine.idle() and engine._ahead is None


@pytest.mark.runtime
@pytest.mark.parametrize("encode_ahead", [False, True])
def test_background_threads_are_woken_not_polled(encode_ahead):
    """Each request must wake the loop (and the encoder thread) at once: with the polling
    safety net set to a minute, sequential requests still finish well inside it."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png")))
    engine = generator.engine(max_rows=4, encode_ahead=encode_ahead)
    engine.poll_seconds = 60.0
    engine.start()
    try:
        for i in range(4):  # each arrives when the threads are idle again
            result = engine.submit(images[i % len(images)][None]).result(timeout=20)
            np.testing.assert_array_equal(result, generator.generate(images[i % len(images)][None]))
    finally:
        engine.poll_seconds = 0.1
        engine.stop(drain=True, timeout=30)


@pytest.mark.runtime
def test_admission_window_holds_new_requests_while_rows_run():
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:2])
    engine = generator.engine(max_rows=8, admit_every=3600.0)
    first = engine.submit(images[:1])
    engine.step()  # nothing runs yet: admitted at once
    second = engine.submit(images[1:2])
    engine.step()
    assert engine.active_requests == 1 and engine.pending == 1  # waits for the window
    while not first.done():
        engine.step()
    while not second.done():  # the engine ran dry: admitted without waiting
        engine.step()
    np.testing.assert_array_equal(second.result(), generator.generate(images[1:2]))


@pytest.mark.runtime
def test_a_request_the_pool_cannot_take_fails_alone():
    """An admission failure (here: the executor refuses the pool) answers those requests with
    the error instead of leaving them waiting forever."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:1])
    engine = generator.engine(max_rows=4)

    def refuse(*args, **kwargs):
        raise InputError("no room on this device")

    generator.executor.new_pool = refuse
    try:
        handle = engine.submit(images)
        engine.step()
        with pytest.raises(InputError, match="no room"):
            handle.result(timeout=1)
    finally:
        del generator.executor.new_pool
    assert engine.idle()


@pytest.mark.runtime
def test_a_beam_reorder_copies_only_the_positions_a_row_does_not_share():
    """Each step, every cache row the engine holds equals what copying whole rows gives, over the
    positions the row holds, though only the positions after a row's shared history are copied
    (`Advance.shared`); the copy takes overlapping rows (a row both read and written)."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:3])
    options = {"num_beams": 4, "max_new_tokens": 12, "eos_token_id": None}

    def run(whole_rows: bool) -> list[np.ndarray]:
        engine = generator.engine(max_rows=12)
        handles = [engine.submit(images[i : i + 1], **options) for i in range(3)]
        caches = []
        while not engine.idle():
            pool = engine.pool
            if whole_rows and pool is not None and not hasattr(pool, "_partial"):
                pool._partial = pool.copy_positions
                pool.copy_positions = lambda s, t, start, n, p=pool: p._partial(s, t, 0 * start, n)
            engine.step()
            if engine.active_rows:
                rows, length = engine.active_rows, engine.pool.filled(0, engine.active_rows)
                caches.append(engine.pool.cache[:, :, :rows, :, :length].copy())
        assert all(h.done() for h in handles)
        return caches

    partial, whole = run(False), run(True)
    assert len(partial) == len(whole) > 5
    for ours, full in zip(partial, whole, strict=True):
        np.testing.assert_array_equal(ours, full)


@pytest.mark.runtime
def test_copy_positions_reads_every_source_before_writing():
    """Rows that are both read and written in one reorder (beam 1 continues beam 0 while beam 2
    continues beam 1) get their sources' old contents, and positions before `start` stay."""
    from vedrt.runtime.pool import KVPool

    pool = KVPool(NumpyOps(), (2, 3, 4), rows=4, slots=1, cache_len=6, enc_len=2, dtype=np.float32)
    pool.cache[...] = np.random.default_rng(0).standard_normal(pool.cache.shape)
    before = pool.cache.copy()
    source, target, start = np.array([0, 1, 0]), np.array([1, 2, 3]), np.array([2, 0, 5])
    pool.copy_positions(source, target, start, 5)
    for s, t, first in zip(source, target, start, strict=True):
        np.testing.assert_array_equal(pool.cache[:, :, t, :, first:5], before[:, :, s, :, first:5])
        np.testing.assert_array_equal(pool.cache[:, :, t, :, :first], before[:, :, t, :, :first])
        np.testing.assert_array_equal(pool.cache[:, :, t, :, 5:], before[:, :, t, :, 5:])
    np.testing.assert_array_equal(pool.cache[:, :, 0], before[:, :, 0])


@pytest.mark.runtime
@pytest.mark.parametrize("eos", [None, (3,)])
def test_beam_steps_that_skip_ranking_unmasked_candidates_change_nothing(eos):
    """Candidates come out of a top-k sorted best first, so with none masked by an EOS the beam
    step keeps the first `num_beams` without ranking them again (numpy only). On scores full of
    ties, every step's tokens, source rows and shared histories, and the result, are those of the
    same search that ranks them."""
    from vedrt.runtime.beam import BeamSearch
    from vedrt.runtime.options import resolve

    class Ranking(NumpyOps):
        sorted_topk_is_identity = False

    options = resolve(
        {"decoder_start_token_id": 1, "pad_token_id": 0, "eos_token_id": eos},
        {"num_beams": 4, "max_new_tokens": 12, "num_return_sequences": 2},
    )
    rng = np.random.default_rng(0)
    fast, ranked = BeamSearch(NumpyOps(), options, 3), BeamSearch(Ranking(), options, 3)
    for _ in range(12):
        # coarse log-probs (many exact ties), sorted best first per row, as the graph's top-k
        scores = -np.sort(rng.integers(0, 4, (12, 8)), axis=1).astype(np.float32)
        ids = np.stack([rng.permutation(np.arange(2, 40))[:8] for _ in range(12)])
        a = fast.step(np.zeros((12, 40), np.float32), None, (scores, ids))
        b = ranked.step(np.zeros((12, 40), np.float32), None, (scores, ids))
        for x, y in [(a.tokens, b.tokens), (a.source_rows, b.source_rows), (a.shared, b.shared)]:
            np.testing.assert_array_equal(x, y)
        assert a.done == b.done
        if a.done:
            break
    ours, theirs = fast.result(), ranked.result()
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    np.testing.assert_array_equal(ours.sequences_scores, theirs.sequences_scores)


@pytest.mark.runtime
def test_graph_seconds_leave_out_the_hosts_writes_around_the_graph(monkeypatch):
    """`stats["decode_seconds"]` is what benchmarks call the graph's share of a step: on ONNX
    Runtime it must count the session's run alone, not the new K/V the host writes into the
    pool after it (search-side work; it was counted as graph time before 2026-12-06)."""
    import time

    from vedrt.runtime.pool import KVPool

    write = KVPool.write_new

    def slow_write(self, new_kv, rows):
        time.sleep(0.01)
        write(self, new_kv, rows)

    monkeypatch.setattr(KVPool, "write_new", slow_write)
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:1])
    engine = generator.engine(max_rows=8)
    handle = engine.submit(images, num_beams=2, max_new_tokens=3)
    while not engine.idle():
        engine.step()
    assert handle.done()
    steps = engine.stats["steps"]
    assert engine.stats["decode_seconds"] < 0.01 * steps  # the sleeps are host time
    assert engine.stats["step_seconds"] >= 0.01 * steps


@pytest.mark.runtime
def test_handles_are_futures_for_wait_as_completed_and_asyncio():
    """A handle is a `concurrent.futures.Future`: `wait` and `as_completed` take a list of
    them, `asyncio.wrap_future` awaits one, and cancelling the awaiting task cancels the
    request (it leaves the engine's rows at the next step)."""
    import asyncio
    import concurrent.futures as cf

    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:3])
    solo = [generator.generate(images[i : i + 1], num_beams=2) for i in range(3)]
    engine = generator.engine(max_rows=8).start()
    try:
        handles = [engine.submit(images[i : i + 1], num_beams=2) for i in range(3)]
        assert all(isinstance(h, cf.Future) for h in handles)
        done, not_done = cf.wait(handles, timeout=60)
        assert len(done) == 3 and not not_done
        assert {id(h) for h in cf.as_completed(handles, timeout=60)} == {id(h) for h in handles}
        for handle, expected in zip(handles, solo, strict=True):
            np.testing.assert_array_equal(handle.result(), expected)

        async def main():
            awaited = await asyncio.gather(
                *(
                    asyncio.wrap_future(engine.submit(images[i : i + 1], num_beams=2))
                    for i in range(3)
                )
            )
            long = engine.submit(images[:1], num_beams=4, max_new_tokens=30, eos_token_id=None)
            task = asyncio.ensure_future(asyncio.wrap_future(long))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return awaited, long

        awaited, long = asyncio.run(main())
        for got, expected in zip(awaited, solo, strict=True):
            np.testing.assert_array_equal(got, expected)
        assert isinstance(long.exception(timeout=30), EngineStopped) and long.cancelled()
    finally:
        engine.stop(drain=False)


@pytest.mark.runtime
def test_cancel_that_returns_true_always_ends_cancelled(monkeypatch):
    """`cancel()` during the request's last step (after the engine's check for cancelled
    requests): True means the request ends cancelled, as for any future, not with its result."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:1])
    engine = generator.engine(max_rows=4)
    handle = engine.submit(images, max_new_tokens=1)  # done in its first step
    decode = engine.executor.decode
    answers = []

    def decode_and_cancel(*args, **kwargs):
        answers.append(handle.cancel())
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.executor, "decode", decode_and_cancel)
    engine.step()
    assert answers == [True] and handle.done() and handle.cancelled()
    assert isinstance(handle.exception(0), EngineStopped)
    assert engine.idle() and engine.active_rows == 0


@pytest.mark.runtime
def test_done_is_never_ahead_of_result():
    """A poller that sees `done()` gets the answer from `result(0)` at once (`done()` reads the
    future's own state, not a flag set before it)."""
    import sys

    from vedrt.runtime.handle import Handle

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for i in range(300):
            handle = Handle(np.zeros((1, 3, 2, 2), np.float32), None, 1)
            thread = threading.Thread(target=handle._finish, args=(i,))
            thread.start()
            while not handle.done():
                pass
            assert handle.result(0) == i
            thread.join()
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.runtime
def test_a_dead_background_loop_fails_its_requests_instead_of_hanging():
    """A done callback raising SystemExit (not caught, as concurrent.futures does not) ends
    the loop: every request it held fails with EngineStopped, the engine refuses new ones and
    says why in `failure`; and `stop()` from a callback on the engine's thread just stops it."""
    generator = load(SCENES)
    images = generator.preprocess(sorted(EXAMPLES.glob("*.png"))[:2])
    engine = generator.engine(max_rows=8)
    first = engine.submit(images[:1], max_new_tokens=1)
    other = engine.submit(images[1:2], num_beams=4, max_new_tokens=30, eos_token_id=None)

    def exit_now(_handle):
        raise SystemExit(3)

    first.add_done_callback(exit_now)
    engine.start()
    error = other.exception(timeout=60)
    assert isinstance(error, EngineStopped) and "engine failed" in str(error)
    assert isinstance(engine.failure, SystemExit) and engine.active_rows == 0
    with pytest.raises(EngineStopped):
        engine.submit(images[:1])

    engine = generator.engine(max_rows=8)
    head = engine.submit(images[:1], max_new_tokens=1)
    head.add_done_callback(lambda _h: engine.stop(drain=False))
    tail = engine.submit(images[1:2], num_beams=4, max_new_tokens=30, eos_token_id=None)
    engine.start()
    assert isinstance(tail.exception(timeout=60), EngineStopped) and engine.failure is None
