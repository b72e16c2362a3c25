"""Check the written graphs against transformers itself (not against our own torch modules).

Three comparisons on random inputs, each the max |difference| over every output value:
the encoder states, the first step's logits and a cached step's logits (the cache filled with
garbage past each row's length, to prove it is masked). The graphs run through the runtime's own
loader and executor, with two beams per image, images in image slots out of order, and other
batch and cache sizes than the traced ones, so every dynamic axis and the slot index are used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .graphs import example_inputs

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Validation:
    encoder_max_abs_diff: float
    first_step_max_abs_diff: float
    cached_step_max_abs_diff: float
    tolerance: float = TOLERANCE

    @property
    def max_abs_diff(self) -> float:
        return max(
            self.encoder_max_abs_diff, self.first_step_max_abs_diff, self.cached_step_max_abs_diff
        )

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


class ValidationError(RuntimeError):
    """The exported graphs disagree with the PyTorch model beyond the tolerance."""


def validate_export(model, out_dir: Path, start_token: int) -> Validation:
    """Compare the graphs in `out_dir` (its vedrt.json already written) with transformers,
    running them through the runtime's own loader and executor."""
    from ..runtime import load

    gen = load(out_dir, threads=None)
    executor = gen.executor
    batch, beams, cache_len, steps = 3, 2, 7, 3  # not the traced sizes: axes must be dynamic
    encoder_in, ids, _ = example_inputs(
        model, gen.manifest.image_size, batch, beams, 2, 1, cache_len, seed=1, text_len=9
    )
    ids[:, 0] = start_token
    text = gen.manifest.image_size is None
    names = ("input_ids", "attention_mask") if text else ("pixel_values",)
    feed = {name: x.numpy() for name, x in zip(names, encoder_in, strict=True)}
    with eager_attention(model), torch.no_grad():
        ref_states = model.encoder(**dict(zip(names, encoder_in, strict=True))).last_hidden_state
        if getattr(model, "enc_to_dec_proj", None) is not None:
            ref_states = model.enc_to_dec_proj(ref_states)
        expanded = {
            n: x.repeat_interleave(beams, dim=0) for n, x in zip(names, encoder_in, strict=True)
        }
        ref_first = model(**expanded, decoder_input_ids=ids[:, :1]).logits[:, -1]
        ref_cached = model(**expanded, decoder_input_ids=ids).logits[:, -1]

    (states,) = executor.sessions["encoder"].run(None, feed)
    encoded = executor.encode(feed if text else feed["pixel_values"])
    rows = batch * beams
    pool = executor.new_pool(rows, batch, cache_len, encoded.enc_len)
    rng = np.random.default_rng(1)  # garbage everywhere: positions past each row's must be masked
    pool.cache[...] = rng.standard_normal(pool.cache.shape, dtype=np.float32)
    order = list(range(batch))[::-1]  # images in slots out of order: the slot index is used
    for index, slot in enumerate(order):
        pool.put_image(slot, encoded.cross, encoded.mask, index)
    pool.set_groups(order)  # the groups' K/V gathered, as an engine does after a request leaves
    logits = []
    for step in range(steps):
        pool.input_ids[:rows, 0] = ids[:, step].numpy()
        pool.past_lengths[:rows] = step
        logits.append(executor.decode(pool, rows, batch).logits.copy())

    def diff(a, b) -> float:
        return float(np.abs(np.asarray(a) - b.numpy()).max())

    return Validation(
        encoder_max_abs_diff=diff(states, ref_states),
        first_step_max_abs_diff=diff(logits[0], ref_first),
        cached_step_max_abs_diff=diff(logits[-1], ref_cached),
    )


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run `model` with transformers' eager attention for a while, then restore what it had.

    Eager is the reference computation: transformers 4.57's SDPA path ignores GPT2's
    `scale_attn_by_inverse_layer_idx` and `scale_attn_weights`, so a model object loaded with SDPA
    would otherwise be "validated" against a different function than the one exported. GPT2, ViT,
    BART/MBart, TrOCR and Swin read `config._attn_implementation` at call time, so switching each
    sub-model's config (not its modules) is enough and leaves the caller's object as it was.
    BERT-style models pick their attention class when built; their SDPA class computes the same
    function as eager (within float rounding), which validation's tolerance allows for.
    """
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), config)
    saved = [(c, c._attn_implementation_internal) for c in configs.values()]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value
