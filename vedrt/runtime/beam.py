"""transformers' `_beam_search` (and beam sampling) as per-request state stepped by the engine.

Written over the array operations of `ops.py` (numpy on the host, torch on a device); see
`search.py` for how the engine drives a search.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import processors
from .ops import gumbel
from .options import PROMPT_LEN, GenerationOptions
from .outputs import BIG_NEG, Advance, Collector, GenerateOutput
from .perimage import PerImage


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
        self.collect = Collector(ops, o)
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
        self._flags: tuple | None = None  # `_image_flags` of the last step

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
            cand_scores, cand_beams, cand_tokens = self._top_k_from_rows(*top)
        else:
            log_probs = ops.log_softmax(ops.float_logits(logits))
            log_probs = processors.apply(self.chain, self._history(), log_probs)
            self.collect.add(log_probs, cross_attn)
            vocab = log_probs.shape[-1]
            accumulated = log_probs.reshape(self.batch, nb, vocab) + self.running_scores[:, :, None]
            accumulated = accumulated.reshape(self.batch, nb * vocab)
            cand_scores, cand_beams, cand_tokens = self._top_k_continuations(accumulated, vocab)
        self.hits = ops.isin(cand_tokens, o.eos_token_id or ())
        last = self.lengths + 1 >= o.max_length
        if last.any():  # the candidates of images at their last step all finish
            self.hits = self.hits | ops.asarray(last)[:, None]
        just_finished = self.hits & self.top_mask[None, :]
        # every candidate that did not finish would enter the finished set at <= -1e9 and lose
        # to the kept entries (sorted, ties to the lower index): with none finishing, skip it
        if bool(ops.any(just_finished)):
            cand_seqs, cand_indices = self._candidates(cand_beams, cand_tokens)
            self._update_finished(cand_scores, cand_seqs, cand_indices, just_finished)
        parents, tokens = self._next_running_beams(cand_scores, cand_beams, cand_tokens)
        shared = self._extend(parents, tokens)
        self.lengths += 1
        self.improvable = self._early_stop_unsatisfied()
        self._flags = self._image_flags()
        done = self._stops(*self._flags)
        source = parents + self._arange(self.batch)[:, None] * nb
        return Advance(
            tokens.reshape(-1), ops.astype(source.reshape(-1), ops.int64), done, shared.reshape(-1)
        )

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
        return cand_scores, idx // vocab, idx % vocab

    def _top_k_from_rows(self, top_logprobs, top_ids):
        """`_top_k_continuations` from each beam's best log-probs. Candidate j of beam b sits at
        b * K + j: for equal scores that order is the vocabulary order (beam, then token id, as
        ONNX TopK breaks ties by lower index), so the ranking is the full one's."""
        ops, nb, width = self.ops, self.o.num_beams, top_ids.shape[-1]
        scores = ops.float_logits(top_logprobs).reshape(self.batch, nb, width)
        accumulated = (scores + self.running_scores[:, :, None]).reshape(self.batch, nb * width)
        cand_scores, idx = ops.topk(accumulated, self.k)
        tokens = ops.take_along(top_ids.reshape(self.batch, nb * width), idx, axis=1)
        return cand_scores, idx // width, tokens

    def _candidates(self, source, tokens):
        """Candidate sequences and beam indices: the source beam's, extended by `tokens`."""
        ops = self.ops
        cand_indices = self._gather(self.running_indices, source)
        cand_seqs = self._gather(self.running_sequences, source)
        image, beam, at = self._at(cand_seqs.shape[1])
        cand_seqs[image, beam, at] = tokens
        cand_indices[image, beam, at - PROMPT_LEN] = ops.astype(source, ops.int32)
        return cand_seqs, cand_indices

    def _next_running_beams(self, cand_scores, cand_beams, cand_tokens):
        """The best `num_beams` candidates that did not just finish: their scores become the
        running scores; returns their source beams and tokens."""
        ops, nb = self.ops, self.o.num_beams
        if self.rng is None and ops.sorted_topk_is_identity and not bool(ops.any(self.hits)):
            # nothing masked and the candidates sorted best first: the top `num_beams` are the
            # first ones (what the top-k below returns for them, ties in order)
            self.running_scores = cand_scores[:, :nb]
            return cand_beams[:, :nb], cand_tokens[:, :nb]
        masked = cand_scores + ops.astype(self.hits, ops.float32) * ops.scalar(BIG_NEG)
        self.running_scores, keep = ops.topk(masked, nb)
        return ops.take_along(cand_beams, keep, axis=1), ops.take_along(cand_tokens, keep, axis=1)

    def _extend(self, parents, tokens):
        """Each running beam becomes its parent's sequence and beam indices extended by its
        token; returns `[batch, beams]`: the positions each shares with the beam it replaces."""
        ops = self.ops
        old = self.running_sequences
        seqs = self._gather(old, parents)
        cur = self.cur_len
        shared = ops.first_true(old[:, :, :cur] != seqs[:, :, :cur])
        image, beam, at = self._at(self.o.num_beams)
        seqs[image, beam, at] = tokens
        indices = self._gather(self.running_indices, parents)
        indices[image, beam, at - PROMPT_LEN] = ops.astype(parents, ops.int32)
        self.running_sequences, self.running_indices = seqs, indices
        return shared

    def _update_finished(self, cand_scores, cand_seqs, cand_indices, just_finished) -> None:
        """Merge the candidates that just finished (`just_finished`: those among the top
        `num_beams` that hit an EOS or the length limit) into the finished set."""
        ops, o = self.ops, self.o
        big_neg = ops.scalar(BIG_NEG)
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

    def _image_flags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image, on the host: can a running beam still win, is its finished set full, did
        every candidate finish. What transformers' `_beam_search_has_unfinished_sequences`
        tests (the one host sync per step), kept per image so slices can be tested alone
        (images never influence each other's beams, finished sets or stopping tests)."""
        ops = self.ops
        return (
            ops.to_numpy(self.improvable)[:, 0],
            ops.to_numpy(ops.all(self.finished, axis=1))[:, 0],
            ops.to_numpy(ops.all(self.hits, axis=1))[:, 0],
        )

    def _stops(self, improvable: np.ndarray, full: np.ndarray, hit: np.ndarray) -> bool:
        """transformers' test on some images' flags: none can improve, or every finished set is
        full (with `early_stopping=True`), or every candidate finished."""
        early_and_full = self.o.early_stopping is True and bool(full.all())
        return not (improvable.any() and not early_and_full and not hit.all())

    def stopped(self, members: list[slice]) -> list[bool]:
        """For each slice of the images: would a search over just those have stopped?"""
        flags = self._flags if self._flags is not None else self._image_flags()
        improvable, full, hit = flags
        if (
            improvable.all()
            and not hit.any()
            and not (self.o.early_stopping is True and full.any())
        ):
            return [False] * len(members)  # no image can stop, so no slice of them
        return [self._stops(improvable[s], full[s], hit[s]) for s in members]

    def join(self, other) -> None:
        super().join(other)
        self._flags = None  # the last step's flags describe the images before

    def keep(self, images: np.ndarray) -> None:
        super().keep(images)
        self._flags = None

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
