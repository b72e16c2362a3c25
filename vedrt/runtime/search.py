"""The search loops: greedy/sampling and beam search, read top to bottom.

Four small steps do all the graph work: `encode` (encoder + cross K/V, once per image),
`prefill` (the start token, past_length 0), `decode_step` (one token per row, writing its keys
and values into the preallocated cache by position) and `reorder_beams` (gather the self-attention
cache rows after a beam step; cross K/V stay per image and are never touched). The rest is numpy
that mirrors transformers 4.57's `_sample` and `_beam_search` line for line, including the
float32 arithmetic and the -1e9 masking, so the chosen tokens and scores are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import processors
from .executor import Executor, StepOutput
from .options import PROMPT_LEN, GenerationOptions

F32 = np.float32
BIG_NEG = np.float32(-1.0e9)


@dataclass
class GenerateOutput:
    """`generate(..., return_dict=True)`: transformers' output fields, as numpy."""

    sequences: np.ndarray  # [rows, length] int64, start token included, finished rows padded
    sequences_scores: np.ndarray | None = None  # beam search: [rows] length-penalised log-prob
    scores: list[np.ndarray] | None = None  # output_scores: per step [batch*beams, vocab] processed
    cross_attentions: list[list[np.ndarray]] | None = None  # output_attentions: per step, per layer
    beam_indices: np.ndarray | None = None  # beam search: [rows, generated] source beam per step


def encode(executor: Executor, pixel_values: np.ndarray) -> Any:
    return executor.encode(pixel_values)


def prefill(
    executor: Executor, cache: Any, cross: Any, prompt: np.ndarray, want_attn: bool
) -> StepOutput:
    return executor.decode(prompt, 0, cache, cross, want_attn)


def decode_step(
    executor: Executor,
    cache: Any,
    cross: Any,
    tokens: np.ndarray,
    past_length: int,
    want_attn: bool,
) -> StepOutput:
    return executor.decode(tokens[:, None], past_length, cache, cross, want_attn)


def reorder_beams(executor: Executor, cache: Any, beam_idx: np.ndarray, filled: int) -> None:
    executor.reorder(cache, beam_idx, filled)


def gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Adding Gumbel noise then taking the top k samples k tokens without replacement."""
    u = np.maximum(rng.random(shape), np.finfo(np.float64).tiny)
    return (-np.log(-np.log(u))).astype(F32)


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top k, best first; ties go to the lower index."""
    n = x.shape[-1]
    if k < n:
        idx = np.sort(np.argpartition(-x, k - 1, axis=-1)[:, :k], axis=-1)
    else:
        idx = np.broadcast_to(np.arange(n), x.shape).copy()
    vals = np.take_along_axis(x, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, axis=-1), np.take_along_axis(idx, order, axis=-1)


def gather_beams(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[b, idx[b, j], ...] for `[batch, beams, ...]` arrays (transformers' _gather_beams)."""
    return x[np.arange(x.shape[0])[:, None], idx]


def is_eos(tokens: np.ndarray, eos: tuple[int, ...] | None) -> np.ndarray:
    if eos is None:
        return np.zeros(tokens.shape, dtype=bool)
    return np.isin(tokens, eos)


def greedy_or_sample(
    executor: Executor, cross: Any, batch: int, o: GenerationOptions
) -> GenerateOutput:
    """transformers' `_sample`: one row per image (times num_return_sequences when sampling)."""
    rows = batch * o.num_return_sequences
    rng = np.random.default_rng(o.seed) if o.do_sample else None
    chain = processors.build(o)
    pad = o.pad_token_id if o.pad_token_id is not None else 0
    seqs = np.full((rows, o.max_length), pad, dtype=np.int64)
    seqs[:, 0] = o.decoder_start_token_id
    unfinished = np.ones(rows, dtype=bool)
    scores, attentions = _collectors(o)
    cache = executor.new_cache(rows, o.max_length - PROMPT_LEN)
    out = prefill(executor, cache, cross, seqs[:, :PROMPT_LEN], attentions is not None)
    cur_len = PROMPT_LEN
    while True:
        step_scores = processors.apply(chain, seqs[:, :cur_len], out.logits)
        _collect(scores, attentions, step_scores, out)
        if rng is not None:
            tokens = np.argmax(step_scores + gumbel(rng, step_scores.shape), axis=-1)
        else:
            tokens = np.argmax(step_scores, axis=-1)
        if o.eos_token_id is not None:
            tokens = np.where(unfinished, tokens, pad)
        seqs[:, cur_len] = tokens
        cur_len += 1
        unfinished &= ~is_eos(tokens, o.eos_token_id)
        if cur_len >= o.max_length or not unfinished.any():
            break
        out = decode_step(executor, cache, cross, tokens, cur_len - 1, attentions is not None)
    return GenerateOutput(seqs[:, :cur_len].copy(), None, scores, attentions)


def _collectors(o: GenerationOptions) -> tuple[list | None, list | None]:
    scores = [] if (o.return_dict and o.output_scores) else None
    attentions = [] if (o.return_dict and o.output_attentions) else None
    return scores, attentions


def _collect(
    scores: list | None, attentions: list | None, step_scores: np.ndarray, out: StepOutput
) -> None:
    if scores is not None:
        scores.append(step_scores.copy())
    if attentions is not None:
        attentions.append(out.cross_attn)


@dataclass
class BeamState:
    """transformers' `_beam_search` running tensors, `[batch, beams, ...]`."""

    running_sequences: np.ndarray  # [B, nb, max_length] int64
    running_scores: np.ndarray  # [B, nb] float32 accumulated log-probs
    running_indices: np.ndarray  # [B, nb, max_length - prompt] int32 source beam per step
    sequences: np.ndarray  # finished hypotheses, best first
    scores: np.ndarray  # their length-penalised scores
    indices: np.ndarray
    finished: np.ndarray  # [B, nb] bool: is the finished slot filled
    improvable: np.ndarray  # [B, 1] bool: can a running beam still beat the finished ones
    hits: np.ndarray  # [B, K] bool: which top-K candidates hit a stopping criterion


def init_beams(batch: int, o: GenerationOptions, k: int) -> BeamState:
    nb = o.num_beams
    eos = o.eos_token_id
    fill = (o.pad_token_id or eos[0]) if eos is not None else -1  # transformers' `pad or eos[0]`
    running = np.full((batch, nb, o.max_length), fill, dtype=np.int64)
    running[:, :, :PROMPT_LEN] = o.decoder_start_token_id
    scores = np.zeros((batch, nb), dtype=F32)
    scores[:, 1:] = BIG_NEG  # only the first beam's tokens count at the first step
    indices = np.full((batch, nb, o.max_length - PROMPT_LEN), -1, dtype=np.int32)
    return BeamState(
        running_sequences=running,
        running_scores=scores,
        running_indices=indices,
        sequences=running.copy(),
        scores=np.full((batch, nb), BIG_NEG, dtype=F32),
        indices=indices.copy(),
        finished=np.zeros((batch, nb), dtype=bool),
        improvable=np.ones((batch, 1), dtype=bool),
        hits=np.zeros((batch, k), dtype=bool),
    )


def beam_search(executor: Executor, cross: Any, batch: int, o: GenerationOptions) -> GenerateOutput:
    """transformers' `_beam_search` (and beam sampling with `do_sample`)."""
    nb = o.num_beams
    n_eos = len(o.eos_token_id) if o.eos_token_id is not None else 0
    k = max(2, 1 + n_eos) * nb
    rng = np.random.default_rng(o.seed) if o.do_sample else None
    chain = processors.build(o)
    s = init_beams(batch, o, k)
    scores, attentions = _collectors(o)
    cache = executor.new_cache(batch * nb, o.max_length - PROMPT_LEN)
    out = prefill(
        executor,
        cache,
        cross,
        s.running_sequences[:, :, :PROMPT_LEN].reshape(batch * nb, -1),
        attentions is not None,
    )
    cur_len = PROMPT_LEN
    while True:
        flat_running = s.running_sequences[:, :, :cur_len].reshape(batch * nb, cur_len)
        log_probs = processors.apply(chain, flat_running, processors.log_softmax(out.logits))
        _collect(scores, attentions, log_probs, out)
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.reshape(batch, nb, vocab) + s.running_scores[:, :, None]).reshape(
            batch, nb * vocab
        )
        cand_scores, cand_seqs, cand_indices = top_k_continuations(
            s, accumulated, cur_len, k, nb, vocab, rng
        )
        cand_ids = cand_seqs[:, :, cur_len]
        s.hits = (cur_len + 1 >= o.max_length) | is_eos(cand_ids, o.eos_token_id)
        next_running_beams(s, cand_scores, cand_seqs, cand_indices, nb)
        update_finished(s, cand_scores, cand_seqs, cand_indices, cur_len, o)
        beam_idx = s.running_indices[:, :, cur_len - PROMPT_LEN].reshape(-1)
        reorder_beams(executor, cache, beam_idx, cur_len)
        cur_len += 1
        s.improvable = early_stop_unsatisfied(s, cur_len, o)
        if not has_unfinished(s, o):
            break
        out = decode_step(
            executor,
            cache,
            cross,
            s.running_sequences[:, :, cur_len - 1].reshape(-1),
            cur_len - 1,
            attentions is not None,
        )
    return finalize(s, o, scores, attentions)


def top_k_continuations(
    s: BeamState,
    accumulated: np.ndarray,
    cur_len: int,
    k: int,
    nb: int,
    vocab: int,
    rng: np.random.Generator | None,
):
    """The best (or sampled) k next tokens over all beams of each image."""
    if rng is not None:
        _, idx = topk(accumulated + gumbel(rng, accumulated.shape), k)  # sampled order
        cand_scores = np.take_along_axis(accumulated, idx, axis=1)
    else:
        cand_scores, idx = topk(accumulated, k)
    source = idx // vocab
    cand_indices = gather_beams(s.running_indices, source)
    cand_seqs = gather_beams(s.running_sequences, source)
    cand_seqs[:, :, cur_len] = idx % vocab
    batch_offset = np.arange(accumulated.shape[0])[:, None] * nb
    cand_indices[:, :, cur_len - PROMPT_LEN] = source + batch_offset
    return cand_scores, cand_seqs, cand_indices


def next_running_beams(s: BeamState, cand_scores, cand_seqs, cand_indices, nb: int) -> None:
    """Keep the best `num_beams` candidates that did not just finish."""
    masked = cand_scores + s.hits.astype(F32) * BIG_NEG
    _, keep = topk(masked, nb)
    s.running_sequences = gather_beams(cand_seqs, keep)
    s.running_scores = np.take_along_axis(masked, keep, axis=1)
    s.running_indices = gather_beams(cand_indices, keep)


def update_finished(
    s: BeamState, cand_scores, cand_seqs, cand_indices, cur_len: int, o: GenerationOptions
) -> None:
    """Merge the candidates that just finished (among the top `num_beams`) into the finished set."""
    nb = o.num_beams
    top_mask = np.zeros(cand_scores.shape[1], dtype=bool)
    top_mask[:nb] = True
    just_finished = s.hits & top_mask[None, :]
    penalised = cand_scores / F32((cur_len + 1 - PROMPT_LEN) ** o.length_penalty)
    full = np.all(s.finished, axis=-1, keepdims=True) & (o.early_stopping is True)
    penalised = penalised + full.astype(F32) * BIG_NEG
    penalised = penalised + (~s.improvable).astype(F32) * BIG_NEG
    penalised = penalised + (~just_finished).astype(F32) * BIG_NEG
    merged_scores = np.concatenate([s.scores, penalised], axis=1)
    _, keep = topk(merged_scores, nb)
    s.sequences = gather_beams(np.concatenate([s.sequences, cand_seqs], axis=1), keep)
    s.scores = np.take_along_axis(merged_scores, keep, axis=1)
    s.indices = gather_beams(np.concatenate([s.indices, cand_indices], axis=1), keep)
    s.finished = np.take_along_axis(
        np.concatenate([s.finished, just_finished], axis=1), keep, axis=1
    )


def early_stop_unsatisfied(s: BeamState, cur_len: int, o: GenerationOptions) -> np.ndarray:
    """transformers' `_check_early_stop_heuristic`."""
    if o.early_stopping == "never" and o.length_penalty > 0.0:
        best_len = o.max_length - PROMPT_LEN
    else:
        best_len = cur_len - PROMPT_LEN
    best_running = s.running_scores[:, :1] / F32(best_len**o.length_penalty)
    worst_finished = np.where(s.finished, s.scores.min(axis=1, keepdims=True), BIG_NEG)
    return s.improvable & np.any(best_running > worst_finished, axis=-1, keepdims=True)


def has_unfinished(s: BeamState, o: GenerationOptions) -> bool:
    """transformers' `_beam_search_has_unfinished_sequences`."""
    improvement_possible = bool(np.any(s.improvable))
    exists_open_beam = not (bool(np.all(s.finished)) and o.early_stopping is True)
    valid_continuations = not bool(np.all(s.hits))
    return improvement_possible and exists_open_beam and valid_continuations


def finalize(s: BeamState, o: GenerationOptions, scores, attentions) -> GenerateOutput:
    """The best `num_return_sequences` per image, cropped to the longest generated one."""
    n = o.num_return_sequences
    batch = s.sequences.shape[0]
    sequences = s.sequences[:, :n].reshape(batch * n, -1)
    seq_scores = s.scores[:, :n].reshape(batch * n)
    indices = s.indices[:, :n].reshape(batch * n, -1)
    generated = int((indices != -1).sum(axis=1).max())
    return GenerateOutput(
        sequences=sequences[:, : PROMPT_LEN + generated].copy(),
        sequences_scores=seq_scores.copy(),
        scores=scores,
        cross_attentions=attentions,
        beam_indices=indices[:, :generated].copy(),
    )
