"""Greedy, sampling and beam search as per-request state advanced one decoder step at a time.

Written once over the array operations of `ops.py`: numpy on the host for ONNX Runtime, torch on
the device for the GPU executors. A search never runs a graph: the engine runs one decoder step
over the rows of every active request, hands each search the logits of its own rows, and applies
what the search returns (the next token of every row, and for beam search which row each new
row continues, so the engine can reorder the request's cache rows). Greedy search and sampling
live here, beam search in `beam.py`, what a step returns in `outputs.py`.

The arithmetic mirrors transformers 4.57's `_sample` and `_beam_search` line for line, including
float32 and the -1e9 masking, so the chosen tokens and `sequences_scores` are the same.
"""

from __future__ import annotations

import numpy as np

from . import processors
from .beam import BeamSearch
from .ops import gumbel
from .options import PROMPT_LEN, GenerationOptions
from .outputs import Advance, Collector, GenerateOutput
from .perimage import PerImage, counts

__all__ = ["Advance", "BeamSearch", "GenerateOutput", "GreedySearch", "new_search"]


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
        self.collect = Collector(ops, o)

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
