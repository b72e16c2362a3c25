"""Greedy, sampling and beam search as per-request state advanced one decoder step at a time.

Written once over the array operations of `ops.py`: numpy on the host for ONNX Runtime, torch on
the device for the GPU executors. A search never runs a graph: the engine runs one decoder step
over the rows of every active request, hands each search the logits of its own rows, and applies
what the search returns (the next token of every row, and for beam search which row each new
row continues, so the engine can reorder the request's cache rows).

The arithmetic mirrors transformers 4.57's `_sample` and `_beam_search` line for line, including
float32 and the -1e9 masking, so the chosen tokens and `sequences_scores` are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import processors
from .ops import gumbel
from .options import PROMPT_LEN, GenerationOptions
from .perimage import PerImage, counts

BIG_NEG = -1.0e9


@dataclass
class GenerateOutput:
    """`generate(..., return_dict=True)`: transformers' output fields, as numpy."""

    sequences: np.ndarray  # [rows, length] int64, start token included, finished rows padded
    sequences_scores: np.ndarray | None = None  # beam search: [rows] length-penalised log-prob
    scores: list[np.ndarray] | None = None  # output_scores: per step [batch*beams, vocab] processed
    cross_attentions: list[list[np.ndarray]] | None = None  # output_attentions: per step, per layer
    beam_indices: np.ndarray | None = None  # beam search: [rows, generated] source beam per step


@dataclass
class Advance:
    """What one search step asks of the engine for the request's rows."""

    tokens: Any  # [rows] int64: each row's next input token
    source_rows: Any | None  # beam search: [rows] the request row each new row continues
    done: bool


class _Collector:
    """output_scores / output_attentions, kept per step and turned into numpy at the end."""

    def __init__(self, ops, o: GenerationOptions):
        self.ops = ops
        self.scores: list | None = [] if (o.return_dict and o.output_scores) else None
        self.attentions: list | None = [] if (o.return_dict and o.output_attentions) else None

    @property
    def want_attentions(self) -> bool:
        return self.attentions is not None

    def add(self, scores: Any, cross_attn: list | None) -> None:
        if self.scores is not None and scores is not None:
            self.scores.append(self.ops.to_numpy(self.ops.copy(scores)))
        if self.attentions is not None and cross_attn is not None:
            self.attentions.append([self.ops.to_numpy(self.ops.copy(a)) for a in cross_attn])

    def result(self) -> tuple[list | None, list | None]:
        return self.scores, self.attentions


def new_search(ops, o: GenerationOptions, batch: int):
    """The search `generate()` runs for these options over `batch` images."""
    return BeamSearch(ops, o, batch) if o.num_beams > 1 else GreedySearch(ops, o, batch)


def rows_needed(o: GenerationOptions, batch: int) -> int:
    return batch * (o.num_beams if o.num_beams > 1 else o.num_return_sequences)


def mergeable(o: GenerationOptions) -> bool:
    """Can searches with these options, started at different steps, run as one? Only when no
    processor, sampling or per-step output depends on a length or a stream of their own: then
    each image's arithmetic is its solo run's, whatever length the others are at."""
    return not (o.do_sample or o.output_scores or o.output_attentions or processors.build(o, None))


class GreedySearch(PerImage):
    """transformers' `_sample`: one row per image (times num_return_sequences when sampling)."""

    _per_row = ("seqs", "unfinished")

    def __init__(self, ops, o: GenerationOptions, batch: int):
        self.ops, self.o = ops, o
        self.batch = batch
        self.rows = rows_needed(o, batch)
        self.rows_per_image = self.rows // batch
        self.rng = np.random.default_rng(o.seed) if o.do_sample else None
        self.chain = processors.build(o, ops)
        self.pad = o.pad_token_id if o.pad_token_id is not None else 0
        self.seqs = ops.full((self.rows, o.max_length), self.pad, ops.int64)
        self.seqs[:, :PROMPT_LEN] = o.decoder_start_token_id
        self.unfinished = ops.full((self.rows,), True, ops.bool_)
        self.lengths = np.full(batch, PROMPT_LEN, np.int64)
        self.collect = _Collector(ops, o)

    def first_tokens(self):
        return self.seqs[:, PROMPT_LEN - 1]

    def step(self, logits, cross_attn: list | None = None, top: tuple | None = None) -> Advance:
        """`top`: the graph's (top_logprobs, top_ids) of these rows, used when nothing needs the
        whole vocabulary's scores: the best token is `top_ids[:, 0]`, or the best one that the
        active processors allow (`processors.forbid_in_top`)."""
        ops, o = self.ops, self.o
        top = top if self.collect.scores is None else None
        first = None  # each row's column of its best allowed token, when processors forbid some
        if top is not None and processors.any_active(o, self.cur_len):
            ids = self.seqs[:, : self.cur_len]
            top = processors.forbid_in_top(ops, o, self.chain, ids, top, 1, logits.shape[-1])
            if top is not None:
                allowed = ops.astype(top[0] > ops.scalar(processors.NEG_INF), ops.int64)
                first = ops.argmax(allowed)
        if top is None:
            scores = processors.apply(
                self.chain, self.seqs[:, : self.cur_len], ops.float_logits(logits)
            )
            self.collect.add(scores, cross_attn)
            if self.rng is not None:
                scores = scores + ops.asarray(gumbel(self.rng, tuple(scores.shape)))
            tokens = ops.argmax(scores)
        else:
            self.collect.add(None, cross_attn)
            column = top[1][:, 0] if first is None else ops.take_along(top[1], first[:, None], 1)
            tokens = ops.copy(column.reshape(-1))
        if o.eos_token_id is not None:
            tokens = ops.where(self.unfinished, tokens, self.pad)
        positions = ops.asarray(np.repeat(self.lengths, self.rows_per_image))
        self.seqs[ops.arange(self.rows), positions] = tokens
        self.lengths += 1
        if o.eos_token_id is not None:
            self.unfinished &= ~ops.isin(tokens, o.eos_token_id)
        return Advance(tokens, None, all(self.stopped([slice(None)])))

    def result(self, images: slice = slice(None)) -> GenerateOutput:
        """The output for all images, or for `images` alone: exactly what a search over just
        those images would have returned when `stopped(images)` first became true."""
        scores, attentions = self.collect.result()
        rows = self._rows(images)
        sequences = self.ops.to_numpy(self.seqs[rows, : self._length_of(images)]).copy()
        return GenerateOutput(sequences, None, scores, attentions)

    def stopped(self, members: list[slice]) -> list[bool]:
        """For each slice of the images: would a search over just those have stopped? (`step`'s
        test on their rows; one host copy for all of them)"""
        over = counts(self.lengths >= self.o.max_length)
        unfinished = counts(self.ops.to_numpy(self.unfinished))
        stopped = []
        for images in members:
            start, stop, _ = images.indices(self.batch)
            rows = self._rows(images)
            all_over = over[stop] - over[start] == stop - start
            stopped.append(all_over or unfinished[rows.stop] == unfinished[rows.start])
        return stopped

    def _rows(self, images: slice) -> slice:
        start, stop, _ = images.indices(self.batch)
        return slice(start * self.rows_per_image, stop * self.rows_per_image)


class BeamSearch(PerImage):
    """transformers' `_beam_search` (and beam sampling with `do_sample`), `[batch, beams, ...]`.

    Beam indices are kept relative to each image (0..beams-1), so images can be joined and
    dropped; `result` numbers them as transformers does, from the slice's first image."""

    _per_image = (
        "running_sequences",
        "running_scores",
        "running_indices",
        "sequences",
        "scores",
        "indices",
        "finished",
        "improvable",
        "hits",
    )

    def __init__(self, ops, o: GenerationOptions, batch: int):
        self.ops, self.o = ops, o
        self.batch, nb = batch, o.num_beams
        self.rows = batch * nb
        self.rows_per_image = nb
        n_eos = len(o.eos_token_id) if o.eos_token_id is not None else 0
        self.k = max(2, 1 + n_eos) * nb
        self.rng = np.random.default_rng(o.seed) if o.do_sample else None
        self.chain = processors.build(o, ops)
        self.collect = _Collector(ops, o)
        self.lengths = np.full(batch, PROMPT_LEN, np.int64)
        eos = o.eos_token_id
        fill = (
            (o.pad_token_id or eos[0]) if eos is not None else -1
        )  # transformers' `pad or eos[0]`
        self.running_sequences = ops.full((batch, nb, o.max_length), fill, ops.int64)
        self.running_sequences[:, :, :PROMPT_LEN] = o.decoder_start_token_id
        self.running_scores = ops.zeros((batch, nb), ops.float32)
        self.running_scores[:, 1:] = BIG_NEG  # only the first beam's tokens count at first
        self.running_indices = ops.full((batch, nb, o.max_length - PROMPT_LEN), -1, ops.int32)
        self.sequences = ops.copy(self.running_sequences)
        self.scores = ops.full((batch, nb), BIG_NEG, ops.float32)
        self.indices = ops.copy(self.running_indices)
        self.finished = ops.zeros((batch, nb), ops.bool_)  # is the finished slot filled
        self.improvable = ops.full((batch, 1), True, ops.bool_)  # can a running beam still win
        self.hits = ops.zeros((batch, self.k), ops.bool_)  # top-K candidates that stop
        self.top_mask = ops.zeros((self.k,), ops.bool_)
        self.top_mask[:nb] = True
        self._aranges: dict[int, Any] = {}

    def first_tokens(self):
        return self.running_sequences[:, :, PROMPT_LEN - 1].reshape(-1)

    def _gather(self, x, idx):
        """transformers' `_gather_beams`: x[b, idx[b, j], ...] for `[batch, beams, ...]` arrays."""
        return x[self._arange(x.shape[0])[:, None], idx]

    def _arange(self, n: int):
        """ops.arange(n), made once per size: the search asks for the same few every step."""
        cached = self._aranges.get(n)
        if cached is None:
            cached = self._aranges[n] = self.ops.arange(n)
        return cached

    def step(self, logits, cross_attn: list | None = None, top: tuple | None = None) -> Advance:
        """`top`: the graph's (top_logprobs, top_ids) of these rows. With no processor active,
        no sampling and no scores to return, the best k continuations over all beams are among
        each beam's own best k, so only those are ranked (same order: see `_top_k_from_rows`)."""
        ops, o, nb, cur_len = self.ops, self.o, self.o.num_beams, self.cur_len
        if top is None or top[1].shape[-1] < self.k or self.collect.scores is not None:
            top = None
        elif processors.any_active(o, cur_len):
            top = processors.forbid_in_top(
                ops, o, self.chain, self._history(), top, self.k, logits.shape[-1]
            )
        if top is not None:
            self.collect.add(None, cross_attn)
            cand_scores, cand_seqs, cand_indices, cand_tokens = self._top_k_from_rows(*top)
        else:
            log_probs = ops.log_softmax(ops.float_logits(logits))
            log_probs = processors.apply(self.chain, self._history(), log_probs)
            self.collect.add(log_probs, cross_attn)
            vocab = log_probs.shape[-1]
            accumulated = log_probs.reshape(self.batch, nb, vocab) + self.running_scores[:, :, None]
            accumulated = accumulated.reshape(self.batch, nb * vocab)
            cand_scores, cand_seqs, cand_indices, cand_tokens = self._top_k_continuations(
                accumulated, vocab
            )
        self.hits = ops.isin(cand_tokens, o.eos_token_id or ())
        last = self.lengths + 1 >= o.max_length
        if last.any():  # the candidates of images at their last step all finish
            self.hits = self.hits | ops.asarray(last)[:, None]
        self._next_running_beams(cand_scores, cand_seqs, cand_indices)
        self._update_finished(cand_scores, cand_seqs, cand_indices)
        image, beam, at = self._at(nb)
        source = self.running_indices[image, beam, at - PROMPT_LEN]
        source = source + ops.astype(self._arange(self.batch)[:, None] * nb, ops.int32)
        tokens = self.running_sequences[image, beam, at].reshape(-1)
        self.lengths += 1
        self.improvable = self._early_stop_unsatisfied()
        done = not self._has_unfinished()
        return Advance(tokens, ops.astype(source.reshape(-1), ops.int64), done)

    def _history(self):
        """`[rows, cur_len]`: every running beam's tokens so far, what the processors read."""
        return self.running_sequences[:, :, : self.cur_len].reshape(self.rows, self.cur_len)

    def _at(self, width: int):
        """Indices (image, beam, position) of each image's current position, for `width` beams
        or candidates: images may be at different lengths once searches are joined."""
        ops = self.ops
        image = self._arange(self.batch)[:, None]
        return image, self._arange(width)[None, :], ops.asarray(self.lengths)[:, None]

    def _per_image_scalar(self, values: np.ndarray):
        """[batch, 1] float32 of float64 host values: transformers divides by a Python float,
        which torch rounds to float32 first; the same rounding per image."""
        return self.ops.asarray(values.astype(np.float32)[:, None])

    def _top_k_continuations(self, accumulated, vocab: int):
        """The best (or sampled) k next tokens over all beams of each image."""
        ops = self.ops
        if self.rng is not None:
            noise = ops.asarray(gumbel(self.rng, tuple(accumulated.shape)))
            _, idx = ops.topk(accumulated + noise, self.k)  # sampled order
            cand_scores = ops.take_along(accumulated, idx, axis=1)
        else:
            cand_scores, idx = ops.topk(accumulated, self.k)
        return (cand_scores, *self._candidates(idx // vocab, idx % vocab))

    def _top_k_from_rows(self, top_logprobs, top_ids):
        """`_top_k_continuations` from each beam's best log-probs. Candidate j of beam b sits at
        b * K + j: for equal scores that order is the vocabulary order (beam, then token id, as
        ONNX TopK breaks ties by lower index), so the ranking is the full one's."""
        ops, nb, width = self.ops, self.o.num_beams, top_ids.shape[-1]
        scores = ops.float_logits(top_logprobs).reshape(self.batch, nb, width)
        accumulated = (scores + self.running_scores[:, :, None]).reshape(self.batch, nb * width)
        cand_scores, idx = ops.topk(accumulated, self.k)
        tokens = ops.take_along(top_ids.reshape(self.batch, nb * width), idx, axis=1)
        return (cand_scores, *self._candidates(idx // width, tokens))

    def _candidates(self, source, tokens):
        """Candidate sequences and beam indices (the source beam's, extended by `tokens`), and
        the tokens themselves."""
        ops = self.ops
        cand_indices = self._gather(self.running_indices, source)
        cand_seqs = self._gather(self.running_sequences, source)
        image, beam, at = self._at(cand_seqs.shape[1])
        cand_seqs[image, beam, at] = tokens
        cand_indices[image, beam, at - PROMPT_LEN] = ops.astype(source, ops.int32)
        return cand_seqs, cand_indices, tokens

    def _next_running_beams(self, cand_scores, cand_seqs, cand_indices) -> None:
        """Keep the best `num_beams` candidates that did not just finish."""
        ops = self.ops
        masked = cand_scores + ops.astype(self.hits, ops.float32) * ops.scalar(BIG_NEG)
        _, keep = ops.topk(masked, self.o.num_beams)
        self.running_sequences = self._gather(cand_seqs, keep)
        self.running_scores = ops.take_along(masked, keep, axis=1)
        self.running_indices = self._gather(cand_indices, keep)

    def _update_finished(self, cand_scores, cand_seqs, cand_indices) -> None:
        """Merge the candidates that just finished (among the top `num_beams`) into the finished set."""
        ops, o = self.ops, self.o
        big_neg = ops.scalar(BIG_NEG)
        just_finished = self.hits & self.top_mask[None, :]
        if not bool(ops.any(just_finished)):
            # every candidate would enter at <= -1e9 and lose to the kept entries (sorted, ties
            # to the lower index), so the merge below would change nothing: skip its gathers
            return
        generated = (self.lengths + 1 - PROMPT_LEN).astype(np.float64)
        penalised = cand_scores / self._per_image_scalar(generated**o.length_penalty)
        full = ops.all(self.finished, axis=-1) & (o.early_stopping is True)
        penalised = penalised + ops.astype(full, ops.float32) * big_neg
        penalised = penalised + ops.astype(~self.improvable, ops.float32) * big_neg
        penalised = penalised + ops.astype(~just_finished, ops.float32) * big_neg
        merged_scores = ops.concat([self.scores, penalised], axis=1)
        _, keep = ops.topk(merged_scores, o.num_beams)
        self.sequences = self._gather(ops.concat([self.sequences, cand_seqs], axis=1), keep)
        self.scores = ops.take_along(merged_scores, keep, axis=1)
        self.indices = self._gather(ops.concat([self.indices, cand_indices], axis=1), keep)
        finished = ops.concat([self.finished, just_finished], axis=1)
        self.finished = ops.take_along(finished, keep, axis=1)

    def _early_stop_unsatisfied(self):
        """transformers' `_check_early_stop_heuristic`."""
        ops, o = self.ops, self.o
        if o.early_stopping == "never" and o.length_penalty > 0.0:
            best_len = np.full(self.batch, o.max_length - PROMPT_LEN, np.float64)
        else:
            best_len = (self.lengths - PROMPT_LEN).astype(np.float64)
        best_running = self.running_scores[:, :1] / self._per_image_scalar(
            best_len**o.length_penalty
        )
        worst = ops.where(self.finished, ops.min(self.scores, axis=1), ops.scalar(BIG_NEG))
        return self.improvable & ops.any(best_running > worst, axis=-1)

    def _has_unfinished(self, images: slice = slice(None)) -> bool:
        """transformers' `_beam_search_has_unfinished_sequences`: the one host sync per step.
        On a slice of the images: what a search over just those would decide (images never
        influence each other's beams, finished sets or stopping tests)."""
        ops = self.ops
        improvement_possible = bool(ops.any(self.improvable[images]))
        exists_open_beam = not (
            bool(ops.all(self.finished[images])) and self.o.early_stopping is True
        )
        valid_continuations = not bool(ops.all(self.hits[images]))
        return improvement_possible and exists_open_beam and valid_continuations

    def stopped(self, members: list[slice]) -> list[bool]:
        """For each slice of the images: would a search over just those have stopped? The same
        test as `_has_unfinished`, on per-image flags copied to the host once for all slices."""
        ops = self.ops
        improvable = counts(ops.to_numpy(self.improvable)[:, 0])
        full = counts(ops.to_numpy(ops.all(self.finished, axis=1))[:, 0])
        hits = counts(ops.to_numpy(ops.all(self.hits, axis=1))[:, 0])
        early = self.o.early_stopping is True
        stopped = []
        for s in members:
            start, stop, _ = s.indices(self.batch)
            n = stop - start
            any_improvable = improvable[stop] > improvable[start]
            all_full = full[stop] - full[start] == n
            all_hit = hits[stop] - hits[start] == n
            stopped.append(not (any_improvable and not (early and all_full) and not all_hit))
        return stopped

    def result(self, images: slice = slice(None)) -> GenerateOutput:
        """The best `num_return_sequences` per image, cropped to the longest generated one; for
        `images` alone, what a search over just those returned when `stopped(images)` held."""
        ops, n = self.ops, self.o.num_return_sequences
        count = len(range(*images.indices(self.batch)))
        sequences = ops.to_numpy(self.sequences[images, :n]).reshape(count * n, -1)
        seq_scores = ops.to_numpy(self.scores[images, :n]).reshape(count * n)
        indices = ops.to_numpy(self.indices[images, :n]).astype(np.int64)
        # rows numbered from the slice's first image, as its own search would number them
        offset = np.arange(count)[:, None, None] * self.o.num_beams
        indices = np.where(indices != -1, indices + offset, -1).reshape(count * n, -1)
        generated = int((indices != -1).sum(axis=1).max())
        scores, attentions = self.collect.result()
        return GenerateOutput(
            sequences=sequences[:, : PROMPT_LEN + generated].copy(),
            sequences_scores=seq_scores.copy(),
            scores=scores,
            cross_attentions=attentions,
            beam_indices=indices[:, :generated].copy(),
        )
