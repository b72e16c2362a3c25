"""The runtime alone, on the shipped scene model: generation options, the engine and the CLI give
the documented results. Needs no torch, so CI's runtime-only stage runs it where torch is absent
(any torch import on the runtime path fails there; test_runtime_errors.py checks in a subprocess
that none happens even where torch is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vedrt.cli import main
from vedrt.runtime import InputError, load

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parent.parent
SCENES = ROOT / "vedrt" / "models" / "scenes"
EXAMPLES = ROOT / "examples"
ROWS = [json.loads(line) for line in (EXAMPLES / "captions.jsonl").read_text().splitlines()]
IMAGES = [EXAMPLES / row["image"] for row in ROWS]
EOS = 2


@pytest.fixture(scope="module")
def gen():
    return load(SCENES, threads=1)


@pytest.fixture(scope="module")
def pixels(gen) -> np.ndarray:
    return gen.preprocess(IMAGES)


def test_greedy_scores_pick_the_tokens(gen, pixels) -> None:
    out = gen.generate(pixels, return_dict=True, output_scores=True)
    seqs = out.sequences
    assert seqs.dtype == np.int64 and (seqs[:, 0] == 1).all()  # decoder_start_token_id
    assert len(out.scores) == seqs.shape[1] - 1
    for step, scores in enumerate(out.scores):
        live = [r for r in range(len(seqs)) if EOS not in seqs[r, 1 : step + 1]]
        np.testing.assert_array_equal(scores[live].argmax(-1), seqs[live, step + 1])
    assert gen.decode(seqs) == [row["caption"] for row in ROWS]


def test_beams_return_sorted_sequences(gen, pixels) -> None:
    out = gen.generate(pixels, num_beams=4, num_return_sequences=3, return_dict=True)
    assert out.sequences.shape[0] == 3 * len(IMAGES)
    scores = out.sequences_scores.reshape(len(IMAGES), 3)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), scores  # best first
    best = gen.decode(out.sequences)[::3]
    assert best == [row["caption"] for row in ROWS]


def test_sampling_is_seeded_and_top_k_1_is_greedy(gen, pixels) -> None:
    greedy = gen.generate(pixels)
    hot = dict(do_sample=True, temperature=3.0, max_new_tokens=8)
    a = gen.generate(pixels, seed=5, **hot)
    np.testing.assert_array_equal(a, gen.generate(pixels, seed=5, **hot))
    assert any(not np.array_equal(a, gen.generate(pixels, seed=s, **hot)) for s in range(6, 10))
    np.testing.assert_array_equal(gen.generate(pixels, do_sample=True, top_k=1, seed=3), greedy)


def test_no_repeat_ngram_and_max_new_tokens(gen, pixels) -> None:
    out = gen.generate(pixels, max_new_tokens=4)
    assert out.shape[1] <= 5
    for row in gen.generate(pixels, no_repeat_ngram_size=1, max_new_tokens=12):
        tokens = [int(t) for t in row[1:] if t != 0]
        assert len(tokens) == len(set(tokens)), row


def test_engine_results_equal_generate(gen, pixels) -> None:
    """Requests of different options through one small engine: each equals its solo generate()."""
    requests = [
        (pixels[:1], {}),
        (pixels[1:3], {"num_beams": 4}),
        (pixels[3:4], {"num_beams": 2, "num_return_sequences": 2}),
        (pixels[4:6], {"max_new_tokens": 5}),
        (pixels[5:6], {"num_beams": 3, "no_repeat_ngram_size": 2}),
    ]
    engine = gen.engine(max_rows=8)
    handles = [engine.submit(pv, **options) for pv, options in requests]
    for _ in range(1000):  # bounded: every request needs at most 32 steps
        if all(h.done() for h in handles):
            break
        engine.step()
    for handle, (pv, options) in zip(handles, requests, strict=True):
        assert handle.done()
        np.testing.assert_array_equal(handle.result(timeout=0), gen.generate(pv, **options))


def test_engine_thread_serves_submissions(gen, pixels) -> None:
    engine = gen.engine(max_rows=8).start()
    try:
        handles = [engine.submit(pixels[i : i + 1], num_beams=2) for i in range(len(IMAGES))]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.stop(drain=True)
    assert [gen.decode(r)[0] for r in results] == [row["caption"] for row in ROWS]


def test_engine_rejects_a_request_larger_than_its_rows(gen, pixels) -> None:
    engine = gen.engine(max_rows=4)
    with pytest.raises(InputError, match="needs 8 decoder rows.*max_rows=4"):
        engine.submit(pixels[:2], num_beams=4)


def test_cli_captions_examples_with_the_default_model(capsys) -> None:
    assert main(["caption", *map(str, IMAGES), "--json", "--num-beams", "3"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in records] == [row["caption"] for row in ROWS]
    assert [r["image"] for r in records] == [str(p) for p in IMAGES]


def test_cli_folder_stands_for_its_images(tmp_path: Path, capsys) -> None:
    """A folder is its image files by name (not its other files, not its subfolders); a folder
    without any is one error line, and the other images are still captioned."""
    import shutil

    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(IMAGES[1], folder / "b.PNG")
    shutil.copy(IMAGES[0], folder / "a.png")
    shutil.copy(IMAGES[2], folder / "nested" / "c.png")
    (folder / "notes.txt").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["caption", str(folder), str(empty), str(IMAGES[3])]) == 1
    captured = capsys.readouterr()
    lines = [line.split("\t") for line in captured.out.splitlines()]
    assert lines == [
        [str(folder / "a.png"), ROWS[0]["caption"]],
        [str(folder / "b.PNG"), ROWS[1]["caption"]],
        [str(IMAGES[3]), ROWS[3]["caption"]],
    ]
    assert f"{empty}: a folder without image files" in captured.err
    assert "1 of 4 images failed" in captured.err


def test_cli_plain_output_keeps_its_columns_for_any_file_name(tmp_path: Path, capsys) -> None:
    import shutil

    odd = tmp_path / "a\tb\nc.png"
    shutil.copy(IMAGES[0], odd)
    assert main(["caption", str(odd), str(IMAGES[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t") for line in lines] == [
        [json.dumps(str(odd)), ROWS[0]["caption"]],
        [str(IMAGES[1]), ROWS[1]["caption"]],
    ]


def test_cli_explain_never_writes_over_a_file(tmp_path: Path, capsys) -> None:
    """Not over an image being captioned (it was read after its map replaced it, and captioned
    wrong), not over anything else: a usage error before any work."""
    import shutil

    photo, notes = tmp_path / "b.png", tmp_path / "notes.txt"
    shutil.copy(IMAGES[1], photo)
    notes.write_text("mine")
    for target in (photo, notes):
        before = target.read_bytes()
        assert (
            main(
                [
                    "caption",
                    "--batch-size",
                    "1",
                    "--explain",
                    str(target),
                    str(IMAGES[0]),
                    str(photo),
                ]
            )
            == 2
        )
        assert target.read_bytes() == before
        assert "exists: vedrt does not overwrite files" in capsys.readouterr().err
    (tmp_path / "map-2.png").write_bytes(b"x")  # the second image's map name is taken
    assert (
        main(["caption", "--explain", str(tmp_path / "map.png"), str(IMAGES[0]), str(IMAGES[1])])
        == 2
    )
    assert not (tmp_path / "map.png").exists()


def test_cli_explain_writes_a_map_per_image(tmp_path: Path, capsys) -> None:
    from PIL import Image

    out = tmp_path / "map.png"
    assert main(["caption", *map(str, IMAGES[:2]), "--explain", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    for path in (out, tmp_path / "map-2.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 64


def test_encoder_calls_of_a_few_images_give_the_whole_batch(gen, pixels, monkeypatch) -> None:
    """Large batches go through the CPU encoder a few images a call (executor.ENCODE_TOKENS):
    the states, and so the captions, are those of one call over the batch."""
    from vedrt.runtime import executor

    assert len(pixels) >= 4
    whole = gen.executor.encode(pixels)
    calls = []
    real = gen.executor._encode
    monkeypatch.setattr(
        gen.executor, "_encode", lambda feed, into=None: calls.append(feed) or real(feed, into)
    )
    monkeypatch.setattr(executor, "ENCODE_TOKENS", 3 * gen.manifest.enc_len)
    parts = gen.executor.encode(pixels)
    assert [len(feed["pixel_values"]) for feed in calls] == [3] * (len(pixels) // 3) + (
        [len(pixels) % 3] if len(pixels) % 3 else []
    )
    assert np.array_equal(parts.mask, whole.mask)
    for a, b in zip(parts.cross, whole.cross, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)
    chunked = gen.generate(pixels, num_beams=3)
    monkeypatch.setattr(executor, "ENCODE_TOKENS", 10**9)
    assert np.array_equal(chunked, gen.generate(pixels, num_beams=3))


def test_generate_keeps_its_engine_for_the_next_call_of_its_shape(gen, pixels, monkeypatch):
    """generate() reuses the last call's engine (pool and bindings) when rows and cache length
    match, with the same tokens as a new engine; never after a failure, never a large pool."""
    from vedrt.runtime import generator as generator_module
    from vedrt.runtime.engine import Engine

    fresh = load(SCENES, threads=1)
    fresh._keep = lambda engine: None  # a new engine every call: what every call must equal
    gen._spare = None
    first = gen.generate(pixels[:2], num_beams=3)
    assert (first == fresh.generate(pixels[:2], num_beams=3)).all()
    engine = gen._spare
    assert engine is not None and engine.pool_bytes() > 0
    again = gen.generate(pixels[:2], num_beams=3, max_new_tokens=4)  # another cache length
    assert gen._spare is not engine
    assert (again == fresh.generate(pixels[:2], num_beams=3, max_new_tokens=4)).all()
    engine = gen._spare
    assert (gen.generate(pixels[:2], num_beams=3, max_new_tokens=4) == again).all()
    assert gen._spare is engine  # same shape: the same engine
    assert (
        gen.generate(pixels[2:4], num_beams=3) == fresh.generate(pixels[2:4], num_beams=3)
    ).all()

    def fail(self):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "step", fail)
        with pytest.raises(RuntimeError, match="boom"):
            gen.generate(pixels[:2], num_beams=3)
    assert gen._spare is None  # the failed call's engine is not kept
    monkeypatch.setattr(generator_module, "SPARE_POOL_BYTES", 0)
    assert (gen.generate(pixels[:2], num_beams=3) == first).all()
    assert gen._spare is None


def test_admission_encodes_into_the_pool_slots(gen, pixels, monkeypatch) -> None:
    """Images admitted into slots that follow one another get their cross K/V written there by
    the encoder (no copy); scattered free slots fall back to encode-and-copy. Same tokens."""
    from vedrt.runtime.pool import KVPool

    written, copied = [], []
    real_into, real_put = gen.executor.encode_into, KVPool.put_image
    monkeypatch.setattr(
        gen.executor, "encode_into", lambda p, into: written.append(len(p)) or real_into(p, into)
    )
    monkeypatch.setattr(
        KVPool, "put_image", lambda self, *a: copied.append(a[0]) or real_put(self, *a)
    )
    solo = [
        gen.generate(pixels[i : i + 1], num_beams=2, max_new_tokens=n)
        for i, n in enumerate((8, 2, 7))
    ]
    assert written == [1, 1, 1] and copied == []
    engine = gen.engine(max_rows=6)
    handles = [
        engine.submit(pixels[i : i + 1], num_beams=2, max_new_tokens=n)
        for i, n in enumerate((8, 2, 7))
    ]
    while not handles[1].done():  # the middle one (its own cohort and slot) leaves first
        engine.step()
    late = engine.submit(pixels[3:5], max_new_tokens=4)  # needs 2 slots: 1 and 3, apart
    while not engine.idle():
        engine.step()
    for handle, expected in zip(handles, solo, strict=True):
        assert np.array_equal(handle.result(), expected)
    assert np.array_equal(late.result(), gen.generate(pixels[3:5], max_new_tokens=4))
    assert copied == [1, 3]  # the scattered slots were filled by copies


def test_a_failed_encode_into_the_slots_frees_them(gen, pixels, monkeypatch) -> None:
    """The slots are claimed before the encoder writes into them: when it fails, the request
    gets the error and the slots go back, so the next request runs as if nothing happened."""
    real = gen.executor.encode_into

    def failing(p, into):
        if np.all(p == 0.5):
            raise RuntimeError("this image breaks the encoder")
        return real(p, into)

    monkeypatch.setattr(gen.executor, "encode_into", failing)
    engine = gen.engine(max_rows=2)
    broken = engine.submit(np.full_like(pixels[:1], 0.5))
    engine.step()
    with pytest.raises(RuntimeError, match="breaks the encoder"):
        broken.result(0)
    assert not any(engine._rows.slot_used)
    fine = engine.submit(pixels[:1], num_beams=2)
    while not engine.idle():
        engine.step()
    assert np.array_equal(fine.result(), gen.generate(pixels[:1], num_beams=2))
