"""The device search loop: greedy and beam search as torch operations on the executor's device.

Line for line transformers 4.57's `_sample` (greedy) and `_beam_search`, with the same torch ops
(`torch.topk`, `take_along_dim`, the -1e9 masking in float32), so on the same device the chosen
tokens and scores are the same. Everything stays on the device: the running sequences, scores and
beam indices, the top-k, and the cache reorder (a gather). The host learns one boolean per step
(should the loop go on) and receives the sequences once, at the end. Which engine runs a decoder
step is the executor's business (`vedrt.gpu.executor.DeviceExecutor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.options import PROMPT_LEN, GenerationOptions
from ..runtime.search import GenerateOutput
from . import processors
from .executor import DeviceExecutor, DeviceStep

BIG_NEG = -1.0e9


def _eos(o: GenerationOptions, device: torch.device) -> torch.Tensor | None:
    if o.eos_token_id is None:
        return None
    return torch.tensor(o.eos_token_id, dtype=torch.int64, device=device)


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    if eos is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, eos)


class _Collector:
    """output_scores / output_attentions: kept on the device, copied to numpy once at the end."""

    def __init__(self, o: GenerationOptions):
        self.scores: list[torch.Tensor] | None = [] if (o.return_dict and o.output_scores) else None
        self.attentions: list[list[torch.Tensor]] | None = (
            [] if (o.return_dict and o.output_attentions) else None
        )

    @property
    def want_attentions(self) -> bool:
        return self.attentions is not None

    def add(self, scores: torch.Tensor, out: DeviceStep) -> None:
        if self.scores is not None:
            self.scores.append(scores.clone())
        if self.attentions is not None and out.cross_attn is not None:
            self.attentions.append([a.float().clone() for a in out.cross_attn])

    def numpy(self) -> tuple[list | None, list | None]:
        scores = None if self.scores is None else [s.cpu().numpy() for s in self.scores]
        attn = None
        if self.attentions is not None:
            attn = [[a.cpu().numpy() for a in step] for step in self.attentions]
        return scores, attn


def _float_logits(out: DeviceStep) -> torch.Tensor:
    # a copy, as transformers makes: the executor's logits buffer is reused by the next step
    return out.logits.to(dtype=torch.float32, copy=True)


def greedy(
    executor: DeviceExecutor, cross: Any, batch: int, o: GenerationOptions
) -> GenerateOutput:
    """transformers' `_sample` without sampling: one row per image."""
    device = executor.device
    chain = processors.build(o)
    eos = _eos(o, device)
    pad = o.pad_token_id if o.pad_token_id is not None else 0
    seqs = torch.full((batch, o.max_length), pad, dtype=torch.int64, device=device)
    seqs[:, 0] = o.decoder_start_token_id
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    collect = _Collector(o)
    cache = executor.new_cache(batch, o.max_length - PROMPT_LEN)
    out = executor.decode(seqs[:, :PROMPT_LEN], 0, cache, cross, collect.want_attentions)
    cur_len = PROMPT_LEN
    while True:
        scores = processors.apply(chain, seqs[:, :cur_len], _float_logits(out))
        collect.add(scores, out)
        tokens = torch.argmax(scores, dim=-1)
        if eos is not None:
            tokens = tokens * unfinished + pad * ~unfinished
        seqs[:, cur_len] = tokens
        cur_len += 1
        unfinished &= ~_is_eos(tokens, eos)
        if cur_len >= o.max_length or not bool(unfinished.any()):
            break
        out = executor.decode(tokens[:, None], cur_len - 1, cache, cross, collect.want_attentions)
    scores_np, attn_np = collect.numpy()
    return GenerateOutput(seqs[:, :cur_len].cpu().numpy(), None, scores_np, attn_np)


@dataclass
class BeamState:
    """transformers' `_beam_search` running tensors, `[batch, beams, ...]`, on the device."""

    running_sequences: torch.Tensor  # [B, nb, max_length] int64
    running_scores: torch.Tensor  # [B, nb] float32
    running_indices: torch.Tensor  # [B, nb, max_length - prompt] int32
    sequences: torch.Tensor  # finished hypotheses, best first
    scores: torch.Tensor
    indices: torch.Tensor
    finished: torch.Tensor  # [B, nb] bool
    improvable: torch.Tensor  # [B, 1] bool
    hits: torch.Tensor  # [B, K] bool


def gather_beams(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """transformers' `_gather_beams`: x[b, idx[b, j], ...]."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


def init_beams(batch: int, o: GenerationOptions, k: int, device: torch.device) -> BeamState:
    nb = o.num_beams
    eos = o.eos_token_id
    fill = (o.pad_token_id or eos[0]) if eos is not None else -1  # transformers' `pad or eos[0]`
    running = torch.full((batch, nb, o.max_length), fill, dtype=torch.int64, device=device)
    running[:, :, :PROMPT_LEN] = o.decoder_start_token_id
    scores = torch.zeros((batch, nb), dtype=torch.float32, device=device)
    scores[:, 1:] = BIG_NEG
    indices = torch.full(
        (batch, nb, o.max_length - PROMPT_LEN), -1, dtype=torch.int32, device=device
    )
    return BeamState(
        running_sequences=running,
        running_scores=scores,
        running_indices=indices,
        sequences=running.clone(),
        scores=torch.full((batch, nb), BIG_NEG, dtype=torch.float32, device=device),
        indices=indices.clone(),
        finished=torch.zeros((batch, nb), dtype=torch.bool, device=device),
        improvable=torch.ones((batch, 1), dtype=torch.bool, device=device),
        hits=torch.zeros((batch, k), dtype=torch.bool, device=device),
    )


def beam_search(
    executor: DeviceExecutor, cross: Any, batch: int, o: GenerationOptions
) -> GenerateOutput:
    """transformers' `_beam_search` (without sampling)."""
    device = executor.device
    nb = o.num_beams
    eos = _eos(o, device)
    k = max(2, 1 + (0 if eos is None else eos.numel())) * nb
    top_mask = torch.zeros(k, dtype=torch.bool, device=device)
    top_mask[:nb] = True
    chain = processors.build(o)
    s = init_beams(batch, o, k, device)
    collect = _Collector(o)
    cache = executor.new_cache(batch * nb, o.max_length - PROMPT_LEN)
    prompt = s.running_sequences[:, :, :PROMPT_LEN].reshape(batch * nb, -1)
    out = executor.decode(prompt, 0, cache, cross, collect.want_attentions)
    cur_len = PROMPT_LEN
    while True:
        flat_running = s.running_sequences[:, :, :cur_len].reshape(batch * nb, cur_len)
        log_probs = torch.nn.functional.log_softmax(_float_logits(out), dim=-1)
        log_probs = processors.apply(chain, flat_running, log_probs)
        collect.add(log_probs, out)
        vocab = log_probs.shape[-1]
        accumulated = log_probs.reshape(batch, nb, vocab) + s.running_scores[:, :, None]
        accumulated = accumulated.reshape(batch, nb * vocab)
        cand_scores, cand_seqs, cand_indices = top_k_continuations(s, accumulated, cur_len, k, nb)
        s.hits = _is_eos(cand_seqs[:, :, cur_len], eos)
        if cur_len + 1 >= o.max_length:
            s.hits = torch.ones_like(s.hits)
        next_running_beams(s, cand_scores, cand_seqs, cand_indices, nb)
        update_finished(s, cand_scores, cand_seqs, cand_indices, top_mask, cur_len, o)
        beam_idx = s.running_indices[:, :, cur_len - PROMPT_LEN].reshape(-1)
        executor.reorder(cache, beam_idx.to(torch.int64), cur_len)
        cur_len += 1
        s.improvable = early_stop_unsatisfied(s, cur_len, o)
        if not has_unfinished(s, o):
            break
        tokens = s.running_sequences[:, :, cur_len - 1].reshape(-1, 1)
        out = executor.decode(tokens, cur_len - 1, cache, cross, collect.want_attentions)
    return finalize(s, o, collect)


def top_k_continuations(s: BeamState, accumulated: torch.Tensor, cur_len: int, k: int, nb: int):
    """transformers' `_get_top_k_continuations` (greedy branch)."""
    vocab = accumulated.shape[1] // nb
    cand_scores, idx = torch.topk(accumulated, k=k)
    source = idx // vocab
    cand_indices = gather_beams(s.running_indices, source)
    cand_seqs = gather_beams(s.running_sequences, source)
    cand_seqs[:, :, cur_len] = idx % vocab
    batch_offset = torch.arange(accumulated.shape[0], device=idx.device).view(-1, 1) * nb
    cand_indices[:, :, cur_len - PROMPT_LEN] = (source + batch_offset).to(cand_indices.dtype)
    return cand_scores, cand_seqs, cand_indices


def next_running_beams(s: BeamState, cand_scores, cand_seqs, cand_indices, nb: int) -> None:
    """transformers' `_get_running_beams_for_next_iteration`."""
    masked = cand_scores + s.hits.to(torch.float32) * BIG_NEG
    keep = torch.topk(masked, k=nb)[1]
    s.running_sequences = gather_beams(cand_seqs, keep)
    s.running_scores = gather_beams(masked, keep)
    s.running_indices = gather_beams(cand_indices, keep)


def update_finished(
    s: BeamState, cand_scores, cand_seqs, cand_indices, top_mask, cur_len: int, o: GenerationOptions
) -> None:
    """transformers' `_update_finished_beams`."""
    just_finished = s.hits & top_mask[None, :]
    penalised = cand_scores / ((cur_len + 1 - PROMPT_LEN) ** o.length_penalty)
    full = torch.all(s.finished, dim=-1, keepdim=True) & (o.early_stopping is True)
    penalised = penalised + full.to(torch.float32) * BIG_NEG
    penalised = penalised + (~s.improvable).to(torch.float32) * BIG_NEG
    penalised = penalised + (~just_finished) * BIG_NEG
    merged_scores = torch.cat((s.scores, penalised), dim=1)
    keep = torch.topk(merged_scores, k=o.num_beams)[1]
    s.sequences = gather_beams(torch.cat((s.sequences, cand_seqs), dim=1), keep)
    s.scores = gather_beams(merged_scores, keep)
    s.indices = gather_beams(torch.cat((s.indices, cand_indices), dim=1), keep)
    s.finished = gather_beams(torch.cat((s.finished, just_finished), dim=1), keep)


def early_stop_unsatisfied(s: BeamState, cur_len: int, o: GenerationOptions) -> torch.Tensor:
    """transformers' `_check_early_stop_heuristic`."""
    if o.early_stopping == "never" and o.length_penalty > 0.0:
        best_len = o.max_length - PROMPT_LEN
    else:
        best_len = cur_len - PROMPT_LEN
    best_running = s.running_scores[:, :1] / (best_len**o.length_penalty)
    worst = torch.where(s.finished, torch.min(s.scores, dim=1, keepdim=True)[0], BIG_NEG)
    return s.improvable & torch.any(best_running > worst, dim=-1, keepdim=True)


def has_unfinished(s: BeamState, o: GenerationOptions) -> bool:
    """transformers' `_beam_search_has_unfinished_sequences`: the one host sync per step."""
    improvement_possible = torch.any(s.improvable)
    exists_open_beam = ~(torch.all(s.finished) & (o.early_stopping is True))
    valid_continuations = ~torch.all(s.hits)
    return bool(improvement_possible & exists_open_beam & valid_continuations)


def finalize(s: BeamState, o: GenerationOptions, collect: _Collector) -> GenerateOutput:
    """The best `num_return_sequences` per image, cropped, copied to the host once."""
    n = o.num_return_sequences
    sequences = s.sequences[:, :n].flatten(0, 1)
    seq_scores = s.scores[:, :n].flatten(0, 1)
    indices = s.indices[:, :n].flatten(0, 1)
    generated = int((indices + 1).bool().sum(dim=1).max())
    scores_np, attn_np = collect.numpy()
    return GenerateOutput(
        sequences=sequences[:, : PROMPT_LEN + generated].cpu().numpy(),
        sequences_scores=seq_scores.cpu().numpy(),
        scores=scores_np,
        cross_attentions=attn_np,
        beam_indices=indices[:, :generated].cpu().numpy(),
    )
