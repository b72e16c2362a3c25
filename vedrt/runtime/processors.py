"""transformers' logits processors, in numpy, in the order `_get_logits_processor` applies them.

Each processor is `(ids [rows, cur_len] int64, scores [rows, vocab] float32) -> scores` and
reproduces the transformers 4.57 class named in its docstring, float32 arithmetic included, so
that the chosen tokens are the same. They may modify `scores` in place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from .options import GenerationOptions

Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]
NEG_INF = np.float32(-np.inf)


def repetition_penalty(penalty: float, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor: shrink the scores of tokens already in the sequence."""
    score = np.take_along_axis(scores, ids, axis=1)
    score = np.where(score < 0, score * np.float32(penalty), score / np.float32(penalty))
    np.put_along_axis(scores, ids, score.astype(np.float32), axis=1)
    return scores


def banned_ngram_tokens(n: int, row: list[int]) -> list[int]:
    """Tokens that would complete an n-gram already in `row` (transformers' _calc_banned_ngram_tokens)."""
    cur_len = len(row)
    if cur_len + 1 < n:
        return []
    seen: dict[tuple[int, ...], list[int]] = {}
    for gram in zip(*[row[i:] for i in range(n)], strict=False):
        seen.setdefault(tuple(gram[:-1]), []).append(gram[-1])
    return seen.get(tuple(row[cur_len + 1 - n : cur_len]), [])


def no_repeat_ngram(n: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """NoRepeatNGramLogitsProcessor."""
    for i, row in enumerate(ids.tolist()):
        banned = banned_ngram_tokens(n, row)
        if banned:
            scores[i, banned] = NEG_INF
    return scores


def bad_words(
    words: tuple[tuple[int, ...], ...], ids: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """NoBadWordsLogitsProcessor: forbid the last token of a bad word whose prefix just occurred."""
    cur_len = ids.shape[1]
    for word in words:
        if len(word) == 1:
            scores[:, word[0]] = NEG_INF
            continue
        if len(word) > cur_len:
            continue
        prefix = np.asarray(word[:-1], dtype=ids.dtype)
        matching = np.all(ids[:, cur_len - len(prefix) :] == prefix, axis=1)
        scores[matching, word[-1]] = NEG_INF
    return scores


def without_eos_words(
    words: tuple[tuple[int, ...], ...], eos: tuple[int, ...] | None
) -> tuple[tuple[int, ...], ...]:
    """transformers drops single-token bad words that are an EOS id (and dedupes, being a dict)."""
    eos = eos or ()
    kept = [w for w in words if not (len(w) == 1 and w[0] in eos)]
    return tuple(dict.fromkeys(kept))


def min_length(
    min_len: int, eos: tuple[int, ...], ids: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """MinLengthLogitsProcessor (also MinNewTokens, whose bound `options.resolve` folded in)."""
    if ids.shape[1] < min_len:
        scores[:, list(eos)] = NEG_INF
    return scores


def forced_token(
    at_len: int, tokens: tuple[int, ...], ids: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor."""
    if ids.shape[1] == at_len:
        scores[:] = NEG_INF
        scores[:, list(tokens)] = 0
    return scores


def temperature(t: float, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """TemperatureLogitsWarper."""
    return scores / np.float32(t)


def top_k(k: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """TopKLogitsWarper: drop every token scoring below the k-th best."""
    k = min(k, scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
    scores[scores < kth] = NEG_INF
    return scores


def top_p(p: float, keep: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """TopPLogitsWarper: keep the smallest set of tokens holding probability mass `p`."""
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove = cumulative <= np.float32(1 - p)
    remove[:, -keep:] = False
    mask = np.zeros_like(remove)
    np.put_along_axis(mask, order, remove, axis=-1)
    scores[mask] = NEG_INF
    return scores


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def build_common(o: GenerationOptions, impl: Any) -> list[Processor]:
    """The non-sampling processors `model.generate()` builds, in its order.

    `impl` is the module holding the processor functions: this one (numpy) or `vedrt.gpu.processors`
    (torch), so both backends apply the same processors in the same order.
    """
    eos = o.eos_token_id
    chain: list[Processor] = []
    if o.repetition_penalty != 1.0:
        chain.append(partial(impl.repetition_penalty, o.repetition_penalty))
    if o.no_repeat_ngram_size > 0:
        chain.append(partial(impl.no_repeat_ngram, o.no_repeat_ngram_size))
    if o.bad_words_ids is not None:
        words = without_eos_words(o.bad_words_ids, eos)
        if words:
            chain.append(partial(impl.bad_words, words))
    if eos is not None and o.min_length > 0:
        chain.append(partial(impl.min_length, o.min_length, eos))
    if o.forced_bos_token_id is not None:
        chain.append(partial(impl.forced_token, 1, (o.forced_bos_token_id,)))
    if o.forced_eos_token_id is not None:
        chain.append(partial(impl.forced_token, o.max_length - 1, o.forced_eos_token_id))
    return chain


def build(o: GenerationOptions) -> list[Processor]:
    """The processors `model.generate()` would build for these options, in its order."""
    eos = o.eos_token_id
    chain = build_common(o, sys.modules[__name__])
    if o.do_sample:
        keep = (len(eos) + 1 if eos else 2) if o.num_beams > 1 else 1
        if o.temperature != 1.0:
            chain.append(partial(temperature, o.temperature))
        if o.top_k != 0:
            chain.append(partial(top_k, max(o.top_k, keep)))
        if o.top_p < 1.0:
            chain.append(partial(top_p, o.top_p, keep))
    return chain


def apply(chain: list[Processor], ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    for processor in chain:
        scores = processor(ids, scores)
    return scores
