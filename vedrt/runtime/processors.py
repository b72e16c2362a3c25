"""transformers' logits processors, in the order `_get_logits_processor` applies them.

Each processor is `(ids [rows, cur_len] int64, scores [rows, vocab] float32) -> scores` and
reproduces the transformers 4.57 class named in its docstring, float32 arithmetic included, so
that the chosen tokens are the same. They may modify `scores` in place. They are written once over
the array operations of `ops.py`, so the numpy runtime and the torch device loop apply the very
same processors in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

from .options import GenerationOptions

Processor = Callable[[Any, Any], Any]
NEG_INF = -math.inf


def repetition_penalty(ops, penalty: float, ids, scores):
    """RepetitionPenaltyLogitsProcessor: shrink the scores of tokens already in the sequence."""
    score = ops.take_along(scores, ids, axis=1)
    score = ops.where(score < 0, score * ops.scalar(penalty), score / ops.scalar(penalty))
    ops.put_along(scores, ids, ops.astype(score, ops.float32), axis=1)
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


def no_repeat_ngram(ops, n: int, ids, scores):
    """NoRepeatNGramLogitsProcessor (a host-side n-gram table, as transformers builds it)."""
    for i, row in enumerate(ids.tolist()):
        banned = banned_ngram_tokens(n, row)
        if banned:
            scores[i, banned] = NEG_INF
    return scores


def bad_words(ops, words: tuple[tuple[int, ...], ...], ids, scores):
    """NoBadWordsLogitsProcessor: forbid the last token of a bad word whose prefix just occurred."""
    cur_len = ids.shape[1]
    for word in words:
        if len(word) == 1:
            scores[:, word[0]] = NEG_INF
            continue
        if len(word) > cur_len:
            continue
        matching = ops.all_equal(ids[:, cur_len - (len(word) - 1) :], word[:-1])
        scores[matching, word[-1]] = NEG_INF
    return scores


def without_eos_words(
    words: tuple[tuple[int, ...], ...], eos: tuple[int, ...] | None
) -> tuple[tuple[int, ...], ...]:
    """transformers drops single-token bad words that are an EOS id (and dedupes, being a dict)."""
    eos = eos or ()
    kept = [w for w in words if not (len(w) == 1 and w[0] in eos)]
    return tuple(dict.fromkeys(kept))


def min_length(ops, min_len: int, eos: tuple[int, ...], ids, scores):
    """MinLengthLogitsProcessor (also MinNewTokens, whose bound `options.resolve` folded in)."""
    if ids.shape[1] < min_len:
        scores[:, list(eos)] = NEG_INF
    return scores


def forced_token(ops, at_len: int, tokens: tuple[int, ...], ids, scores):
    """ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor."""
    if ids.shape[1] == at_len:
        scores[:] = NEG_INF
        scores[:, list(tokens)] = 0
    return scores


def temperature(ops, t: float, ids, scores):
    """TemperatureLogitsWarper."""
    return scores / ops.scalar(t)


def top_k(ops, k: int, ids, scores):
    """TopKLogitsWarper: drop every token scoring below the k-th best."""
    kth = ops.kth_largest(scores, min(k, scores.shape[-1]))
    scores[scores < kth] = NEG_INF
    return scores


def top_p(ops, p: float, keep: int, ids, scores):
    """TopPLogitsWarper: keep the smallest set of tokens holding probability mass `p`."""
    order = ops.argsort(scores)
    sorted_scores = ops.take_along(scores, order, axis=-1)
    cumulative = ops.cumsum(ops.softmax(sorted_scores))
    remove = cumulative <= ops.scalar(1 - p)
    remove[:, -keep:] = False
    mask = ops.zeros(tuple(remove.shape), ops.bool_)
    ops.put_along(mask, order, remove, axis=-1)
    scores[mask] = NEG_INF
    return scores


def build(o: GenerationOptions, ops: Any) -> list[Processor]:
    """The processors `model.generate()` would build for these options, in its order."""
    eos = o.eos_token_id
    chain: list[Processor] = []

    def add(fn, *args):
        chain.append(partial(fn, ops, *args))

    if o.repetition_penalty != 1.0:
        add(repetition_penalty, o.repetition_penalty)
    if o.no_repeat_ngram_size > 0:
        add(no_repeat_ngram, o.no_repeat_ngram_size)
    if o.bad_words_ids is not None:
        words = without_eos_words(o.bad_words_ids, eos)
        if words:
            add(bad_words, words)
    if eos is not None and o.min_length > 0:
        add(min_length, o.min_length, eos)
    if o.forced_bos_token_id is not None:
        add(forced_token, 1, (o.forced_bos_token_id,))
    if o.forced_eos_token_id is not None:
        add(forced_token, o.max_length - 1, o.forced_eos_token_id)
    if o.do_sample:
        keep = (len(eos) + 1 if eos else 2) if o.num_beams > 1 else 1
        if o.temperature != 1.0:
            add(temperature, o.temperature)
        if o.top_k != 0:
            add(top_k, max(o.top_k, keep))
        if o.top_p < 1.0:
            add(top_p, o.top_p, keep)
    return chain


def _forbidding_active(o: GenerationOptions, cur_len: int) -> bool:
    """Does one of `FORBIDDING` (below) act at this length?"""
    if o.no_repeat_ngram_size > 0:
        return True
    if o.bad_words_ids is not None and without_eos_words(o.bad_words_ids, o.eos_token_id):
        return True
    return o.eos_token_id is not None and cur_len < o.min_length


def _rescoring_active(o: GenerationOptions, cur_len: int) -> bool:
    """Does sampling, or a processor that changes scores other than by forbidding tokens, act
    at this length?"""
    if o.do_sample or o.repetition_penalty != 1.0:
        return True
    if o.forced_bos_token_id is not None and cur_len == 1:
        return True
    return o.forced_eos_token_id is not None and cur_len == o.max_length - 1


def any_active(o: GenerationOptions, cur_len: int) -> bool:
    """Would `build(o)`'s chain (or sampling) change any score at this length? When not, the
    search may rank the decoder graph's own top-k log-probabilities instead of the vocabulary."""
    return _rescoring_active(o, cur_len) or _forbidding_active(o, cur_len)


# Processors that only forbid tokens (set their scores to -inf): their effect on a ranking can be
# read off each row's best few candidates, without the whole vocabulary's scores.
FORBIDDING = (no_repeat_ngram, bad_words, min_length)


def forbid_in_top(
    ops: Any, o: GenerationOptions, chain: list[Processor], ids, top: tuple, need: int, vocab: int
):
    """For a step where some processor acts: the decoder graph's `(top_logprobs, top_ids)` with
    what the processors forbid set to -inf, when only forbidding ones act and every row keeps
    `need` allowed candidates (a row's best `need` allowed tokens are then its best `need` of the
    whole processed vocabulary, in the same order); None when the search needs the whole
    vocabulary's scores. A minimum length (the benchmarks' forced `min_new_tokens`) thus costs a
    look-up of K tokens a row instead of a log-softmax and a top-k over [rows, vocab] on the host
    (~3 ms of a GPT-2 beam-4 step)."""
    if _rescoring_active(o, ids.shape[1]):
        return None
    forbidden = ops.zeros((ids.shape[0], vocab), ops.float32)
    for processor in chain:
        if processor.func in FORBIDDING:
            forbidden = processor(ids, forbidden)
    banned = ops.take_along(forbidden, top[1], axis=1) == NEG_INF
    allowed = ops.to_numpy(ops.astype(~banned, ops.int64).sum(-1))
    if int(allowed.min()) < need:
        return None
    return ops.where(banned, ops.scalar(NEG_INF), top[0]), top[1]


def apply(chain: list[Processor], ids, scores):
    for processor in chain:
        scores = processor(ids, scores)
    return scores
