"""How far a reduced-precision backend drifts from the fp32 graphs: logits and tokens.

Used by `vedrt build --fp16` (TensorRT fp16 vs ONNX Runtime fp32 on the CPU) and by the GPU
benchmarks (torch fp16 vs fp32). Logit error is measured on the first decoder step, where both
sides see the same input; token agreement on whole generations, where a single flipped token
changes the rest of the caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.options import PROMPT_LEN


@dataclass(frozen=True)
class Agreement:
    max_logit_error: float  # max |logit difference| on the first step, over all images
    sequence_agreement: float  # fraction of generated sequences that are identical
    token_agreement: float  # fraction of positions with the same token (over the longer length)
    rows: int

    def summary(self) -> str:
        return (
            f"max |logit error| {self.max_logit_error:.3g}, identical sequences "
            f"{100 * self.sequence_agreement:.1f}%, identical tokens "
            f"{100 * self.token_agreement:.1f}% over {self.rows} rows"
        )


def first_step_logits(generator: Any, pixel_values: np.ndarray) -> np.ndarray:
    """The first decoder step's logits [batch, vocab] as float32 numpy, whatever the backend."""
    executor, ops = generator.executor, generator.executor.ops
    encoded = executor.encode(pixel_values)
    batch = encoded.batch
    pool = executor.new_pool(batch, batch, PROMPT_LEN, encoded.enc_len)
    for i in range(batch):
        pool.put_image(i, encoded.cross, encoded.mask, i)
    pool.input_ids[:batch, 0] = generator.options().decoder_start_token_id
    pool.past_lengths[:batch] = 0
    pool.set_groups(list(range(batch)))
    logits = executor.decode(pool, batch, batch).logits
    return ops.to_numpy(ops.astype(logits, ops.float32))


def token_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(identical rows, identical positions) between two [rows, length] id arrays."""
    length = max(a.shape[1], b.shape[1])
    pad = -1
    a = np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=pad)
    b = np.pad(b, ((0, 0), (0, length - b.shape[1])), constant_values=pad)
    same = a == b
    return float(same.all(axis=1).mean()), float(same.mean())


def compare(reference: Any, candidate: Any, pixel_values: np.ndarray, **options: Any) -> Agreement:
    """Agreement of `candidate` with `reference` on these images and generation options."""
    ref_logits = first_step_logits(reference, pixel_values)
    cand_logits = first_step_logits(candidate, pixel_values)
    ref = reference.generate(pixel_values, **options)
    cand = candidate.generate(pixel_values, **options)
    rows, tokens = token_agreement(ref, cand)
    return Agreement(
        max_logit_error=float(np.abs(ref_logits - cand_logits).max()),
        sequence_agreement=rows,
        token_agreement=tokens,
        rows=int(ref.shape[0]),
    )
