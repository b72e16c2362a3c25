"""Option resolution follows transformers' priorities and length rules (no model needed)."""

from __future__ import annotations

import dataclasses
import inspect
import sys

import numpy as np
import pytest

from vedrt.runtime.errors import InputError
from vedrt.runtime.ops import NUMPY
from vedrt.runtime.options import GenerationOptions, resolve
from vedrt.runtime.processors import banned_ngram_tokens, top_k, top_p

CHECKPOINT = {"decoder_start_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 20}


@pytest.mark.runtime
def test_defaults_follow_transformers():
    o = resolve(CHECKPOINT, {})
    assert o.max_length == 21  # the default max_length 20 means 20 *new* tokens
    assert (o.num_beams, o.length_penalty, o.early_stopping, o.top_k) == (1, 1.0, False, 50)
    assert o.eos_token_id == (2,) and o.pad_token_id == 0 and o.decoder_start_token_id == 1
    assert resolve(CHECKPOINT, {"max_length": 20}).max_length == 20  # explicit: taken as is
    assert resolve({**CHECKPOINT, "max_length": 32}, {}).max_length == 32
    assert resolve(CHECKPOINT, {"max_new_tokens": 7, "max_length": 50}).max_length == 8
    assert resolve({**CHECKPOINT, "num_beams": 4}, {}).num_beams == 4
    assert resolve({**CHECKPOINT, "num_beams": 4}, {"num_beams": 1}).num_beams == 1


@pytest.mark.runtime
def test_special_token_fallbacks():
    o = resolve({"bos_token_id": 5, "eos_token_id": [7, 8]}, {})
    assert o.decoder_start_token_id == 5 and o.eos_token_id == (7, 8) and o.pad_token_id == 7
    with pytest.raises(InputError, match="decoder_start_token_id"):
        resolve({}, {})


@pytest.mark.runtime
def test_min_new_tokens_wins_over_min_length():
    assert resolve(CHECKPOINT, {"min_new_tokens": 4, "min_length": 10}).min_length == 5
    assert resolve(CHECKPOINT, {"min_length": 10}).min_length == 10


@pytest.mark.runtime
def test_a_minimum_above_the_limit():
    """The checkpoint's minimum above the call's limit warns and keeps EOS forbidden to the end,
    as transformers does; a minimum the caller passed is an error naming it."""
    checkpoint = {**CHECKPOINT, "min_length": 10}
    with pytest.warns(UserWarning, match="min_length=10.*max_new_tokens=3"):
        assert resolve(checkpoint, {"max_new_tokens": 3}).min_length == 10
    with pytest.warns(UserWarning, match="min_length=10"):
        resolve({**CHECKPOINT, "min_new_tokens": 9}, {"max_length": 5})
    with pytest.raises(InputError, match="min_length=30 is more than max_new_tokens=9"):
        resolve(CHECKPOINT, {"min_length": 30, "max_length": 10})
    with pytest.raises(InputError, match="min_new_tokens=12 is more than max_new_tokens=3"):
        resolve(checkpoint, {"min_new_tokens": 12, "max_new_tokens": 3})


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["length_penalty", "repetition_penalty", "temperature", "top_p"])
def test_nan_options_are_errors(name):
    """NaN passes every range check (NaN <= 0 is false), and gave empty or constant outputs."""
    with pytest.raises(InputError, match=f"{name} must be a number, got NaN"):
        resolve(CHECKPOINT, {name: float("nan"), "do_sample": True})


@pytest.mark.runtime
def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="'beams'"):
        resolve(CHECKPOINT, {"beams": 3})


@pytest.mark.runtime
def test_options_are_frozen_and_documented():
    o = resolve(CHECKPOINT, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.num_beams = 3  # type: ignore[misc]
    source = inspect.getsource(sys.modules[GenerationOptions.__module__])
    for f in dataclasses.fields(GenerationOptions):
        line = next(line for line in source.splitlines() if line.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"field {f.name} has no comment"


@pytest.mark.runtime
@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"num_beams": 2, "num_return_sequences": 3}, "larger than num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"early_stopping": "yes"}, "early_stopping"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"bad_words_ids": [[]]}, "bad_words_ids"),
        ({"eos_token_id": "two"}, "eos_token_id"),
    ],
)
def test_invalid_options(overrides, words):
    with pytest.raises(InputError, match=words):
        resolve(CHECKPOINT, overrides)


@pytest.mark.runtime
def test_max_positions_bound():
    assert resolve(CHECKPOINT, {"max_new_tokens": 63}, max_positions=64).max_length == 64
    with pytest.raises(InputError, match="64"):
        resolve(CHECKPOINT, {"max_new_tokens": 64}, max_positions=64)


def test_ngram_and_warpers_like_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
        _calc_banned_ngram_tokens,
    )

    rng = np.random.RandomState(0)
    ids = rng.randint(0, 4, (5, 12))
    for n in (1, 2, 3):
        expected = _calc_banned_ngram_tokens(n, torch.from_numpy(ids), 5, 12)
        assert [banned_ngram_tokens(n, row) for row in ids.tolist()] == [list(e) for e in expected]
    scores = rng.randn(4, 50).astype(np.float32)
    for k in (1, 5, 50):
        ref = TopKLogitsWarper(k)(None, torch.from_numpy(scores.copy())).numpy()
        np.testing.assert_array_equal(top_k(NUMPY, k, None, scores.copy()), ref)
    for p in (0.1, 0.5, 0.95):
        ref = TopPLogitsWarper(p)(None, torch.from_numpy(scores.copy())).numpy()
        np.testing.assert_array_equal(top_p(NUMPY, p, 1, None, scores.copy()), ref)
