"""What a search step hands the engine, and what a finished search returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .options import GenerationOptions

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
    # beam search: [rows] how many leading positions each new row's history shares with the row
    # it replaces; the cache row holds those already (same tokens, same K/V), so a reorder
    # copies only the positions after them (most new beams differ from the old in the last one)
    shared: Any | None = None


class Collector:
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
