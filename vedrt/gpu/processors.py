"""transformers' logits processors on device tensors, in `_get_logits_processor`'s order.

The same set as the CPU runtime's `vedrt.runtime.processors`, written with the torch operations
transformers 4.57 itself uses, so on the same device the scores are bit-identical. Sampling warpers
are absent: the device loop does greedy and beam search only. `no_repeat_ngram_size` needs the
token history as Python lists, so it copies the ids to the host each step (the one slow option).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from ..runtime.options import GenerationOptions
from ..runtime.processors import banned_ngram_tokens, build_common

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def repetition_penalty(penalty: float, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor."""
    score = torch.gather(scores, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, ids, score)


def no_repeat_ngram(n: int, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """NoRepeatNGramLogitsProcessor (host-side n-gram table, like transformers')."""
    for i, row in enumerate(ids.tolist()):
        banned = banned_ngram_tokens(n, row)
        if banned:
            scores[i, banned] = -math.inf
    return scores


def bad_words(
    words: tuple[tuple[int, ...], ...], ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """NoBadWordsLogitsProcessor: forbid a bad word's last token where its prefix just occurred."""
    cur_len = ids.shape[1]
    for word in words:
        if len(word) == 1:
            scores[:, word[0]] = -math.inf
            continue
        if len(word) > cur_len:
            continue
        prefix = torch.tensor(word[:-1], dtype=ids.dtype, device=ids.device)
        matching = torch.all(ids[:, cur_len - len(prefix) :] == prefix, dim=1)
        scores[:, word[-1]] = torch.where(matching, -math.inf, scores[:, word[-1]])
    return scores


def min_length(
    min_len: int, eos: tuple[int, ...], ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """MinLengthLogitsProcessor (MinNewTokens folded into `min_len` by `options.resolve`)."""
    if ids.shape[1] < min_len:
        scores[:, list(eos)] = -math.inf
    return scores


def forced_token(
    at_len: int, tokens: tuple[int, ...], ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor."""
    if ids.shape[1] == at_len:
        scores = torch.full_like(scores, -math.inf)
        scores[:, list(tokens)] = 0
    return scores


def build(o: GenerationOptions) -> list[Processor]:
    """The processors `model.generate()` would build for these (non-sampling) options."""
    return build_common(o, sys.modules[__name__])


def apply(chain: list[Processor], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in chain:
        scores = processor(ids, scores)
    return scores
